"""Run the frozen target over prepared samples and publish their features to a store.

Per sample (DESIGN.md section 3): input_ids [T], loss_mask [T], aux_hidden [T, 3H] (the
outputs of the three aux decoder layers, concatenated in ascending layer order) and
last_hidden [T, H] (the final post-norm hidden state, the input of lm_head).

Features come from forward hooks on the three aux layers and the final norm, so only
those tensors are kept (output_hidden_states would hold every layer), and the base
model is called without its lm_head: the logits are never computed here.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from draftflow.capture.target import LoadedTarget, validate_aux_layer_ids
from draftflow.config import DEVICES, FLOAT_DTYPES
from draftflow.features_codec import encode_features, is_scaled
from draftflow.records import SampleRef

_DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPES}


def resolve_device_dtype(capture_cfg) -> tuple[torch.device, torch.dtype]:
    """capture.device / capture.dtype -> (device, dtype); "auto" picks cuda+bfloat16 or cpu+float32."""
    name = capture_cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"capture.device: {name!r} is not a torch device "
                         f"(expected one of {', '.join(DEVICES)})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"capture.device: {name!r} asked for, but CUDA is not available here")
    if capture_cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if capture_cfg.dtype not in _DTYPES:
        raise ValueError(f"capture.dtype: {capture_cfg.dtype!r} is not one of {['auto', *_DTYPES]}")
    return device, _DTYPES[capture_cfg.dtype]


@dataclass(frozen=True, slots=True)
class _Item:
    """One sample to capture, its tokens already as tensors."""

    sample_id: str
    index: int
    input_ids: torch.Tensor  # int64 [T]
    loss_mask: torch.Tensor  # uint8 [T]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def capture_features(target: LoadedTarget, aux_layer_ids: Sequence[int], samples: Iterable, store,
                     capture_cfg, feature_dtype: torch.dtype = torch.bfloat16,
                     progress: bool = True, publish: bool = True) -> list[SampleRef]:
    """Capture and publish the features of every sample; return refs in sample index order.

    `samples` are objects with .sample_id, .index, .input_ids and .loss_mask. Batches are
    packed from all samples, published or not, so a sample is always computed in the same
    batch: floating-point results depend on a batch's shape, and a rerun after a crash
    must write the features an uninterrupted run would have written. A batch whose
    samples are all published is skipped without running the target; a partly published
    one is recomputed and only its missing samples are put. `publish` false: run the
    forwards only (a tensor-parallel group member whose leader publishes the features).
    """
    aux_layer_ids = validate_aux_layer_ids(aux_layer_ids, len(target.model.model.layers))
    if capture_cfg.batch_tokens <= 0:
        raise ValueError(f"capture.batch_tokens: expected a positive token budget, got {capture_cfg.batch_tokens}")
    items = [_to_item(s) for s in samples]
    _check_unique(items)
    refs: dict[int, SampleRef] = {}
    for item in items:
        ref = store.lookup(item.sample_id, item.index)
        if ref is None:
            continue
        if ref.num_tokens != item.num_tokens:
            raise ValueError(f"sample {item.sample_id!r}: the store already holds it with {ref.num_tokens} "
                             f"tokens, the prepared sample has {item.num_tokens} (store filled from other data?)")
        refs[item.index] = ref
    batches = [b for b in pack_batches(items, capture_cfg.batch_tokens) if any(i.index not in refs for i in b)]
    batch_dtype, encode_as = _feature_dtypes(target.model, feature_dtype)
    bar = tqdm(total=sum(i.num_tokens for b in batches for i in b), unit="tok", unit_scale=True,
               desc="capture", disable=not progress)
    with bar, _FeatureHooks(target.model, aux_layer_ids) as hooks, ThreadPoolExecutor(1) as writer:
        # One writer thread publishes batch n while the target runs batch n+1; waiting
        # on the oldest write keeps at most two batches of features in host memory.
        writes: deque = deque()
        for batch in batches:
            if not publish:  # the forward's collectives need every rank of the group; the copies do not
                _run_forward(target.model, batch)
                hooks.take()
                bar.update(sum(i.num_tokens for i in batch))
                continue
            features = _run_batch(target.model, hooks, batch, batch_dtype)
            missing = [(i, f) for i, f in zip(batch, features) if i.index not in refs]
            writes.append(writer.submit(_publish, store, missing, encode_as))
            bar.update(sum(i.num_tokens for i in batch))
            if len(writes) > 1:
                refs.update(writes.popleft().result())
        while writes:
            refs.update(writes.popleft().result())
    return [refs[i] for i in sorted(refs)]


def _feature_dtypes(model, feature_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype features leave the forward in, dtype the writer encodes them to or None).
    FP8 needs scales: features leave the forward in the target's own precision and the
    writer thread scales them, per sample, while the target runs the next batch."""
    if is_scaled(feature_dtype):
        return next(model.parameters()).dtype, feature_dtype
    return feature_dtype, None


