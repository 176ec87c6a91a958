"""Ref sources for a consumer: where the trainer's sample refs come from.

Offline and streaming differ only here (and in the store's release policy):
- `ManifestRefSource` (retain): refs by sample index, waiting for each until the
  producer journals it. The trainer's order is the same seeded permutation a
  colocated run uses, so a consumer started before its producer still trains on
  byte-identical batches.
- `ClaimingRefSource` (consume-once): refs in arrival order, each claimed so that
  no two consumers train the same sample; ends when the sealed run is exhausted.
"""

from __future__ import annotations

import logging
import threading
import time

from draftflow.control.claims import ClaimBook
from draftflow.control.manifest import ManifestReader
from draftflow.records import SampleRef
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


class ClaimingRefSource:
    """Arrival-order refs, each claimed (`ClaimBook` under the control directory) so
    that no two consumers, or ranks, train the same sample. A sample is marked done and
    its data freed only by `trained`, after the optimizer step that used it, so a
    consumer that dies mid-step loses nothing: its claims go stale and are taken over.
    After the run is sealed, samples still claimed by others are retried until they
    are done or their claim goes stale; while this consumer still holds untrained
    claims of its own, `resolve` raises `Pending` instead of waiting (two consumers
    each holding a claim and waiting for the other's would otherwise deadlock)."""

    def __init__(self, reader: ManifestReader, store, claims: ClaimBook, timeout_s: float,
                 poll_s: float = 0.2):
        self.num_samples = reader.header.num_samples
        self._store, self._claims, self._timeout_s, self._poll_s = store, claims, timeout_s, poll_s
        self._follow = reader.follow(timeout_s)
        self._root = reader.control_dir.parent
        self._skipped: list[SampleRef] = []
        self._handed: dict[str, SampleRef] = {}
        self._last_renew = time.monotonic()
        self._renew_lock = threading.Lock()
        self.num_tokens = 0

    def resolve(self, index: int) -> SampleRef:  # the index is ignored: arrival order
        self._renew_if_due()
        for ref in self._follow:
            if self._claim(ref):
                return ref
            self._skipped.append(ref)
        return self._sweep()

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
        self._handed[ref.sample_id] = ref
        self.num_tokens += ref.num_tokens
        return True

    def trained(self, sample_ids) -> None:
        """Mark samples trained and free their data (consume-once)."""
        for sample_id in sample_ids:
            ref = self._handed.pop(sample_id)
            try:
                self._claims.done(sample_id)
            except ValueError:
                # Our claim went stale and another consumer took the sample over: it may
                # be trained twice, but it is never lost. Leave its data to the new owner.
                log.warning("claim on %s was taken over by another consumer", sample_id)
                continue
            self._store.delete(ref)
        self._renew_if_due()

    def _renew_if_due(self) -> None:
        # Heartbeats, a few per claim timeout, so a consumer that keeps training never
        # looks dead to the others. Called by the loader and by the bookkeeping thread:
        # one of them renews.
        with self._renew_lock:
            now = time.monotonic()
            if now - self._last_renew <= self._claims.claim_timeout_s / 4:
                return
            self._last_renew = now
        for sample_id in self._claims.renew_all():
            log.warning("claim on %s was taken over by another consumer", sample_id)

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
                    # Samples we claimed are not trained yet; another consumer may be waiting
                    # on them as we would wait on its claims. Train ours first.
                    raise Pending
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(self._skipped)} sample(s) stayed claimed by other consumers "
                                       f"for {self._timeout_s:g} s without being trained")
                time.sleep(self._poll_s)
                self._renew_if_due()
        raise EndOfStream
