"""Ref sources for a consumer: where the trainer's sample refs come from.

Offline and streaming differ only here (and in the store's release policy):
- `ManifestRefSource` (retain): refs by sample index, waiting for each until the
  producer journals it. The trainer's order is the same seeded permutation a
  colocated run uses, so a consumer started before its producer still trains on
  byte-identical batches.
- `ClaimingRefSource` (consume-once): refs in arrival order, each claimed so that
  no two consumers train the same sample; ends when the sealed run is exhausted.
  Its samples are committed (marked done, data freed) only when the trainer says a
  checkpoint holding them is published (`train.stream.ConsumeOnceStream`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from draftflow.control.claims import ClaimBook, ClaimLostError
from draftflow.control.manifest import ManifestReader
from draftflow.records import SampleRef
from draftflow.stores.base import RoomWanted
from draftflow.train.batches import EndOfStream, Pending

log = logging.getLogger("draftflow.sources")


class ManifestRefSource:
    """Refs by index. The journal is read to its seal (which must cover exactly the
    lines read, in a `state.json` of this run) as soon as the run is sealed: at once if
    it already is, else when every ref has arrived, and at the latest in `finish()`,
    before the draft is exported. So lines appended after the seal, an edited seal or
    another run's `state.json` are refused even if training needs fewer refs."""

    def __init__(self, reader: ManifestReader, timeout_s: float):
        self.num_samples = reader.header.num_samples
        self._follow = reader.follow(timeout_s)
        self._refs: dict[int, SampleRef] = {}
        self._where = reader.control_dir
        self._sealed_checked = False
        if reader.state().status == "sealed":
            self.finish()

    def resolve(self, index: int) -> SampleRef:
        while index not in self._refs:
            try:
                self._add(next(self._follow))
            except StopIteration:
                self._sealed_checked = True
                raise ValueError(f"{self._where}: the sealed manifest has no sample with index {index} "
                                 f"(expected indices 0..{self.num_samples - 1})") from None
        if len(self._refs) == self.num_samples:
            self.finish()
        return self._refs[index]

    def _add(self, ref: SampleRef) -> None:
        if ref.index in self._refs:
            raise ValueError(f"{self._where}: the manifest journals sample index {ref.index} twice")
        self._refs[ref.index] = ref

    def finish(self) -> None:
        """Read the journal to the seal and check it (waits for the seal, as for refs)."""
        if not self._sealed_checked:
            for ref in self._follow:
                self._add(ref)
            self._sealed_checked = True

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self._refs.values())


