"""Maintenance of a directory store: `draftflow store ls | verify | gc`.

These walk the whole store (O(samples)), unlike the put/get path; they are for an
operator between or after runs. Layout (local and shared_dir backends):

    <root>/samples/<id>.safetensors       sample files (+ `.<name>.tmp-<pid>` of crashed writers)
    <root>/control/{header.json,refs.jsonl,state.json}   the signed manifest
    <root>/control/claims/<id>@<gen>, control/done/<id>   consume-once claims
    <root>/control/progress/                 back-pressure byte counters
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

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
    dirs = [root / "samples", root / "control", root / "control" / "claims"]
    return [p for d in dirs if d.is_dir() for p in d.iterdir() if _is_temp(p.name)]


def _claim_files(root: Path) -> list[Path]:
    d = root / "control" / "claims"
    return [p for p in d.iterdir() if parse_claim_name(p.name)] if d.is_dir() else []


def _done_ids(root: Path) -> set[str]:
    d = root / "control" / "done"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


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


def verify_store(root: str | Path, secret: bytes) -> list[str]:
    """Problems found: the manifest's signatures and chain, then every sample's checksums.
    A consumed (done) sample whose file was freed is not a problem."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such store directory")
    store, problems = LocalStore(root), []
    refs, state = [], "absent"
    if (root / "control" / HEADER_FILE).exists():
        try:
            reader = ManifestReader(root / "control", secret)
            state = reader.state().status
            refs = reader.refs_so_far()
            problems.extend(failed_run(reader))
        except ManifestError as e:
            problems.append(f"manifest: {e}")
    done, listed = _done_ids(root), {r.sample_id for r in refs}
    for ref in refs:
        if ref.sample_id in done and not store.path_of(ref.sample_id).exists():
            continue
        try:
            store.release(store.get(ref))  # back to the read-buffer pool
        except StoreError as e:
            problems.append(str(e))
    for path in _sample_files(root):
        sample_id = path.name[: -len(_SUFFIX)]
        if sample_id in listed:
            continue
        if state == "sealed":
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
             min_temp_age_s: float = 60.0) -> dict[str, int]:
    """Remove leftovers; returns how many of each were removed.

    `temp`: temp files of crashed writers older than `min_temp_age_s` (younger ones
    may belong to a live writer). `claims`: claims superseded by a newer generation,
    of done samples, or stale for `claim_timeout_s`. `consumed`: files of done
    samples. `all`: the whole store (samples and control records).
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
        removed["claims"] = _unlink_all(_removable_claims(root, now, claim_timeout_s))
    if "consumed" in what:
        removed["consumed"] = _unlink_all(LocalStore(root).path_of(s) for s in _done_ids(root))
    return removed


def _removable_claims(root: Path, now: float, claim_timeout_s: float) -> list[Path]:
    """Claim chains of done samples, and whole chains whose newest claim is stale.

    A chain goes whole, never one superseded generation alone: a consumer claims
    from generation 0 upward, so a gap below a live claim would let it in twice.
    Consumers steal stale claims themselves; run this when no consumer is running.
    """
    chains: dict[str, list[tuple[int, Path]]] = {}
    for p in _claim_files(root):
        sample_id, gen = parse_claim_name(p.name)
        chains.setdefault(sample_id, []).append((gen, p))
    done, out = _done_ids(root), []
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
