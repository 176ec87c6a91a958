"""The run manifest: a signed header, an append-only ref journal, a signed final state.

Three files under the control directory, written by the producer only:

- `header.json`: the run (`ManifestHeader`) plus the secret's key id, signed. Created
  once with `os.link`, so two producers can never both think they own a folder.
- `refs.jsonl`: one published `SampleRef` per line, each with its own HMAC chained
  to the previous line's (the first to the header's signature). A publish is one
  appended, fsync'd line: O(1) work however long the run. The chain means lines
  cannot be edited, reordered, dropped in the middle or spliced from another run.
- `state.json`: absent while the run is in progress; written last, atomically, to
  seal the journal (its line count and last HMAC) or to mark the run failed.

`ManifestReader` refuses, each with its own message: an unsigned record, a
record signed under another secret (told apart by the key id), a tampered
record (naming the file and line), and a provenance that differs from the
consumer's (`check_provenance`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from draftflow.control.signing import canonical_json, key_id, sign, verify
from draftflow.fsutil import naming, write_atomic
from draftflow.records import FORMAT_VERSION, Provenance, SampleRef, assert_no_tensors

HEADER_FILE = "header.json"
JOURNAL_FILE = "refs.jsonl"
STATE_FILE = "state.json"
RELEASE_POLICIES = ("auto", "retain", "consume_once")
RECORD = dict(frozen=True, slots=True, kw_only=True)


class ManifestError(RuntimeError):
    """The manifest cannot be used; the message says which file and why."""


class UnsignedManifestError(ManifestError):
    pass


class TamperedManifestError(ManifestError):
    pass


class WrongSecretError(ManifestError):
    pass


class ProvenanceMismatchError(ManifestError):
    pass


class ProducerFailedError(ManifestError):
    pass


class ProducerTimeoutError(ManifestError, TimeoutError):
    pass


def _now_iso() -> str:
    # A string, not a float: every signed value survives a JSON round trip exactly.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(**RECORD)
class ManifestHeader:
    """What a run is: written once by the producer, checked by every consumer."""

    run_id: str
    provenance: Provenance
    draft_vocab: tuple[int, ...]  # target token ids of the draft vocabulary
    num_samples: int  # refs the producer plans to publish; sealing checks it
    release: str  # one of RELEASE_POLICIES
    created: str = field(default_factory=_now_iso)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"manifest header: format_version {self.format_version}; "
                             f"this DraftFlow writes {FORMAT_VERSION}")
        if self.release not in RELEASE_POLICIES:
            raise ValueError(f"manifest header: release {self.release!r}, expected one of {RELEASE_POLICIES}")
        if self.num_samples < 0:
            raise ValueError(f"manifest header: num_samples {self.num_samples} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "run_id": self.run_id,
                "provenance": self.provenance.to_dict(), "draft_vocab": list(self.draft_vocab),
                "num_samples": self.num_samples, "release": self.release, "created": self.created}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ManifestHeader":
        return cls(format_version=int(d["format_version"]), run_id=str(d["run_id"]),
                   provenance=Provenance.from_dict(d["provenance"]),
                   draft_vocab=tuple(int(x) for x in d["draft_vocab"]),
                   num_samples=int(d["num_samples"]), release=str(d["release"]), created=str(d["created"]))

    def differences(self, other: "ManifestHeader") -> list[str]:
        """Fields that make `other` a different run (`created` differs on every rerun)."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k != "created" and a[k] != b[k]]


@dataclass(**RECORD)
class ManifestState:
    status: str  # "in_progress" | "sealed" | "failed"
    num_refs: int = 0
    error: str | None = None


# ---------------------------------------------------------------- file helpers

def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise TamperedManifestError(f"{path}: {what} is not valid JSON ({e}); corrupt or tampered") from None


def _signed_part(doc: Any, path: Path, key: str) -> tuple[dict, str]:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), dict):
        raise TamperedManifestError(f"{path}: expected an object with a {key!r} record")
    sig = doc.get("sig")
    if not sig:
        raise UnsignedManifestError(f"{path}: the {key} record is unsigned (no 'sig'); refusing it")
    return doc[key], sig


