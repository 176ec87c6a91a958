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

Nothing ever unlinks a claim file while a newer generation may be live: a consumer
claims from generation 0 upward, so a gap below a live claim would let a third
consumer in. `done` unlinks its chain only after the done marker is visible (a
claimer that slips into a gap sees the marker and backs off); `release` unlinks it
only while still ours, right after a heartbeat (only a stealer that judged the claim
stale before that could still race it); a `done` or `release` that lost its claim
leaves the chain to the new owner, whose `done` removes it.

`done` returns only when the caller may free the sample's data, i.e. the claim was
still ours after the marker became visible; otherwise it raises `ClaimLostError`.
It checks ownership before writing the marker (a lost claim gets no marker) and
again after: a stealer that creates `<gen+1>` between the two checks may have looked
for the marker before it appeared and be training the sample now, so we must not
delete under it. What remains of that race: the sample is marked done by us and
may be trained a second time by the stealer (at-least-once, never lost); if the
stealer instead sees the marker and backs off, nobody frees the data and
`draftflow store gc --what consumed` does.

Adoption after a restart: a consumer may pass a stable `identity` (see
`consumer_identity`: host, output folder, rank). Its claims record it, and a
restarted consumer of the same identity (a new `owner`) takes over the claims of its
previous incarnation at once, by creating the next generation as a steal does,
instead of waiting `claim_timeout_s` for them to go stale. This assumes one live
process per identity: two live processes sharing a host, `train.output_dir` and rank
are a user error; they would take claims from each other and train some samples
twice (the ownership check in `done` still keeps each from deleting the other's data).
"""

from __future__ import annotations

import hashlib
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


class ClaimLostError(ValueError):
    """`done` on a claim another consumer took over: leave the sample's data to it.

    `marked` says whether the done marker was written (the steal raced with `done`)."""

    def __init__(self, message: str, *, sample_id: str, claim_file: Path, holder: str, marked: bool):
        super().__init__(message)
        self.sample_id, self.claim_file, self.holder, self.marked = sample_id, claim_file, holder, marked


def consumer_identity(output_dir: str | Path, rank: int) -> str:
    """A consumer's name that survives its restarts: host, hash of its output folder, rank."""
    digest = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]
    return f"{socket.gethostname()}/{digest}/rank{rank}"


def default_owner(identity: str | None = None) -> str:
    """`identity:pid:random` (`host:pid:random` without one): unique per process and restart."""
    return f"{identity or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def parse_claim_name(name: str) -> tuple[str, int] | None:
    """`"s1@2"` -> ("s1", 2); None for names that are not claims (e.g. temp files)."""
    sample_id, sep, gen = name.rpartition("@")
    if not sep or not gen.isdigit() or name.startswith("."):
        return None
    return sample_id, int(gen)


class ClaimBook:
    """Claims of one consumer (`owner`) in a claim folder shared with the others.

    `owner` is unique per process (`default_owner(identity)`); `identity`, stable across
    restarts (`consumer_identity`), lets this process adopt its previous incarnation's
    claims at once. Without it (the producer, which only asks `is_done`) claims are
    taken over only once stale."""

    def __init__(self, directory: str | Path, owner: str, claim_timeout_s: float, keys, *,
                 identity: str | None = None):
        if identity is not None and not owner.startswith(identity + ":"):
            # Equal owners would make a restart look like the same process: it must differ.
            raise ValueError(f"owner {owner!r} must be default_owner(identity) for identity {identity!r}")
        self.identity = identity
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
                takeable = self._stale(self._path(sample_id, gen)) or self._adoptable(self._path(sample_id, gen))
            except FileNotFoundError:
                return False  # its owner just marked it done
            if not takeable:
                return False
            gen += 1  # stale or ours from before a restart: take it by creating the next generation

    def _stale(self, path: Path) -> bool:
        """A claim not renewed for `claim_timeout_s` belongs to a dead (or stalled) owner."""
        return time.time() - path.stat().st_mtime > self.claim_timeout_s

    def _adoptable(self, path: Path) -> bool:
        """A claim of our identity but another owner: our previous incarnation, now dead."""
        if self.identity is None:
            return False
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError:
            return False
        return content.get("identity") == self.identity and content.get("owner") != self.owner

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
        tmp.write_text(json.dumps({"owner": self.owner, "identity": self.identity, "sample_id": sample_id,
                                   "gen": gen}))
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
        """Mark a held sample trained and drop its claim. Returns only if the claim was still
        ours after the done marker became visible: then, and only then, the caller may free
        the sample's data. Raises ClaimLostError if another consumer took it over (with no
        marker written when it was lost before), ValueError if it was never claimed."""
        with self._lock:  # only the bookkeeping: the loader's claims need not wait for the file work
            gen = self._held.pop(sample_id, None)
        if gen is None:
            raise ValueError(f"sample {sample_id!r} is not claimed by {self.owner}; claim it before done()")
        if not self._still_ours(sample_id, gen):
            raise self._lost(sample_id, gen, marked=False)
        self._write_marker(sample_id, gen)
        # Checked again once the marker is visible: a stealer that created <gen+1> before
        # then may have looked for the marker before it existed and be training the sample.
        still_ours = self._still_ours(sample_id, gen)
        # Our part of the chain can go in any case now that the marker is visible (a claimer
        # that slips into the gap sees it and backs off); a newer generation is not ours.
        self._unlink_upto(sample_id, gen)
        if not still_ours:
            raise self._lost(sample_id, gen, marked=True)

    def _write_marker(self, sample_id: str, gen: int) -> None:
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

    def _lost(self, sample_id: str, gen: int, marked: bool) -> ClaimLostError:
        path = self._path(sample_id, gen)
        holder = self.holder(sample_id)
        holder_text = holder[0] if holder else "another consumer (already finished with it)"
        outcome = "marked done, but the new owner may be training it" if marked else "not marked done"
        return ClaimLostError(f"claim {path} on sample {sample_id!r} of {self.owner} was taken over by "
                              f"{holder_text} (its heartbeat was older than {self.claim_timeout_s:g} s, or a "
                              f"restart of the same consumer adopted it); {outcome}: leave its data to the "
                              "new owner",
                              sample_id=sample_id, claim_file=path, holder=holder_text, marked=marked)

    def release(self, sample_id: str) -> None:
        """Give up a held claim without marking it done; one already taken over is left
        to its new owner (its claim files are never ours to unlink)."""
        with self._lock:
            gen = self._held.pop(sample_id, None)
        if gen is None:
            return
        try:
            # Fresh first, so a stealer can judge it stale only from a look taken before now.
            os.utime(self._path(sample_id, gen))
        except FileNotFoundError:
            return
        if self._still_ours(sample_id, gen):
            self._unlink_upto(sample_id, gen)

    def _unlink_upto(self, sample_id: str, gen: int) -> None:
        for g in range(gen + 1):
            self._path(sample_id, g).unlink(missing_ok=True)
