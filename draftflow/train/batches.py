"""TrainBatch (the only record carrying tensors) and the feature loader.

The loader turns a deterministic sample order into micro-batches: it resolves
indices to refs through a ref source, reads features through the FeatureStore
contract, and pads them into a TrainBatch. It knows no backend and no role, so a
colocated and a consumer run build byte-identical batches from the same order.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from draftflow.features_codec import decode_features
from draftflow.records import SampleRef


@dataclass(frozen=True, slots=True)
class TrainBatch:
    input_ids: torch.Tensor  # int64 [B, T], zero-padded on the right
    loss_mask: torch.Tensor  # uint8 [B, T]
    aux_hidden: torch.Tensor  # [B, T, 3H]
    last_hidden: torch.Tensor  # [B, T, H]
    lengths: torch.Tensor  # int64 [B]
    sample_ids: tuple[str, ...]

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(*(t.to(device, non_blocking=True) for t in
                            (self.input_ids, self.loss_mask, self.aux_hidden, self.last_hidden, self.lengths)),
                          self.sample_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def collate(features: list[dict[str, torch.Tensor]], sample_ids: list[str], pin_memory: bool = False) -> TrainBatch:
    """Zero-padded batch, each tensor on its features' device (an online run's features
    stay on the GPU that captured them); pin_memory puts host tensors in page-locked
    memory, from which the copy to a GPU runs asynchronously at full PCIe rate (a
    pageable copy is staged)."""
    lengths = [int(f["input_ids"].shape[0]) for f in features]
    t = max(lengths)

    def stack(name: str, dtype=None) -> torch.Tensor:
        first = features[0][name]
        on_host = first.device.type == "cpu"
        out = torch.zeros((len(features), t, *first.shape[1:]), dtype=dtype or first.dtype, device=first.device,
                          pin_memory=pin_memory and on_host)
        for i, f in enumerate(features):
            out[i, : lengths[i]] = f[name]
        return out

    return TrainBatch(input_ids=stack("input_ids", torch.int64), loss_mask=stack("loss_mask", torch.uint8),
                      aux_hidden=stack("aux_hidden"), last_hidden=stack("last_hidden"),
                      lengths=torch.tensor(lengths, dtype=torch.int64), sample_ids=tuple(sample_ids))


class EndOfStream(Exception):
    """A ref source has no more samples (a consume-once stream of a sealed run)."""


class Pending(Exception):
    """A ref source has nothing to hand out until the samples it already handed out
    are trained (consume-once: waiting on other consumers' claims while holding claims
    of our own could deadlock two consumers that each wait on the other's)."""


PENDING = "pending"  # FeatureLoader.next: commit what was trained, then ask again


class RefSource(Protocol):
    """Maps a sample index to its ref; a streaming source blocks until it exists."""

    num_samples: int

    def resolve(self, index: int) -> SampleRef: ...


class ListRefSource:
    """Refs already in hand (colocated runs, sealed manifests)."""

    def __init__(self, refs: list[SampleRef]):
        self.refs = sorted(refs, key=lambda r: r.index)
        if [r.index for r in self.refs] != list(range(len(self.refs))):
            raise ValueError("refs must cover sample indices 0..N-1 exactly once")
        self.num_samples = len(self.refs)
        self.num_tokens = sum(r.num_tokens for r in self.refs)

    def resolve(self, index: int) -> SampleRef:
        return self.refs[index]


@dataclass(frozen=True, slots=True)
class SampleOrder:
    """Which samples each rank trains at each step, as a pure function of the step.

    The global stream is the concatenation of per-epoch permutations (seeded by
    seed and epoch), so there is no tail drop and no repeat within an epoch; each
    optimizer step takes the next world*accum*batch samples of the stream. Because
    the order is a function of the step, resuming needs only the step and the
    stream position it reached (`origin`), which a checkpoint keeps: a run resumed
    on another number of ranks continues the stream where the checkpoint left it.
    """

    num_samples: int
    seed: int
    batch_size: int
    grad_accum: int
    world_size: int = 1
    rank: int = 0
    origin: tuple[int, int] = (0, 0)  # (step, stream position at that step)

    @property
    def per_step(self) -> int:
        return self.world_size * self.grad_accum * self.batch_size

    def epoch_perm(self, epoch: int) -> tuple[int, ...]:
        return _epoch_perm(self.seed, self.num_samples, epoch)

    def start_of(self, step: int) -> int:
        """Stream position of the first sample of `step`."""
        origin_step, origin_position = self.origin
        return origin_position + (step - origin_step) * self.per_step

    def micro_batches(self, step: int) -> list[list[int]]:
        start = self.start_of(step)
        out = []
        for m in range(self.grad_accum):
            first = start + (m * self.world_size + self.rank) * self.batch_size
            out.append([self.position(p) for p in range(first, first + self.batch_size)])
        return out

    def position(self, p: int) -> int:
        epoch, offset = divmod(p, self.num_samples)
        return self.epoch_perm(epoch)[offset]

    def epoch_of(self, step: int) -> float:
        return self.start_of(step) / self.num_samples


@functools.lru_cache(maxsize=4)
def _epoch_perm(seed: int, num_samples: int, epoch: int) -> tuple[int, ...]:
    """The seeded order of one epoch (cached: every sample of a step looks it up)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_samples, generator=g).tolist())


class FeatureLoader:
    """Prefetches the micro-batches of upcoming steps in a background thread.

    ordered: each item belongs to one step of `order` (a seeded order); otherwise
    (arrival order, consume-once) only the micro-batch sizes come from `order`.
    When the source raises `Pending` with nothing in hand, the loader hands out
    `PENDING` (after the steps already queued) and waits for `resume()`: the trainer
    must first commit what it trained, which frees the claims others may wait on.
    """

    def __init__(self, store, source: RefSource, order: SampleOrder, start_step: int, end_step: int,
                 check_ref=None, prefetch_steps: int = 2, pin_memory: bool = False, ordered: bool = True):
        self.store, self.source, self.order = store, source, order
        self.pin_memory, self.ordered = pin_memory, ordered
        self.check_ref = check_ref or (lambda ref: None)
        self.ended = False
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch_steps)
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._resumed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start_step, end_step), daemon=True)
        self._thread.start()

    def load_step(self, step: int) -> tuple[list[TrainBatch], bool]:
        """The micro-batches of one step, and whether the source was Pending: fewer or
        smaller ones when a stream ends or pauses inside the step (the tail is
        trained, not dropped); none once it has ended."""
        batches, pending = [], False
        for indices in self.order.micro_batches(step):
            refs = []
            try:
                for i in indices:
                    refs.append(self.source.resolve(i))
            except Pending:
                pending = True  # train what this step holds; the source is not finished
            except EndOfStream:
                self.ended = True
            if not refs:
                break
            for ref in refs:
                self.check_ref(ref)
            leases = [self.store.get(ref) for ref in refs]
            try:
                # collate copies into fresh padded tensors, so leases can go at once
                # (a Mooncake lease's buffer slot is reused after release).
                batches.append(collate([self._decoded(l) for l in leases], [l.ref.sample_id for l in leases],
                                       self.pin_memory))
            finally:
                for lease in leases:
                    self.store.release(lease)
            if self.ended or pending:
                break
        return batches, pending

    def _decoded(self, lease) -> dict[str, torch.Tensor]:
        """A lease's tensors with FP8 features decoded (features_codec): to bfloat16 for
        pinned batches, which go to a GPU where the draft computes in bfloat16, to
        float32 on a CPU, where it computes in float32."""
        dtype = torch.bfloat16 if self.pin_memory else torch.float32
        return decode_features(lease.tensors, dtype, f"sample {lease.ref.sample_id!r} ({lease.ref.uri})")

    def _run(self, start: int, end: int) -> None:
        try:
            step = start
            while step < end:
                batches, pending = self.load_step(step)
                if not batches and pending:  # the trainer must commit first (see class docstring)
                    self._resumed.clear()
                    if not self._put((step, PENDING)):
                        return
                    while not self._resumed.wait(0.1):
                        if self._stop.is_set():
                            return
                    continue
                if not self._put((step, batches)) or not batches:
                    return
                step += 1
        except BaseException as e:  # surface loader failures in the training thread (unless closed)
            self._put((None, e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def resume(self) -> None:
        """The trainer committed: a loader waiting after `PENDING` tries again."""
        self._resumed.set()

    def fail(self, error: BaseException) -> None:
        """Make the trainer's next `next` raise `error` (a failure elsewhere, e.g. in the
        consume-once bookkeeping, that this loader may be waiting on forever)."""
        try:
            self.queue.put_nowait((None, error))
        except queue.Full:
            pass  # the trainer is not waiting: the failure's owner raises it itself

    def next(self, step: int):
        """The step's micro-batches; an empty list once the source has ended; `PENDING`
        when the trainer must commit before more can come."""
        t0 = time.perf_counter()
        got_step, item = self.queue.get()
        self.wait_s += time.perf_counter() - t0
        if got_step is None:
            raise item
        if self.ordered and got_step != step:
            raise RuntimeError(f"loader out of step: got {got_step}, expected {step}")
        return item

    def close(self) -> None:
        self._stop.set()