def _read_header(control_dir: Path, secret: bytes) -> tuple[ManifestHeader, str]:
    path = control_dir / HEADER_FILE
    if not path.exists():
        raise ManifestError(f"no manifest at {control_dir}: {HEADER_FILE} is missing (has the producer started?)")
    payload, sig = _signed_part(_load_json(path, "the manifest header"), path, "header")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        # Version 1 refs carry no MAC: their samples cannot be told from planted ones.
        hint = ("; it was written by an older DraftFlow, whose samples are unsigned: recapture them "
                "(`draftflow store gc --what all`, then rerun the producer)") if version == 1 else ""
        raise ManifestError(f"{path}: manifest format version {version!r}; this DraftFlow reads "
                            f"{FORMAT_VERSION}{hint}")
    if not verify(payload, sig, secret):
        theirs, ours = payload.get("key_id"), key_id(secret)
        if theirs != ours:
            raise WrongSecretError(f"{path}: manifest signed under a different secret (key id {theirs}, "
                                   f"yours is {ours}); use the producer's secret")
        raise TamperedManifestError(f"{path}: header signature does not match its content (tampered)")
    try:
        header = ManifestHeader.from_dict({k: v for k, v in payload.items() if k != "key_id"})
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path}: malformed manifest header ({e})") from None
    return header, sig


def _read_state(control_dir: Path, secret: bytes, header_sig: str) -> tuple[ManifestState, str] | None:
    """The signed final state and the last chain HMAC it seals, or None while in progress."""
    path = control_dir / STATE_FILE
    try:
        doc = _load_json(path, "the state record")
    except FileNotFoundError:
        return None
    payload, sig = _signed_part(doc, path, "state")
    if not verify(payload, sig, secret):
        raise TamperedManifestError(f"{path}: state record signature does not match its content (tampered)")
    if payload.get("header_sig") != header_sig:
        raise TamperedManifestError(f"{path}: state record belongs to a different run (header mismatch)")
    if payload.get("status") not in ("sealed", "failed"):
        raise ManifestError(f"{path}: unknown run status {payload.get('status')!r}, expected sealed or failed")
    state = ManifestState(status=payload["status"], num_refs=int(payload["num_refs"]), error=payload["error"])
    return state, payload["last_mac"]


def _state_doc(state: ManifestState, last_mac: str, header_sig: str, secret: bytes) -> bytes:
    payload = {"status": state.status, "num_refs": state.num_refs, "error": state.error,
               "last_mac": last_mac, "header_sig": header_sig}
    assert_no_tensors(payload, "manifest state")
    return canonical_json({"state": payload, "sig": sign(payload, secret)})


class _JournalCursor:
    """Reads complete, verified journal lines past a byte offset; keeps the chain."""

    def __init__(self, path: Path, secret: bytes, header_sig: str):
        self.path, self._secret = path, secret
        self.offset, self.num_refs, self.last_mac = 0, 0, header_sig

    def iter_new(self) -> Iterator[SampleRef]:
        """Yield refs of lines appended since the last call (each line spans
        [offset before it, `self.offset`)). A final line without its newline is being
        written (or was torn by a crash) and is left for later."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(self.offset)
            pending = b""
            while chunk := f.read(1 << 22):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    ref = self._verify(raw)
                    self.offset += len(raw) + 1
                    yield ref

    def _verify(self, raw: bytes) -> SampleRef:
        where = f"{self.path} line {self.num_refs + 1}"
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TamperedManifestError(f"{where}: not valid JSON ({e}); corrupt or tampered") from None
        if not isinstance(doc, dict) or "ref" not in doc or "n" not in doc:
            raise TamperedManifestError(f"{where}: expected a journal record with 'n' and 'ref'")
        mac = doc.pop("mac", None)
        if not mac:
            raise UnsignedManifestError(f"{where}: ref record is unsigned (no 'mac'); refusing it")
        if not verify({"prev": self.last_mac, **doc}, mac, self._secret):
            raise TamperedManifestError(f"{where}: signature does not match (line edited, reordered, "
                                        "dropped before it, or spliced from another run)")
        self.num_refs += 1
        self.last_mac = mac
        return SampleRef.from_dict(doc["ref"])

    def check_sealed(self, state: ManifestState, last_mac: str) -> None:
        """The journal read so far must be exactly what the seal covers."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if state.num_refs != self.num_refs or last_mac != self.last_mac or size != self.offset:
            raise TamperedManifestError(
                f"{self.path}: the seal in {STATE_FILE} covers {state.num_refs} refs but the journal holds "
                f"{self.num_refs} verified refs and {size - self.offset} more bytes (journal tampered)")


def check_provenance(header: ManifestHeader, expected: Provenance) -> None:
    """Raise ProvenanceMismatchError listing every field where the manifest differs."""
    diffs = header.provenance.mismatches(expected)
    if diffs:
        raise ProvenanceMismatchError(f"run {header.run_id!r}: features were produced under a different "
                                      "provenance:\n  " + "\n  ".join(diffs))


