"""Maintenance of a directory store: `draftflow store ls | verify | gc`.

These walk the whole store (O(samples)), unlike the put/get path; they are for an
operator between or after runs. Layout (local and shared_dir backends):

    <root>/samples/<id>.safetensors       sample files (+ `.<name>.tmp-<pid>` of crashed writers)
    <root>/control/{header.json,refs.jsonl,state.json}   the signed manifest
    <root>/control/store.json, store.key     the signed store record (what filled it), a colocated run's key
    <root>/control/claims/<id>@<gen>, control/done/<id>   consume-once claims, signed done markers
    <root>/control/lease/                    the producer lease
    <root>/control/progress/                 back-pressure byte counters
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from draftflow.control.binding import RunKeys, check_filled_with, open_store_record
from draftflow.control.claims import parse_claim_name
from draftflow.control.manifest import HEADER_FILE, JOURNAL_FILE, STATE_FILE, ManifestError, ManifestReader
from draftflow.records import SampleRef
from draftflow.stores.base import StoreError
from draftflow.stores.local import REF_KEY, LocalStore
from draftflow.stores.sample_file import read_metadata

GC_WHAT = ("temp", "claims", "consumed", "all")
_SUFFIX = ".safetensors"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSummary:
    manifest_state: str  # absent | in_progress | sealed | failed (as written; `verify` checks it)
    num_refs: int  # lines in the ref journal
    num_samples: int  # sample files on disk
    num_bytes: int  # their total size
    num_claims: int  # live or stale claim files
    num_done: int  # samples marked trained (consume-once)
    num_temp_files: int  # leftovers of crashed writers


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _sample_files(root: Path) -> list[Path]:
    d = root / "samples"
    return sorted(p for p in d.glob(f"*{_SUFFIX}") if not p.name.startswith(".")) if d.is_dir() else []


def _temp_files(root: Path) -> list[Path]:
    dirs = [root / "samples", root / "control", root / "control" / "claims", root / "control" / "done"]
    return [p for d in dirs if d.is_dir() for p in d.iterdir() if _is_temp(p.name)]


def _claim_files(root: Path) -> list[Path]:
    d = root / "control" / "claims"
    return [p for p in d.iterdir() if parse_claim_name(p.name)] if d.is_dir() else []


def _done_ids(root: Path) -> set[str]:
    d = root / "control" / "done"
    return {p.name for p in d.iterdir() if not p.name.startswith(".")} if d.is_dir() else set()


def _manifest_state(control: Path) -> str:
    if not (control / HEADER_FILE).exists():
        return "absent"
    try:
        return json.loads((control / STATE_FILE).read_bytes())["state"]["status"]
    except FileNotFoundError:
        return "in_progress"
    except (ValueError, KeyError, TypeError):
        return "unreadable"


def list_store(root: str | Path) -> StoreSummary:
    """What is in the store, without the secret (so nothing here is verified)."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such store directory")
    journal = root / "control" / JOURNAL_FILE
    samples = _sample_files(root)
    return StoreSummary(
        manifest_state=_manifest_state(root / "control"),
        num_refs=journal.read_bytes().count(b"\n") if journal.exists() else 0,
        num_samples=len(samples), num_bytes=sum(p.stat().st_size for p in samples),
        num_claims=len(_claim_files(root)), num_done=len(_done_ids(root)),
        num_temp_files=len(_temp_files(root)))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCheck:
    """The control records of a store, verified (`check_run`)."""

    keys: RunKeys | None  # None: the store record did not verify, so no sample can be checked
    refs: list[SampleRef]
    state: str  # absent | in_progress | sealed | failed
    release: str | None  # the manifest's release policy (None without a manifest)
    done: frozenset[str]  # samples whose done marker verifies (consume-once runs only)
    problems: list[str]


def check_run(root: str | Path, secret: bytes) -> RunCheck:
    """Verify the store record, the manifest (signatures, chain, seal) and every done marker."""
    root, problems = Path(root), []
    try:
        keys, filled = open_store_record(root, secret, None)
    except ManifestError as e:
        return RunCheck(keys=None, refs=[], state="absent", release=None, done=frozenset(), problems=[f"store: {e}"])
    refs, state, release = [], "absent", None
    if (root / "control" / HEADER_FILE).exists():
        try:
            reader = ManifestReader(root / "control", secret)
            release = reader.header.release
            state = reader.state().status
            check_filled_with(root, filled, reader.header.provenance)
            refs = reader.refs_so_far()
            problems.extend(failed_run(reader))
        except ManifestError as e:
            problems.append(f"manifest: {e}")
    listed, done = {r.sample_id for r in refs}, set()
    for sample_id in sorted(_done_ids(root)):
        path = root / "control" / "done" / sample_id
        if not keys.done_marker_ok(sample_id, path.read_bytes()):
            problems.append(f"{path}: done marker not signed under this run's secret (forged, or from another run); "
                            "its sample may never have been trained")
        elif release != "consume_once":
            problems.append(f"{path}: done marker in a {release or 'manifest-less'} run (only consume-once runs "
                            "mark samples trained)")
        elif sample_id not in listed:
            problems.append(f"{path}: done marker of a sample the manifest does not list")
        else:
            done.add(sample_id)
    return RunCheck(keys=keys, refs=refs, state=state, release=release, done=frozenset(done), problems=problems)