def _publish(store, items_features: list[tuple[_Item, dict]], encode_as: torch.dtype | None = None
             ) -> dict[int, SampleRef]:
    if encode_as is not None:
        items_features = [(item, encode_features(f, encode_as)) for item, f in items_features]
    return {item.index: store.put(item.sample_id, item.index, f) for item, f in items_features}


def _to_item(sample) -> _Item:
    input_ids = torch.as_tensor(sample.input_ids, dtype=torch.int64).reshape(-1)
    loss_mask = torch.as_tensor(sample.loss_mask).reshape(-1)
    where = f"sample {sample.sample_id!r} (index {sample.index})"
    if input_ids.numel() == 0:
        raise ValueError(f"{where}: has no tokens")
    if loss_mask.shape != input_ids.shape:
        raise ValueError(f"{where}: loss_mask has {loss_mask.numel()} entries, input_ids {input_ids.numel()}")
    if not bool(((loss_mask == 0) | (loss_mask == 1)).all()):
        raise ValueError(f"{where}: loss_mask must hold only 0 and 1")
    return _Item(sample.sample_id, int(sample.index), input_ids, loss_mask.to(torch.uint8))


def _check_unique(items: Sequence[_Item]) -> None:
    seen_ids, seen_indices = set(), set()
    for item in items:
        if item.sample_id in seen_ids or item.index in seen_indices:
            raise ValueError(f"sample {item.sample_id!r} (index {item.index}): duplicate sample id or index")
        seen_ids.add(item.sample_id)
        seen_indices.add(item.index)


def pack_batches(items: Sequence[_Item], batch_tokens: int) -> list[list[_Item]]:
    """Group items by length so that each batch's padded size (max_len * n) <= batch_tokens.

    Longest first, so a batch that would not fit in memory fails at once, not at the end.
    A sample longer than the budget runs alone (it cannot be split).
    """
    ordered = sorted(items, key=lambda i: (-i.num_tokens, i.index))
    batches: list[list[_Item]] = []
    for item in ordered:
        # The first item of a batch is its longest, so it sets the padded length.
        if batches and batches[-1][0].num_tokens * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


