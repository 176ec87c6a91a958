"""How hidden-state features are stored: a plain float dtype, or FP8 with scales.

`features.dtype: float8_e4m3fn` halves the bytes of bf16 features. Each token's row
of a hidden feature is scaled so that its largest magnitude lands on FP8's largest
finite value (448), then rounded to FP8; the float32 scales travel beside it as
features of their own (`aux_hidden_scale`, `last_hidden_scale`), so the store's
specs, checksums and the signed refs cover them exactly like the data.

Granularity: one scale per token and per captured layer, i.e. `aux_hidden_scale`
is [T, 3] (the three layers concatenated in `aux_hidden` differ in magnitude: 17x
on SmolLM2) and `last_hidden_scale` is [T, 1]. Per-token scales depend on that token
alone, so the bytes of a sample never depend on what it was batched with,
and a stream can encode token by token. benchmarks/fp8_scales_smollm2.py measures
this choice against per-token and per-channel scales on SmolLM2's real hidden
states (docs/benchmarks.md has the numbers).

Encoding is on the producer's side, decoding when the loader builds batches; the
trainer sees the same TrainBatch as with any other dtype.
"""

from __future__ import annotations

from typing import Mapping

import torch

FP8_NAME = "float8_e4m3fn"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALED_FEATURES = ("aux_hidden", "last_hidden")
SCALE_SUFFIX = "_scale"
PLAIN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def scale_name(feature: str) -> str:
    return feature + SCALE_SUFFIX


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype for `features.dtype`; an FP8 name on a torch without FP8 is a
    ValueError naming the key and the torch version."""
    if name in PLAIN_DTYPES:
        return PLAIN_DTYPES[name]
    if name != FP8_NAME:
        raise ValueError(f"features.dtype: {name!r} is not one of {[*PLAIN_DTYPES, FP8_NAME]}")
    dtype = getattr(torch, FP8_NAME, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"features.dtype: {FP8_NAME} needs torch.{FP8_NAME}, which torch {torch.__version__} "
                         "lacks (it came with torch 2.1); upgrade torch or use features.dtype=bfloat16")
    return dtype


def is_scaled(dtype: torch.dtype) -> bool:
    """Whether features of `dtype` are stored with scales (FP8)."""
    return str(dtype) == f"torch.{FP8_NAME}"


def num_scale_groups(feature: str, width: int) -> int:
    """Scales per token: one per captured layer in aux_hidden, one for last_hidden."""
    return 3 if feature == "aux_hidden" and width % 3 == 0 else 1


def quantize(x_td: torch.Tensor, num_groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> (FP8 [T, D], float32 scales [T, num_groups]) with x ~= q * scale,
    each group of D / num_groups columns of a row scaled on its own."""
    t, d = x_td.shape
    x = x_td.float().reshape(t, num_groups, d // num_groups)
    low, high = torch.aminmax(x, dim=-1)  # one pass; faster than abs().amax() on a CPU
    amax = torch.maximum(-low, high)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("features hold inf or NaN, which FP8 cannot store")
    # An all-zero group keeps scale 1 (its zeros are exact); others map their max to 448.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # Rounding of x / scale can overshoot 448 by an ulp; the clamp keeps it finite.
    q = (x / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(dtype)
    return q.reshape(t, d), scale


def dequantize(q_td: torch.Tensor, scale_tg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 [T, D] and scales [T, G] -> [T, D] in `dtype`."""
    t, d = q_td.shape
    g = scale_tg.shape[-1]
    out = q_td.to(dtype).reshape(t, g, d // g)
    return out.mul_(scale_tg.to(dtype)[..., None]).reshape(t, d)


def encode_features(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One sample's features as stored: hidden features in `dtype` (with their scales
    when it is FP8), the others unchanged."""
    out = dict(tensors)
    for name in SCALED_FEATURES:
        x = out[name]
        if is_scaled(dtype):
            out[name], out[scale_name(name)] = quantize(x, num_scale_groups(name, x.shape[-1]), dtype)
        else:
            out[name] = x.to(dtype).contiguous()
    return out


def decode_features(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, where: str = "sample"
                    ) -> dict[str, torch.Tensor]:
    """The features with FP8 ones decoded to `dtype` and their scales dropped; a sample
    without FP8 features comes back as it is (no copy)."""
    if not any(scale_name(n) in tensors or is_scaled(tensors[n].dtype) for n in SCALED_FEATURES if n in tensors):
        return dict(tensors)
    out = dict(tensors)
    for name in SCALED_FEATURES:
        q, scale = out.get(name), out.pop(scale_name(name), None)
        if q is None or scale is None or not is_scaled(q.dtype):
            raise ValueError(f"{where}: feature {name!r} is {None if q is None else q.dtype} with "
                             f"{'no' if scale is None else 'a'} {scale_name(name)!r}; FP8 features need "
                             "their scales and scales need FP8 features")
        if scale.dim() != 2 or scale.shape[0] != q.shape[0] or q.shape[-1] % scale.shape[-1]:
            raise ValueError(f"{where}: {scale_name(name)!r} has shape {list(scale.shape)}, which does not fit "
                             f"{name!r} of shape {list(q.shape)}")
        out[name] = dequantize(q, scale, dtype)
    return out
