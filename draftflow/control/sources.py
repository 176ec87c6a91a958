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

import time

from draftflow.control.manifest import ManifestReader
from draftflow.records import SampleRef
from draftflow.train.batches import EndOfStream


class ManifestRefSource:
    def __init__(self, reader: ManifestReader, timeout_s: float):
        self.num_samples = reader.header.num_samples
        self._follow = reader.follow(timeout_s)
        self._refs: dict[int, SampleRef] = {}
        self._where = reader.control_dir

    def resolve(self, index: int) -> SampleRef:
        while index not in self._refs:
            try:
                ref = next(self._follow)
            except StopIteration:
                raise ValueError(f"{self._where}: the sealed manifest has no sample with index {index} "
                                 f"(expected indices 0..{self.num_samples - 1})") from None
            self._refs[ref.index] = ref
        return self._refs[index]


class ClaimingRefSource:
    """Arrival-order refs, claimed through the store (`try_claim`). After the run is
    sealed, samples still claimed by others are retried until they are done or their
    claim goes stale (a crashed consumer) and can be taken over."""

    def __init__(self, reader: ManifestReader, store, timeout_s: float, poll_s: float = 0.2):
        self.num_samples = reader.header.num_samples
        self._reader, self._store, self._timeout_s, self._poll_s = reader, store, timeout_s, poll_s
        self._follow = reader.follow(timeout_s)
        self._skipped: list[SampleRef] = []
        self.num_claimed = 0

    def resolve(self, index: int) -> SampleRef:  # the index is ignored: arrival order
        for ref in self._follow:
            if self._store.try_claim(ref):
                self.num_claimed += 1
                return ref
            self._skipped.append(ref)
        return self._sweep()

    def _sweep(self) -> SampleRef:
        deadline = time.monotonic() + self._timeout_s
        while self._skipped:
            claims = self._store.claims
            self._skipped = [r for r in self._skipped if not claims.is_done(r.sample_id)]
            for i, ref in enumerate(self._skipped):
                if self._store.try_claim(ref):
                    del self._skipped[i]
                    self.num_claimed += 1
                    return ref
            if self._skipped:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(self._skipped)} sample(s) stayed claimed by other consumers "
                                       f"for {self._timeout_s:g} s without being trained")
                time.sleep(self._poll_s)
        raise EndOfStream