class InOrder:
    """Runs calls one after another on a background thread. A failed call's error goes
    to `on_error` at once, and is raised by the next `submit` or by `close` (which
    waits for all calls)."""

    def __init__(self, what: str, on_error=None):
        self.what, self.on_error = what, on_error
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=what.replace(" ", "-"))
        self._pending: deque[Future] = deque()

    def submit(self, fn, *args) -> None:
        self._raise_failed(wait=False)
        self._pending.append(self._pool.submit(self._call, fn, *args))

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as e:
            if self.on_error is not None:
                self.on_error(e)
            raise

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every call; raise the first error (log the others), or only log
        them (raise_errors=False: the caller is already failing)."""
        self._pool.shutdown(wait=True)
        self._raise_failed(wait=True, raise_errors=raise_errors)

    def _raise_failed(self, wait: bool, raise_errors: bool = True) -> None:
        errors = []
        while self._pending and (wait or self._pending[0].done()):  # one worker: they finish in order
            error = self._pending.popleft().exception()
            if error is not None:
                errors.append(error)
        for e in errors[1 if raise_errors else 0:]:
            log.error("%s failed: %s", self.what, e, exc_info=e)
        if errors and raise_errors:
            raise errors[0]


class ClaimingRefSource:
    """Arrival-order refs, each claimed (`ClaimBook` under the control directory) so
    that no two consumers, or ranks, train the same sample.

    A claimed sample stays claimed (heartbeats keep the claim fresh) until `commit`,
    which the trainer calls once a checkpoint holding its training is published:
    only then is it marked done and its data freed, so a consumer that dies at any
    moment loses nothing; its claims go stale and are taken over, or adopted at once
    by its own restart. After the run is sealed, samples still claimed by others are
    retried until they are done or their claim goes stale. While this consumer holds
    uncommitted claims, `resolve` raises `Pending` instead of waiting on others' (two
    consumers each waiting for the other's claims would deadlock) and instead of
    waiting for a producer that waits for room (`RoomWanted`): the trainer commits
    first."""

    def __init__(self, reader: ManifestReader, store, claims: ClaimBook, timeout_s: float,
                 poll_s: float = 0.2):
        self.num_samples = reader.header.num_samples
        self._store, self._claims, self._timeout_s, self._poll_s = store, claims, timeout_s, poll_s
        self._root = reader.control_dir.parent
        self._room = RoomWanted(self._root)  # control_dir's parent is features.root
        self._follow = reader.follow(timeout_s, idle=self._should_pause)
        self._skipped: list[SampleRef] = []
        self._handed: dict[str, SampleRef] = {}  # claimed by us, not yet committed
        self._handed_lock = threading.Lock()  # the loader hands out, the training thread commits
        self.on_error = None  # set by the stream: who to tell when a commit fails
        self._bookkeeping = InOrder("consume-once commit", on_error=lambda e: self.on_error and self.on_error(e))
        self._stop = threading.Event()
        # Heartbeats, a few per claim timeout, so claims held across a long checkpoint
        # interval never look dead to other consumers.
        self._heartbeat = threading.Thread(target=self._renew_loop, daemon=True, name="claim-heartbeat")
        self._heartbeat.start()
        self.num_tokens = 0

    def resolve(self, index: int) -> SampleRef:  # the index is ignored: arrival order
        for ref in self._follow:
            if ref is None:  # the producer waits for room that only our commit can free
                raise Pending
            if self._claim(ref):
                return ref
            self._skipped.append(ref)
        return self._sweep()

    def _should_pause(self) -> bool:
        return bool(self._handed) and self._room.wanted()

    def why_exhausted(self) -> str:
        """Why a consumer that never got a sample has nothing to train (the trainer's error)."""
        return (f"every one of the {self.num_samples} samples of the consume-once run in features.root "
                f"{self._root} was already trained by other consumers (each sample is trained once, then "
                "deleted). Start all consumers before their producer finishes; to train on the same data "
                "again, rerun the producer into a fresh features.root (or empty this one first with "
                "`draftflow store gc --what all`)")

    def _claim(self, ref: SampleRef) -> bool:
        if not self._claims.try_claim(ref.sample_id):
            return False
        with self._handed_lock:
            self._handed[ref.sample_id] = ref
        self.num_tokens += ref.num_tokens
        return True

    def commit(self, sample_ids) -> None:
        """Mark samples done and free their data, in order, off the caller's thread
        (a `done` link and the unlink of a large cached file cost milliseconds each).
        From here on they no longer count as held (see `resolve`)."""
        with self._handed_lock:
            refs = [self._handed.pop(sample_id) for sample_id in sample_ids]
        self._bookkeeping.submit(self._commit, refs)

    def _commit(self, refs: list[SampleRef]) -> None:
        for ref in refs:
            try:
                self._claims.done(ref.sample_id)
            except ClaimLostError as e:
                # Another consumer took the sample over while we trained it: it may be
                # trained twice, never lost. Its data is the new owner's now.
                log.warning("%s", e)
                continue
            self._store.delete(ref)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._claims.claim_timeout_s / 4):
            try:
                for sample_id in self._claims.renew_all():
                    log.warning("claim on %s was taken over by another consumer", sample_id)
            except OSError as e:  # a transient file-system error: the next beat tries again
                log.warning("renewing claims failed: %s", e)

    def _sweep(self) -> SampleRef:
        deadline = time.monotonic() + self._timeout_s
        while self._skipped:
            self._skipped = [r for r in self._skipped if not self._claims.is_done(r.sample_id)]
            for i, ref in enumerate(self._skipped):
                if self._claim(ref):
                    del self._skipped[i]
                    return ref
            if self._skipped:
                if self._handed:
                    # Samples we claimed are not committed yet; another consumer may be
                    # waiting on them as we would wait on its claims. Commit ours first.
                    raise Pending
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(self._skipped)} sample(s) stayed claimed by other consumers "
                                       f"for {self._timeout_s:g} s without being trained")
                time.sleep(self._poll_s)
        raise EndOfStream

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the commits in flight and stop the heartbeats."""
        self._stop.set()
        self._bookkeeping.close(raise_errors=raise_errors)
