"""Online capture: the target runs inside the training job, just ahead of the trainer.

`CapturingSource` is the ref source of an online run (`features.backend: memory`).
The trainer's loader asks it for samples in the seeded order (`SampleOrder`), as it
asks a list of stored refs offline; a capture thread walks the same order a few steps
ahead, runs the frozen target over each step's samples and puts their features into
the in-memory store (`stores/memory.py`). The trainer, the loader and the loss are the
offline code: only where the features come from differs.

Same features as offline: each sample is padded to the length an offline capture of
the same samples by the same job pads it to (`padded_lengths` over each rank's shard),
so on CPU an online run trains bit-identically to an offline colocated run of the same
config and number of ranks.

Bounded: the thread captures at most `ahead_steps` steps that the loader has not yet
asked for, and a put waits while the store holds `features.max_inflight_bytes`; the
loader frees each sample once it is in a batch. Memory is the ring, not the data set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Sequence

import torch

from draftflow.capture.capture import (_check_unique, _feature_dtypes, _FeatureHooks, _Item, _run_batch, _to_item,
                                       padded_lengths)
from draftflow.capture.target import LoadedTarget, validate_aux_layer_ids
from draftflow.features_codec import encode_features
from draftflow.records import SampleRef
from draftflow.stores.base import StoreError

log = logging.getLogger("draftflow.capture")

AHEAD_STEPS = 2  # steps captured before the loader asks for them: one in training's shadow, one spare


class CaptureStopped(Exception):
    """The source was closed while the capture thread waited."""


class CapturingSource:
    """Refs of samples captured on demand (see module docstring). `start` begins
    capturing from a step of an order; `resolve` blocks until a sample is captured."""

    def __init__(self, target: LoadedTarget, aux_layer_ids: Sequence[int], samples, store, capture_cfg,
                 feature_dtype: torch.dtype, num_shards: int = 1, ahead_steps: int = AHEAD_STEPS):
        if capture_cfg.batch_tokens <= 0:
            raise ValueError(f"capture.batch_tokens: expected a positive token budget, got {capture_cfg.batch_tokens}")
        self.target, self.store = target, store
        # the dtype features leave the forward in, and the FP8 dtype they are then encoded to (or None)
        self.batch_dtype, self.encode_as = _feature_dtypes(target.model, feature_dtype)
        self.aux_layer_ids = validate_aux_layer_ids(aux_layer_ids, len(target.model.model.layers))
        items = [_to_item(s) for s in samples]
        _check_unique(items)
        self.items = {i.index: i for i in items}
        if sorted(self.items) != list(range(len(items))):
            raise ValueError("online capture: sample indices must be 0..N-1")
        self.batch_tokens = capture_cfg.batch_tokens
        # An offline job of num_shards capture groups packs each group's shard on its own
        # (`CapturePlan.shard`): pad as that packing does.
        self.pad_to = {i: n for g in range(num_shards)
                       for i, n in padded_lengths(items[g::num_shards], capture_cfg.batch_tokens).items()}
        self.num_samples = len(items)
        self.num_tokens = sum(i.num_tokens for i in items)
        self.ahead_steps = ahead_steps
        self._ready: dict[int, deque[SampleRef]] = defaultdict(deque)
        self._unresolved = 0  # captured, not yet asked for
        self.most_unresolved = 0  # the ring's high-water mark (tests, benchmarks)
        self._waiting = 0  # loader calls blocked in `resolve`
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.capture_s = 0.0  # time the thread spent capturing (forwards and puts)

    # ---- the trainer's side (the loader thread)
    def resolve(self, index: int) -> SampleRef:
        with self._cond:
            self._waiting += 1
            try:
                return self._take(index)
            finally:
                self._waiting -= 1

    def _take(self, index: int) -> SampleRef:
        with self._cond:
            while not self._ready[index]:
                if self._error is not None:
                    raise StoreError(f"online capture failed: {type(self._error).__name__}: {self._error}") \
                        from self._error
                if self._stop:
                    raise CaptureStopped(f"online capture closed while sample index {index} was awaited")
                if self._thread is None or not self._thread.is_alive():
                    raise StoreError(f"online capture: sample index {index} was asked for but is not in the "
                                     "capture window (the loader and the capture thread disagree on the order)")
                self._cond.wait(0.5)
            self._unresolved -= 1
            self._cond.notify_all()
            return self._ready[index].popleft()

    def start(self, order, start_step: int, end_step: int) -> None:
        """Capture the samples of `order`'s steps start_step..end_step-1, in order, ahead of the loader."""
        self._thread = threading.Thread(target=self._run, args=(order, start_step, end_step), daemon=True,
                                        name="online-capture")
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:  # raised to the loader if it asked for a sample after it
            log.warning("online capture ended with %s: %s", type(self._error).__name__, self._error)

    # ---- the capture thread
    def _run(self, order, start_step: int, end_step: int) -> None:
        per_step = order.batch_size * order.grad_accum
        device = next(self.target.model.parameters()).device
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # this thread's own CUDA calls go to its rank's GPU
            with _FeatureHooks(self.target.model, self.aux_layer_ids) as hooks:
                for step in range(start_step, end_step):
                    # a whole step more only while at most ahead_steps - 1 are waiting
                    self._wait_until(lambda: self._unresolved <= (self.ahead_steps - 1) * per_step)
                    indices = [i for micro in order.micro_batches(step) for i in micro]
                    for batch, pad_to in self.forwards(indices):
                        self._capture(hooks, batch, pad_to, Counter(indices))
        except CaptureStopped:
            pass
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def forwards(self, indices: list[int]) -> list[tuple[list[_Item], int]]:
        """The forwards that capture `indices`: samples of one padded length share one,
        up to capture.batch_tokens padded tokens (each duplicate index captured once)."""
        by_length: dict[int, list[_Item]] = defaultdict(list)
        for index in dict.fromkeys(indices):
            by_length[self.pad_to[index]].append(self.items[index])
        out = []
        for pad_to in sorted(by_length, reverse=True):
            group = by_length[pad_to]
            per_forward = max(1, self.batch_tokens // pad_to)
            out += [(group[i:i + per_forward], pad_to) for i in range(0, len(group), per_forward)]
        return out

    def _capture(self, hooks: _FeatureHooks, batch: list[_Item], pad_to: int, copies: Counter) -> None:
        """One forward; each sample put once per time the step trains it (a step that
        spans an epoch boundary of a small data set may hold a sample twice)."""
        t0 = time.perf_counter()
        features = _run_batch(self.target.model, hooks, batch, self.batch_dtype, pad_to=pad_to, to_host=False)
        if self.encode_as is not None:  # FP8: scaled per sample, as offline capture stores them
            features = [encode_features(f, self.encode_as) for f in features]
        for item, f in zip(batch, features):
            for _ in range(copies[item.index]):
                # Wait only while the loader is not waiting itself: a step's samples are
                # captured by padded length, not in the order the loader asks for them,
                # so while it waits every put is let in, and a bound smaller than a
                # micro-batch cannot deadlock the two threads.
                ref = self.store.put_when_room(item.sample_id, item.index, f,
                                               until=lambda: self._stop or self._waiting > 0)
                if self._stop or ref is None:
                    raise CaptureStopped
                with self._cond:
                    self._ready[item.index].append(ref)
                    self._unresolved += 1
                    self.most_unresolved = max(self.most_unresolved, self._unresolved)
                    self._cond.notify_all()
        self.capture_s += time.perf_counter() - t0

    def _wait_until(self, condition) -> None:
        with self._cond:
            while not condition():
                if self._stop:
                    raise CaptureStopped
                self._cond.wait(0.5)
            if self._stop:
                raise CaptureStopped


# ---- does the target fit beside the draft?

# Bytes per trainable draft parameter: float32 weight and gradient, AdamW's two moments.
TRAINED_PARAM_BYTES = 16
# The share of the card the weights and optimizer state may take; the rest is left for
# the draft's activations (docs/benchmarks.md: 14-33 GiB at 2k-8k for an 8B-shaped draft),
# the capture forward's and the feature ring.
WEIGHTS_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class OnlineMemory:
    target_bytes: int  # the target's weights in the capture dtype
    draft_bytes: int  # the draft's weights, gradients and optimizer state, and its frozen embedding

    @property
    def total(self) -> int:
        return self.target_bytes + self.draft_bytes


def online_memory_need(hf_config, target_dtype: torch.dtype, draft_cfg) -> OnlineMemory:
    """What an online rank holds before any activation, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    from draftflow.train.model import Eagle3Draft

    with torch.device("meta"):
        target = AutoModelForCausalLM.from_config(hf_config)
        draft = Eagle3Draft(draft_cfg)
    target_bytes = sum(p.numel() for p in target.parameters()) * target_dtype.itemsize
    trained = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    frozen = sum(p.numel() * 4 for p in draft.parameters() if not p.requires_grad)
    return OnlineMemory(target_bytes, trained * TRAINED_PARAM_BYTES + frozen)


def check_online_fits(need: OnlineMemory, device: torch.device, card_bytes: int | None = None) -> None:
    """Refuse an online run whose target and draft state leave too little of the card
    for activations, saying what it needs and which mode to use instead."""
    if card_bytes is None:
        card_bytes = torch.cuda.get_device_properties(device).total_memory
    if need.total <= WEIGHTS_SHARE * card_bytes:
        return
    gib = 2 ** 30
    raise ValueError(
        f"features.backend memory (online): the target's weights take {need.target_bytes / gib:.1f} GiB and the "
        f"draft's weights and optimizer state {need.draft_bytes / gib:.1f} GiB, {need.total / gib:.1f} GiB before "
        f"activations, more than {WEIGHTS_SHARE:.0%} of {device}'s {card_bytes / gib:.1f} GiB. Capture apart from "
        "training instead: an offline colocated run (features.backend local), or a disaggregated run with the "
        "producer on its own GPUs (features.backend shared_dir or mooncake; docs/disaggregated.md)")
