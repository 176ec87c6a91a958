"""Consume-once claims on a shared file system: each sample is trained by one consumer.

Layout under the claim folder (shared by every consumer, on any host):

    claims/<sample>@<gen>   the claim of generation <gen>; content names the owner
    done/<sample>           the sample was trained; never handed out again. Signed
                            (`RunKeys.done_marker`: sample, generation, owner, store):
                            a marker that does not verify is refused, naming the file,
                            never taken as "trained"

Claiming is `os.link` of a private temp file to the claim name: an atomic
create-if-absent on local file systems and NFS alike, so exactly one process wins.
The owner touches its claims' mtime (`renew_all`) as a heartbeat. A claim whose
mtime is older than `claim_timeout_s` belongs to a dead (or stalled) consumer and
may be stolen by creating the *next* generation, again with `os.link`.

Why generations instead of "rename the stale claim away, then recreate": with a
rename, a slow stealer that judged the old claim stale can rename away the *fresh*
claim a faster stealer just made, and both would train the sample. Creating
`<gen+1>` is exclusive per generation, so only one stealer can win each one, and
an owner learns it lost its claim when `<gen+1>` exists. Staleness compares the
file's mtime with this host's clock: keep `claim_timeout_s` far above clock skew.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from draftflow.control.manifest import ManifestError
from draftflow.records import validate_sample_id


class ForgedMarkerError(ManifestError):
    """A `done/` marker not signed under this run's secret for this store."""


def default_owner() -> str:
    """host:pid:random — unique across hosts, processes and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def parse_claim_name(name: str) -> tuple[str, int] | None:
    """`"s1@2"` -> ("s1", 2); None for names that are not claims (e.g. temp files)."""
    sample_id, sep, gen = name.rpartition("@")
    if not sep or not gen.isdigit() or name.startswith("."):
        return None
    return sample_id, int(gen)


class ClaimBook:
    """Claims of one consumer (`owner`) in a claim folder shared with the others."""

    def __init__(self, directory: str | Path, owner: str, claim_timeout_s: float, keys):
        self.keys = keys  # control.binding.RunKeys: signs and checks done markers
        self.claims_dir = Path(directory) / "claims"
        self.done_dir = Path(directory) / "done"
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.owner = owner
        self.claim_timeout_s = claim_timeout_s
        self._held: dict[str, int] = {}  # sample id -> generation we own
        # The loader thread claims and renews while the bookkeeping thread marks done.
        self._lock = threading.Lock()

    def _path(self, sample_id: str, gen: int) -> Path:
        return self.claims_dir / f"{sample_id}@{gen}"

    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def is_done(self, sample_id: str) -> bool:
        """True if a consumer of this run marked the sample trained; a marker that does
        not verify raises ForgedMarkerError (skipping the sample would lose it)."""
        path = self.done_dir / validate_sample_id(sample_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return False
        if not self.keys.done_marker_ok(sample_id, raw):
            raise ForgedMarkerError(f"{path}: done marker not signed under this run's secret for this store "
                                    "(forged, or from another run); refusing to skip the sample. Remove it if "
                                    "the sample was not trained; `draftflow store verify` lists such markers")
        return True

    def try_claim(self, sample_id: str) -> bool:
        """Claim `sample_id` for this owner; False if done or held by a live consumer."""
        validate_sample_id(sample_id)
        with self._lock:
            return self._try_claim(sample_id)

    def _try_claim(self, sample_id: str) -> bool:
        if sample_id in self._held:
            return True
        if self.is_done(sample_id):
            return False
        gen = 0
        while True:
            if self._create(sample_id, gen):
                if self.is_done(sample_id):  # its owner finished it while we were claiming
                    self._path(sample_id, gen).unlink(missing_ok=True)
                    return False
                self._held[sample_id] = gen
                return True
            if self._path(sample_id, gen + 1).exists():
                gen += 1  # already stolen once; look at the newer claim
                continue
            try:
                stale = self._stale(self._path(sample_id, gen))
            except FileNotFoundError:
                return False  # its owner just marked it done
            if not stale:
                return False
            gen += 1  # stale: try to steal by creating the next generation

    def _stale(self, path: Path) -> bool:
        """A claim not renewed for `claim_timeout_s` belongs to a dead (or stalled) owner."""
        return time.time() - path.stat().st_mtime > self.claim_timeout_s

    def holder(self, sample_id: str) -> tuple[str, float] | None:
        """(owner, seconds since its last heartbeat) of the newest claim on `sample_id`."""
        gens = [g for sid, g in filter(None, map(parse_claim_name, os.listdir(self.claims_dir))) if sid == sample_id]
        if not gens:
            return None
        path = self._path(sample_id, max(gens))
        try:
            owner = json.loads(path.read_text()).get("owner", "?")
            return owner, time.time() - path.stat().st_mtime
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _create(self, sample_id: str, gen: int) -> bool:
        tmp = self.claims_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"owner": self.owner, "sample_id": sample_id, "gen": gen}))
        try:
            os.link(tmp, self._path(sample_id, gen))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _still_ours(self, sample_id: str, gen: int) -> bool:
        if self._path(sample_id, gen + 1).exists():
            return False
        try:
            content = json.loads(self._path(sample_id, gen).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return content.get("owner") == self.owner

    def renew_all(self) -> list[str]:
        """Heartbeat every held claim; return (and forget) the ids lost to a stealer."""
        lost = []
        with self._lock:
            for sample_id, gen in list(self._held.items()):
                if self._still_ours(sample_id, gen):
                    os.utime(self._path(sample_id, gen))
                else:
                    del self._held[sample_id]
                    lost.append(sample_id)
        return lost

    def done(self, sample_id: str) -> None:
        """Mark a held sample trained: link its claim to `done/`, then drop the claim files."""
        with self._lock:  # only the bookkeeping: the loader's claims need not wait for the file work
            gen = self._held.pop(sample_id, None)
        if gen is None:
            raise ValueError(f"sample {sample_id!r} is not claimed by {self.owner}; claim it before done()")
        marker = self.done_dir / sample_id
        tmp = self.done_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.write_bytes(self.keys.done_marker(sample_id, gen, self.owner))
        try:
            os.link(tmp, marker)  # complete before it is visible
        except FileExistsError:
            # A stealer finished it first (it is done either way), unless what is there is
            # forged: then ours replaces it.
            if not self.keys.done_marker_ok(sample_id, marker.read_bytes()):
                os.replace(tmp, marker)
        finally:
            tmp.unlink(missing_ok=True)
        self.release(sample_id, gen)

    def release(self, sample_id: str, gen: int | None = None) -> None:
        """Drop the claim files of `sample_id` up to generation `gen` (default: the one held)."""
        if gen is None:
            with self._lock:
                gen = self._held.pop(sample_id, None)
            if gen is None:
                return
        for g in range(gen + 1):
            self._path(sample_id, g).unlink(missing_ok=True)