def wait_for_header(control_dir: str | Path, timeout_s: float, poll_s: float = 0.1) -> Path:
    """Block until the producer has written its header (a consumer may start first)."""
    path = Path(control_dir) / HEADER_FILE
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise ProducerTimeoutError(f"timed out after {timeout_s:g} s waiting for the producer at "
                                       f"{control_dir} (no {HEADER_FILE})")
        time.sleep(poll_s)
    return path


def _digest(ref: SampleRef) -> bytes:
    return hashlib.blake2b(canonical_json(ref.to_dict()), digest_size=16).digest()


class ManifestWriter:
    """The producer's side. Opening a folder that already holds the same run resumes it:
    journaled refs are known (`published_ids`), a torn last line from a crash is cut off,
    and a failed state is cleared so the rerun can finish the run."""

    def __init__(self, control_dir: str | Path, secret: bytes, header: ManifestHeader):
        self.control_dir = Path(control_dir)
        self.control_dir.mkdir(parents=True, exist_ok=True)
        self._secret = secret
        self.header, self._header_sig = self._open_header(header)
        self._cursor = _JournalCursor(self.control_dir / JOURNAL_FILE, secret, self._header_sig)
        # sample id -> (digest of its ref, offset of its line): enough to check a republish
        # and to read the ref back (`journaled`), small for big runs
        self._published: dict[str, tuple[bytes, int]] = {}
        start = 0
        for ref in self._cursor.iter_new():
            self._published[ref.sample_id] = (_digest(ref), start)
            start = self._cursor.offset
        self.truncated_bytes = self._cut_torn_tail()
        found = _read_state(self.control_dir, secret, self._header_sig)
        self._sealed = found is not None and found[0].status == "sealed"
        if self._sealed:
            self._cursor.check_sealed(*found)
        elif found is not None:
            (self.control_dir / STATE_FILE).unlink()  # rerun of a failed run: in progress again
        self._journal = open(self._cursor.path, "ab")

    def _open_header(self, header: ManifestHeader) -> tuple[ManifestHeader, str]:
        assert_no_tensors(header, "manifest header")
        payload = {**header.to_dict(), "key_id": key_id(self._secret)}
        doc = canonical_json({"header": payload, "sig": sign(payload, self._secret)})
        try:
            write_atomic(self.control_dir / HEADER_FILE, doc, exclusive=True)
        except FileExistsError:
            pass  # a rerun, or another producer: compare with what is there
        existing, sig = _read_header(self.control_dir, self._secret)
        diffs = existing.differences(header)
        if diffs:
            raise ManifestError(f"{self.control_dir} holds a different run (run_id {existing.run_id!r}; "
                                f"differing header fields: {diffs}); use a fresh features.root or "
                                "clean the old store first (draftflow store gc)")
        return existing, sig

    def _cut_torn_tail(self) -> int:
        """Drop a final line without newline: a crash mid-append. Returns bytes dropped."""
        path = self._cursor.path
        extra = path.stat().st_size - self._cursor.offset if path.exists() else 0
        if extra > 0:
            os.truncate(path, self._cursor.offset)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        return extra

    def published_ids(self) -> frozenset[str]:
        return frozenset(self._published)

    def journaled(self, sample_id: str) -> SampleRef | None:
        """The ref journaled for `sample_id`, read back from its line (checked against the
        digest kept when it was verified or written), or None."""
        known = self._published.get(sample_id)
        if known is None:
            return None
        digest, offset = known
        with open(self._cursor.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            ref = SampleRef.from_dict(json.loads(line)["ref"])
        except (ValueError, KeyError, TypeError):
            ref = None
        if ref is None or _digest(ref) != digest:
            raise TamperedManifestError(f"{self._cursor.path}: the line of {sample_id!r} changed after it was "
                                        "verified (journal tampered)")
        return ref

    @property
    def num_refs(self) -> int:
        return self._cursor.num_refs

    def publish(self, ref: SampleRef) -> None:
        """Append one ref (fsync'd). Republishing an identical ref is a no-op."""
        known = self._published.get(ref.sample_id)
        if known is not None:
            if known[0] != _digest(ref):
                raise ManifestError(f"sample {ref.sample_id!r} was already published with a different ref "
                                    "(index, location, shapes or checksums); the store changed under the run")
            return
        if self._sealed:
            raise ManifestError(f"{self.control_dir}: run is sealed with {self.num_refs} refs; "
                                f"cannot publish {ref.sample_id!r}")
        if self.num_refs >= self.header.num_samples:
            raise ManifestError(f"{self.control_dir}: header plans {self.header.num_samples} samples; "
                                f"cannot publish {ref.sample_id!r} beyond that")
        record = {"n": self.num_refs, "ref": ref.to_dict()}
        assert_no_tensors(record, "manifest ref")
        mac = sign({"prev": self._cursor.last_mac, **record}, self._secret)
        line = canonical_json({**record, "mac": mac}) + b"\n"
        with naming(self._cursor.path):
            self._journal.write(line)
            self._journal.flush()
            os.fsync(self._journal.fileno())
        self._published[ref.sample_id] = (_digest(ref), self._cursor.offset)
        self._cursor.offset += len(line)
        self._cursor.num_refs += 1
        self._cursor.last_mac = mac

    def seal(self) -> None:
        """Mark the run complete; refuses if fewer refs than planned (no silent tail drop)."""
        if self._sealed:
            return
        if self.num_refs != self.header.num_samples:
            raise ManifestError(f"{self.control_dir}: cannot seal with {self.num_refs} refs; "
                                f"the header plans {self.header.num_samples}")
        self._write_state(ManifestState(status="sealed", num_refs=self.num_refs))
        self._sealed = True

    def fail(self, error: str) -> None:
        """Tell consumers the producer gave up, with its error; they stop instead of waiting."""
        if self._sealed:
            raise ManifestError(f"{self.control_dir}: run is already sealed; cannot mark it failed")
        self._write_state(ManifestState(status="failed", num_refs=self.num_refs, error=str(error)))

    def _write_state(self, state: ManifestState) -> None:
        doc = _state_doc(state, self._cursor.last_mac, self._header_sig, self._secret)
        write_atomic(self.control_dir / STATE_FILE, doc)

    def close(self) -> None:
        self._journal.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ManifestReader:
    """The consumer's side: a verified header, the refs so far, or a live follow."""

    def __init__(self, control_dir: str | Path, secret: bytes):
        self.control_dir = Path(control_dir)
        self._secret = secret
        self.header, self._header_sig = _read_header(self.control_dir, secret)

    def _cursor(self) -> _JournalCursor:
        return _JournalCursor(self.control_dir / JOURNAL_FILE, self._secret, self._header_sig)

    def state(self) -> ManifestState:
        found = _read_state(self.control_dir, self._secret, self._header_sig)
        return found[0] if found else ManifestState(status="in_progress")

    def refs_so_far(self) -> list[SampleRef]:
        """Every verified ref journaled now; if sealed, checked against the seal."""
        found = _read_state(self.control_dir, self._secret, self._header_sig)
        cursor = self._cursor()
        refs = list(cursor.iter_new())
        if found and found[0].status == "sealed":
            cursor.check_sealed(*found)
        return refs

    def follow(self, timeout_s: float, poll_s: float = 0.1, idle=None) -> Iterator[SampleRef | None]:
        """Yield refs as the producer journals them, until the run is sealed.

        Raises ProducerFailedError (with the producer's error) if the run was marked
        failed, and ProducerTimeoutError if nothing new arrives for `timeout_s`
        (time the caller spends between refs does not count). `idle`: called at each
        poll that found nothing new; when it returns true, None is yielded, so the
        caller can act on the wait and come back to the same follow.
        """
        cursor = self._cursor()
        last_progress = time.monotonic()
        while True:
            got_any = False
            for ref in cursor.iter_new():
                got_any = True
                yield ref
                last_progress = time.monotonic()
            found = _read_state(self.control_dir, self._secret, self._header_sig)
            if found is not None:
                self._raise_if_failed(found[0])
                yield from cursor.iter_new()  # lines fsync'd before the seal was written
                cursor.check_sealed(*found)
                return
            if not got_any:
                if idle is not None and idle():
                    yield None
                if time.monotonic() - last_progress > timeout_s:
                    raise ProducerTimeoutError(
                        f"timed out after {timeout_s:g} s waiting for the producer at {self.control_dir} "
                        f"(no new ref or state; {cursor.num_refs} refs so far)")
                time.sleep(poll_s)

    def _raise_if_failed(self, state: ManifestState) -> None:
        if state.status == "failed":
            raise ProducerFailedError(f"the producer at {self.control_dir} marked run {self.header.run_id!r} "
                                      f"failed after {state.num_refs} refs: {state.error}")
