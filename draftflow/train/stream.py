"""Step-level sample streams: what the trainer trains at each step, one per release policy.

The trainer asks a stream for each step's micro-batches and tells it when a
checkpoint is published; it knows nothing else about where samples come from.

- `SeededStream` (colocated runs, retain consumers): the seeded `SampleOrder`,
  the same on every host, so a consumer builds byte-identical batches to a
  colocated run. It never ends early and has nothing to free. `OnlineStream` is
  the same order from a source that captures each sample as it is reached.
- `ConsumeOnceStream` (consume-once consumers): samples in arrival order, each
  claimed by one consumer. It owns what arrival order brings: ranks agree, every
  step, on whether any has data (a rank without trains a batch that learns
  nothing, so every collective stays matched), and the stream ends when no rank
  has data. Samples are committed -- marked done and their data deleted -- only
  once a checkpoint holding their training is published (`committed`), so a
  consumer killed at any moment loses no sample: on restart it resumes from that
  checkpoint and claims the rest again. A sample can therefore be trained twice
  after a crash (the steps after the last checkpoint are redone), never zero times.

  The stream asks the trainer for a checkpoint early (`StepData.commit`) when it
  has nothing to train and holding uncommitted samples would block others: the
  source is Pending (others' claims to wait for while ours are held, or a producer
  that waits for room in the store: back-pressure). Only then, not as soon as the
  producer waits: a consumer with samples in hand trains them first, so each early
  checkpoint frees as much as it can.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftflow.train.batches import PENDING, FeatureLoader, SampleOrder, TrainBatch
from draftflow.train.distributed import DistInfo, all_reduce_sum


@dataclass(frozen=True, slots=True)
class StepData:
    """One step's micro-batches on this rank; `commit`: publish a checkpoint after
    this step (before it, when no rank has batches), so samples can be freed."""

    batches: list[TrainBatch]
    commit: bool = False


@dataclass(frozen=True, slots=True)
class BatchShape:
    batch_size: int
    grad_accum: int
    seed: int


class SeededStream:
    """Refs in the seeded order (`SampleOrder`), by index from a ref source."""

    ordered = True  # each loaded step is that step of the order

    def __init__(self, store, source, shape: BatchShape, dist: DistInfo, pin_memory: bool):
        self.store, self.source, self.shape, self.dist, self.pin_memory = store, source, shape, dist, pin_memory
        self.num_samples = source.num_samples
        self.order: SampleOrder | None = None
        self.loader: FeatureLoader | None = None

    def open(self, start: int, end: int, data: dict, check_ref) -> None:
        """Start at step `start`; `data` is the checkpoint's data position ({} at step 0)."""
        origin = (start, int(data["position"])) if "position" in data else (0, 0)
        self.order = SampleOrder(num_samples=self.num_samples, seed=self.shape.seed,
                                 batch_size=self.shape.batch_size, grad_accum=self.shape.grad_accum,
                                 world_size=self.dist.world_size, rank=self.dist.rank, origin=origin)
        self._open_loader(start, end, check_ref)

    def _open_loader(self, start: int, end: int, check_ref) -> None:
        self.loader = FeatureLoader(self.store, self.source, self.order, start, end, check_ref=check_ref,
                                    pin_memory=self.pin_memory, ordered=self.ordered)

    def next(self, step: int) -> StepData | None:
        return StepData(self.loader.next(step))

    def data_position(self, step: int) -> dict:
        return {"position": self.order.start_of(step)}

    def epoch_of(self, step: int) -> float:
        return self.order.epoch_of(step)

    def committed(self) -> None:
        pass  # retained samples stay for later epochs and other consumers

    @property
    def wait_s(self) -> float:
        return self.loader.wait_s

    def why_exhausted(self) -> str:
        return "the sample stream is empty"

    def close(self, failed: bool = False) -> None:
        if self.loader is not None:
            self.loader.close()


class OnlineStream(SeededStream):
    """The seeded order, from a source that captures each sample as the order reaches
    it (`capture.online.CapturingSource`, an online run): the source starts capturing
    at the step the trainer resumes from, before the loader asks for anything."""

    def _open_loader(self, start: int, end: int, check_ref) -> None:
        self.source.start(self.order, start, end)
        super()._open_loader(start, end, check_ref)

    def close(self, failed: bool = False) -> None:
        try:
            super().close(failed)
        finally:
            self.source.close()


class ConsumeOnceStream(SeededStream):
    """Arrival-order refs from a `ClaimingRefSource` (see module docstring)."""

    ordered = False  # arrival order: only the micro-batch sizes come from `order`

    def __init__(self, store, source, shape: BatchShape, dist: DistInfo, pin_memory: bool, hidden_size: int):
        super().__init__(store, source, shape, dist, pin_memory)
        self.hidden_size = hidden_size
        self._ended = False  # this rank's source has no more samples
        self._held: list[str] = []  # trained here, not yet in a published checkpoint

    def open(self, start: int, end: int, data: dict, check_ref) -> None:
        super().open(start, end, {}, check_ref)
        self.source.on_error = self.loader.fail  # a failed commit may be what the loader waits for

    def next(self, step: int) -> StepData | None:
        got = [] if self._ended else self.loader.next(step)
        pending = got == PENDING
        batches = [] if pending else got
        if not pending and not batches:
            self._ended = True
        # Ranks step together while any has data, so no rank's tail is dropped and no
        # collective hangs; any rank's need to commit is every rank's checkpoint.
        flags = all_reduce_sum(torch.tensor([float(bool(batches)), float(pending)], device=self.dist.device))
        any_data, any_commit = (bool(v > 0) for v in flags.tolist())
        if not any_data and not any_commit:
            return None
        if any_data and not batches:
            batches = [self._empty_batch()]
        self._held.extend(sid for b in batches for sid in b.sample_ids)
        return StepData(batches if any_data else [], commit=any_commit)

    def _empty_batch(self) -> TrainBatch:
        """A batch with nothing to learn (all masks false), for a rank whose stream has
        ended or paused while another's has not: it keeps every collective in step."""
        h = self.hidden_size
        return TrainBatch(input_ids=torch.zeros(1, 2, dtype=torch.int64),
                          loss_mask=torch.zeros(1, 2, dtype=torch.uint8), aux_hidden=torch.zeros(1, 2, 3 * h),
                          last_hidden=torch.zeros(1, 2, h), lengths=torch.tensor([2]), sample_ids=())

    def committed(self) -> None:
        """A checkpoint holding every sample handed out so far is published: free them
        (in order, off the training thread), and let a paused loader go on."""
        held, self._held = self._held, []
        if held:
            self.source.commit(held)
        self.loader.resume()

    def data_position(self, step: int) -> dict:
        return {}  # arrival order: the claims are the position

    def epoch_of(self, step: int) -> float:
        return self.order.epoch_of(step)  # samples read so far over the run's samples

    def why_exhausted(self) -> str:
        return self.source.why_exhausted()

    def close(self, failed: bool = False) -> None:
        super().close()
        self.source.close(raise_errors=not failed)
