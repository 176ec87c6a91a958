"""Memory-efficient test-time-training (TTT) attention.

Unroll step k of EAGLE3 training lets each query see the causal prefix of step 0
plus, at its own position only, the keys of steps 1..k (see
`Attention.attend_ttt` in model.py, the reference, which builds [B, nh, T, T]
scores). Here the causal prefix runs through a fused flash-attention kernel that
also returns the log-sum-exp `lse0` of each query's scores, and the k diagonal
terms are merged in exactly:

    m   = max(lse0, s_1..s_k)
    out = (exp(lse0 - m) out0 + sum_j exp(s_j - m) v_j) / (exp(lse0 - m) + sum_j exp(s_j - m))

so nothing of size [T, T] is ever materialised.

The fused kernel's own backward treats `lse0` as a constant, so the merge has
its own autograd rule: the prefix part of the gradient is the kernel's backward
called with the *merged* output and `a * dout` (a = weight of the prefix), which
is exactly the softmax gradient over the union of keys (the trick ring attention
uses to merge blocks); the diagonal part is a few [B, nh, T, hd] products.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch


def reference_ttt_attention(q: torch.Tensor, keys: list, values: list, scale: float) -> torch.Tensor:
    """The reference math of `Attention.attend_ttt` (before o_proj): q, keys[j],
    values[j] are [B, nh, T, hd]; returns [B, nh, T, hd]. Materialises [T, T]."""
    t = q.shape[2]
    scores0 = torch.matmul(q, keys[0].transpose(-1, -2)) * scale  # [B, nh, T, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores0 = scores0.masked_fill(~causal, float("-inf"))
    diag = [(q * k).sum(-1, keepdim=True) * scale for k in keys[1:]]  # each [B, nh, T, 1]
    probs = torch.softmax(torch.cat([scores0, *diag], dim=-1).float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs[..., :t], values[0])
    for j, v in enumerate(values[1:]):
        out = out + probs[..., t + j : t + j + 1] * v
    return out


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (half inputs accumulate in float32; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---- causal kernels -----------------------------------------------------------------
# forward(q, k, v, scale) -> (out, lse [B, nh, T] in float32, state): `state` is whatever
# else the kernel's backward needs from its forward. backward(dout, q, k, v, out, lse,
# state, scale) -> (dq, dk, dv) uses the given `out` for the D = rowsum(dout * out) term,
# which is what lets the merge below hand in the merged output.

def _math_forward(q, k, v, scale):
    """Plain math; for CPU and for tests (float64), where [T, T] is fine."""
    t = q.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(_acc(s), dim=-1)
    p = torch.exp(_acc(s) - lse[..., None]).to(q.dtype)
    return torch.matmul(p, v), lse, ()


def _math_backward(dout, q, k, v, out, lse, state, scale):
    t = q.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    p = torch.exp(_acc(s) - lse[..., None]).masked_fill(~causal, 0.0).to(q.dtype)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    delta = (dout * out).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


def _flash_cuda_forward(q, k, v, scale):
    out, lse, *state = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    # state: cum_seq_q, cum_seq_k, max_q, max_k, philox seed, philox offset, debug mask;
    # handed back unchanged, as torch's own autograd formula does.
    return out, lse, tuple(state[:6])


def _flash_cuda_backward(dout, q, k, v, out, lse, state, scale):
    cum_q, cum_k, max_q, max_k, seed, offset = state
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset,
        scale=scale)


def _flash_cpu_forward(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, ()


def _flash_cpu_backward(dout, q, k, v, out, lse, state, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse, 0.0, True, scale=scale)


KERNELS = {
    "math": (_math_forward, _math_backward),
    "flash_cuda": (_flash_cuda_forward, _flash_cuda_backward),
    "flash_cpu": (_flash_cpu_forward, _flash_cpu_backward),
}


# ---- the merge ----------------------------------------------------------------------
# Pure tensor functions, so that `train.compile` can fuse each into a few kernels (eager,
# every fp32 product and conversion over [B, nh, T, hd] is a kernel of its own: ~150 per
# optimizer step for 7 unroll steps). keys/values here are the diagonal ones (steps 1..k).

def merge_forward(out0, lse0, q, keys, values, scale):
    """(out, w): the merged output in q's dtype and the weights w [B, nh, T, 1 + k]
    (float32) of the prefix and of each diagonal key."""
    # log-weights: the whole prefix as one term, then each diagonal key
    logw = torch.cat([_acc(lse0[..., None])] + [_acc((q * k).sum(-1, keepdim=True)) * scale for k in keys], dim=-1)
    w = torch.softmax(logw, dim=-1)  # exp(logw - m) / sum, computed stably
    out = _acc(out0) * w[..., :1]
    for j, v in enumerate(values):
        out = out + w[..., 1 + j : 2 + j] * _acc(v)
    return out.to(q.dtype), w


def merge_backward(dout, out, w, q, keys, values, scale):
    """(dout0, dq, dkeys, dvalues): dout0 (q's dtype) is what the prefix kernel's backward
    takes as its output gradient; dq (float32) is the diagonal terms' part of q's
    gradient; dkeys and dvalues those of the diagonal keys and values."""
    dout_f, out_f = _acc(dout), _acc(out)
    # Prefix: softmax over the union of keys restricted to the prefix is w0 * P0, and the
    # kernel's backward with (out=merged, dout=w0*dout) yields w0 * P0 (dout.v - rowsum(dout*out)).
    dout0 = (dout_f * w[..., :1]).to(q.dtype)
    delta = (dout_f * out_f).sum(-1, keepdim=True)
    dq = torch.zeros_like(dout_f)
    dkeys, dvalues = [], []
    for j, (k, v) in enumerate(zip(keys, values)):
        wj = w[..., 1 + j : 2 + j]
        ds = wj * ((dout_f * _acc(v)).sum(-1, keepdim=True) - delta) * scale  # [B, nh, T, 1]
        dq = dq + ds * _acc(k)
        dkeys.append((ds * _acc(q)).to(q.dtype))
        dvalues.append((wj * dout_f).to(q.dtype))
    return dout0, dq, dkeys, dvalues


def add_dq(dq_prefix, dq_diag):
    """q's whole gradient: the kernel's part plus the diagonal terms', summed in float32."""
    return (_acc(dq_prefix) + dq_diag).to(dq_prefix.dtype)


@dataclass(frozen=True, slots=True)
class Merge:
    """The merge's three functions, eager or compiled (`compiled_merge`)."""

    forward: Callable = merge_forward
    backward: Callable = merge_backward
    add_dq: Callable = add_dq


EAGER_MERGE = Merge()
MAX_COMPILED_MERGE_STEPS = 32  # unroll steps the compiled merge keeps compiled


@functools.cache
def compiled_merge() -> Merge:
    """The merge under torch.compile, one fused graph per unroll step and direction.
    dynamic=True: sequence lengths vary from batch to batch, and each of the up to
    ttt_length - 1 diagonal-key counts already takes a graph of its own; torch's limit
    of graphs per function (8 by default) is raised so that a long unroll (ttt_length
    10 and more) does not fall back to eager for its last steps."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, MAX_COMPILED_MERGE_STEPS)
    return Merge(*(torch.compile(f, dynamic=True) for f in (merge_forward, merge_backward, add_dq)))


class _MergedTTTAttention(torch.autograd.Function):
    """Causal prefix via a fused kernel, merged exactly with the diagonal terms."""

    @staticmethod
    def forward(ctx, kernel: str, scale: float, merge: Merge, q, *kv):
        n = len(kv) // 2
        keys, values = kv[:n], kv[n:]
        fwd, _ = KERNELS[kernel]
        q, k0, v0 = q.contiguous(), keys[0].contiguous(), values[0].contiguous()
        out0, lse0, state = fwd(q, k0, v0, scale)
        ctx.kernel, ctx.scale, ctx.n, ctx.state, ctx.merge = kernel, scale, n, state, merge
        if n == 1:  # step 0: the prefix alone, nothing to merge
            ctx.save_for_backward(q, lse0, out0, k0, v0)
            return out0
        out, w = merge.forward(out0, lse0, q, keys[1:], values[1:], scale)
        ctx.save_for_backward(q, lse0, out, *keys, *values, w)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, lse0, out, *kv = ctx.saved_tensors
        n, scale, merge = ctx.n, ctx.scale, ctx.merge
        _, bwd = KERNELS[ctx.kernel]
        if n == 1:
            dq, dk0, dv0 = bwd(dout.to(q.dtype), q, kv[0], kv[1], out, lse0, ctx.state, scale)
            return (None, None, None, dq, dk0, dv0)
        *kv, w = kv
        keys, values = kv[:n], kv[n:]
        dout0, dq_diag, dkeys, dvalues = merge.backward(dout, out, w, q, keys[1:], values[1:], scale)
        dq, dk0, dv0 = bwd(dout0, q, keys[0].contiguous(), values[0].contiguous(), out, lse0, ctx.state, scale)
        return (None, None, None, merge.add_dq(dq, dq_diag), dk0, *dkeys, dv0, *dvalues)


def pick_kernel(q: torch.Tensor) -> str | None:
    """The fused kernel for this tensor, or None where the reference math is used
    (CPU, where [T, T] fits and bit-exactness with earlier runs matters; fp32 on GPU)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return "flash_cuda"
    return None


def ttt_attention(q: torch.Tensor, keys: list, values: list, scale: float, kernel: str | None = "auto",
                  merge: Merge = EAGER_MERGE):
    """TTT attention of unroll step len(keys) - 1, before o_proj.

    q, keys[j], values[j]: [B, nh, T, hd] (kv heads already repeated). kernel
    "auto" picks flash attention on CUDA in half precision and the reference math
    elsewhere; tests name "math" or "flash_cpu" to run the merge on CPU. merge: the
    merge's functions, eager or `compiled_merge()` (`train.compile`).
    """
    if kernel == "auto":
        kernel = pick_kernel(q)
    if kernel is None:
        return reference_ttt_attention(q, keys, values, scale)
    if kernel not in KERNELS:
        raise ValueError(f"ttt_attention: kernel {kernel!r} unknown; expected one of {sorted(KERNELS)} or 'auto'")
    return _MergedTTTAttention.apply(kernel, scale, merge, q, *keys, *values)