def verify_store(root: str | Path, secret: bytes) -> list[str]:
    """Problems found: the store record, the manifest's signatures and chain, the done
    markers, then every sample's signature and checksums. A consumed sample (its done
    marker verifies) whose file was freed is not a problem."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such store directory")
    run = check_run(root, secret)
    if run.keys is None:
        return run.problems
    store, problems, listed = LocalStore(root, run.keys), run.problems, {r.sample_id for r in run.refs}
    for ref in run.refs:
        if ref.sample_id in run.done and not store.path_of(ref.sample_id).exists():
            continue
        try:
            store.release(store.get(ref))  # back to the read-buffer pool
        except StoreError as e:
            problems.append(str(e))
    for path in _sample_files(root):
        sample_id = path.name[: -len(_SUFFIX)]
        if sample_id in listed:
            continue
        if run.state == "sealed":
            problems.append(f"{path}: sample {sample_id!r} is not in the sealed manifest (stray file)")
        problems.extend(_verify_unlisted(store, sample_id))
    return problems


def failed_run(reader: ManifestReader) -> list[str]:
    """A run its producer marked failed is a problem, however well its samples verify."""
    state = reader.state()
    if state.status != "failed":
        return []
    return [f"manifest: the producer marked run {reader.header.run_id!r} failed after {state.num_refs} refs: "
            f"{state.error} (rerun the producer with the same config to finish the run)"]


def _verify_unlisted(store: LocalStore, sample_id: str) -> list[str]:
    """Check a file not (yet) in the manifest against the ref kept in its own header."""
    try:
        ref = SampleRef.from_dict(json.loads(read_metadata(store.path_of(sample_id))[REF_KEY]))
        store.release(store.get(ref))
    except (StoreError, KeyError, ValueError) as e:
        return [f"sample {sample_id!r}: {e}"]
    return []


def gc_store(root: str | Path, what: Iterable[str], *, claim_timeout_s: float = 300.0,
             min_temp_age_s: float = 60.0, secret: bytes | None = None) -> dict[str, int]:
    """Remove leftovers; returns how many of each were removed.

    `temp`: temp files of crashed writers older than `min_temp_age_s` (younger ones
    may belong to a live writer). `claims`: claims superseded by a newer generation,
    of done samples, or stale for `claim_timeout_s`; with `secret`, a sample counts as
    done only if its marker verifies (a forged marker cannot clear a live claim), without
    it every marker counts. `consumed` (needs `secret`): files
    of samples whose done marker verifies, in a consume-once run only. `all`: the whole
    store (samples and control records).
    """
    root, what = Path(root), set(what)
    unknown = what - set(GC_WHAT)
    if unknown:
        raise ValueError(f"store gc: unknown target(s) {sorted(unknown)}, expected some of {GC_WHAT}")
    if not (root / "samples").is_dir() and not (root / "control").is_dir():
        raise StoreError(f"{root}: not a DraftFlow store (no samples/ or control/); refusing to clean it")
    if "all" in what:
        for d in ("samples", "control"):
            shutil.rmtree(root / d, ignore_errors=True)
        return {"all": 1}
    now, removed = time.time(), {}
    if "temp" in what:
        old = [p for p in _temp_files(root) if now - p.stat().st_mtime >= min_temp_age_s]
        removed["temp"] = _unlink_all(old)
    if "claims" in what:
        done = _done_ids(root) if secret is None else _verified_done(root, secret)
        removed["claims"] = _unlink_all(_removable_claims(root, now, claim_timeout_s, done))
    if "consumed" in what:
        removed["consumed"] = _unlink_all(root / "samples" / f"{s}{_SUFFIX}" for s in _consumed(root, secret))
    return removed


def _consumed(root: Path, secret: bytes | None) -> frozenset[str]:
    """Samples trained in a consume-once run, by done markers that verify."""
    if secret is None:
        raise ValueError("store gc --what consumed needs the run secret (done markers are checked before a file goes)")
    run = check_run(root, secret)
    if run.keys is None or run.release is None:
        raise StoreError(f"{root}: cannot tell which samples were consumed: "
                         f"{'; '.join(run.problems) or 'no manifest'}")
    if run.release != "consume_once":
        raise ValueError(f"store gc --what consumed: {root} holds a {run.release} run; its samples are kept for "
                         "further epochs, none is consumed")
    return run.done


def _verified_done(root: Path, secret: bytes) -> frozenset[str]:
    """The samples whose done marker verifies (`check_run`)."""
    run = check_run(root, secret)
    if run.keys is None:
        raise StoreError(f"{root}: cannot check the done markers: {'; '.join(run.problems)}")
    return run.done


def _removable_claims(root: Path, now: float, claim_timeout_s: float, done: Iterable[str]) -> list[Path]:
    """Claim chains of done samples, and whole chains whose newest claim is stale.

    A chain goes whole, never one superseded generation alone: a consumer claims
    from generation 0 upward, so a gap below a live claim would let it in twice.
    Consumers steal stale claims themselves; run this when no consumer is running.
    """
    chains: dict[str, list[tuple[int, Path]]] = {}
    for p in _claim_files(root):
        sample_id, gen = parse_claim_name(p.name)
        chains.setdefault(sample_id, []).append((gen, p))
    out = []
    for sample_id, chain in chains.items():
        _, newest = max(chain)
        if sample_id in done or now - newest.stat().st_mtime > claim_timeout_s:
            out.extend(p for _, p in sorted(chain))
    return out


def _unlink_all(paths: Iterable[Path]) -> int:
    count = 0
    for p in paths:
        try:
            p.unlink()
            count += 1
        except FileNotFoundError:
            pass  # gone already (another gc, or its owner finished)
    return count