class _FeatureHooks:
    """Forward hooks that keep the outputs of the aux layers and of the final norm."""

    def __init__(self, model: torch.nn.Module, aux_layer_ids: Sequence[int]):
        self.aux_layer_ids = list(aux_layer_ids)
        self.outputs: dict[str, torch.Tensor] = {}
        modules = {f"layer{i}": model.model.layers[i] for i in self.aux_layer_ids}
        modules["norm"] = model.model.norm
        self._modules = modules
        self._handles = []

    def __enter__(self) -> "_FeatureHooks":
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._keeper(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()

    def _keeper(self, name: str):
        def hook(module, args, output):
            # Decoder layers return a tensor in transformers 5, a tuple in older versions.
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux [B, T, 3H], last [B, T, H]) of the forward that just ran; forgets them."""
        last = self.outputs["norm"]
        # Under capture.parallel pipeline the layers sit on several GPUs: gather on the last's.
        aux = torch.cat([self.outputs[f"layer{i}"].to(last.device) for i in self.aux_layer_ids], dim=-1)
        self.outputs.clear()
        return aux, last


def padded_lengths(items: Sequence[_Item], batch_tokens: int) -> dict[int, int]:
    """Sample index -> the length `pack_batches` pads it to (its batch's longest sample).

    A sample's features depend, at rounding level, on the length its forward is padded
    to (attention reduces over the padded keys), not on the other rows of the batch:
    an online run captures each sample padded to this length, in whatever company, and
    gets the features an offline capture of the same samples stores."""
    return {item.index: batch[0].num_tokens for batch in pack_batches(items, batch_tokens) for item in batch}


def pad_batch(batch: Sequence[_Item], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [n, pad_to] and attention mask of a packed batch (longest
    first; `pad_to` defaults to the first sample's length)."""
    input_ids = torch.zeros(len(batch), pad_to or batch[0].num_tokens, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for row, item in enumerate(batch):
        input_ids[row, :item.num_tokens] = item.input_ids
        attention_mask[row, :item.num_tokens] = 1
    return input_ids, attention_mask


def _run_forward(model, batch: list[_Item], pad_to: int | None = None) -> None:
    """One right-padded forward over `batch` (the hooks keep what capture needs).

    Right padding with a causal model: a real position only attends to earlier
    positions, all real, and the mask also hides padding keys. Padding positions are
    computed and then dropped; they never feed a real token's features."""
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_batch(batch, pad_to)
    with torch.inference_mode():
        model.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)


def _run_batch(model, hooks: _FeatureHooks, batch: list[_Item], feature_dtype: torch.dtype,
               pad_to: int | None = None, to_host: bool = True) -> list[dict]:
    """One right-padded forward over `batch`; the feature tensors of each sample, on CPU
    (`to_host` false: where the target ran, for a trainer on the same device)."""
    _run_forward(model, batch, pad_to)
    with torch.inference_mode():
        aux, last = hooks.take()
        aux, last = aux.to(feature_dtype), last.to(feature_dtype)
        if aux.is_cuda and to_host:
            return _to_pinned_samples(batch, aux, last)
        if to_host:
            aux, last = aux.cpu(), last.cpu()
    return [{"input_ids": item.input_ids, "loss_mask": item.loss_mask,
             "aux_hidden": aux[row, :item.num_tokens].clone(), "last_hidden": last[row, :item.num_tokens].clone()}
            for row, item in enumerate(batch)]


def _to_pinned_samples(batch: list[_Item], aux: torch.Tensor, last: torch.Tensor) -> list[dict]:
    """Each sample's rows copied straight from the GPU into its own pinned host tensors.

    A pageable `.cpu()` of a whole batch is staged and faults in fresh pages, then each
    sample had to be cloned out of it; pinned copies run at the link's rate, and
    PyTorch's caching host allocator hands the same pinned blocks back once the store
    has let go of them (docs/benchmarks.md has the rates).
    """
    out = []
    for row, item in enumerate(batch):
        n = item.num_tokens
        a = torch.empty((n, aux.shape[-1]), dtype=aux.dtype, pin_memory=True)
        h = torch.empty((n, last.shape[-1]), dtype=last.dtype, pin_memory=True)
        a.copy_(aux[row, :n], non_blocking=True)
        h.copy_(last[row, :n], non_blocking=True)
        out.append({"input_ids": item.input_ids, "loss_mask": item.loss_mask, "aux_hidden": a, "last_hidden": h})
    torch.cuda.current_stream(aux.device).synchronize()  # the host tensors are complete from here
    return out
