"""TTT attention: the fused-kernel merge equals the reference math, gradients included."""

import pytest
import torch

from draftflow.train.model import Attention, DraftModelConfig
from draftflow.train.ttt_attention import compiled_merge, reference_ttt_attention, ttt_attention

SCALE = 8 ** -0.5


def inputs(num_steps: int, t: int = 13, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r():
        return (torch.randn(2, 3, t, 8, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)

    return r(), [r() for _ in range(num_steps)], [r() for _ in range(num_steps)]


def dense_float64(q, keys, values):
    """The same attention written as one softmax over the union of keys, all in float64
    (the model's reference rounds its softmax to float32, too coarse to compare gradients)."""
    t = q.shape[2]
    scores = [torch.matmul(q, keys[0].transpose(-1, -2)) * SCALE]
    scores[0] = scores[0].masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    scores += [(q * k).sum(-1, keepdim=True) * SCALE for k in keys[1:]]
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    out = torch.matmul(probs[..., :t], values[0])
    for j, v in enumerate(values[1:]):
        out = out + probs[..., t + j : t + j + 1] * v
    return out


def out_and_grads(fn, q, keys, values):
    out = fn(q, keys, values)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), [q, *keys, *values])
    return out, grads


@pytest.mark.parametrize("kernel", ["math", "flash_cpu"])
@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_merged_attention_matches_reference_with_gradients(kernel, num_steps):
    q, keys, values = inputs(num_steps)
    exact, exact_grads = out_and_grads(dense_float64, q, keys, values)
    ref, ref_grads = out_and_grads(lambda *a: reference_ttt_attention(*a, SCALE), q, keys, values)
    got, got_grads = out_and_grads(lambda *a: ttt_attention(*a, SCALE, kernel=kernel), q, keys, values)
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # the reference is float32 inside
    for g, e, r in zip(got_grads, exact_grads, ref_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_compiled_merge_gives_the_eager_output_and_gradients():
    """train.compile's merge (fused graphs, dynamic in T) computes what the eager one
    does, across sequence lengths and unroll steps (step 0 has nothing to merge)."""
    for t, num_steps in [(13, 3), (21, 3), (9, 1), (17, 5)]:
        q, keys, values = inputs(num_steps, t=t, seed=t)
        eager, eager_grads = out_and_grads(lambda *a: ttt_attention(*a, SCALE, kernel="math"), q, keys, values)
        got, got_grads = out_and_grads(lambda *a: ttt_attention(*a, SCALE, kernel="math", merge=compiled_merge()),
                                       q, keys, values)
        torch.testing.assert_close(got, eager, rtol=1e-10, atol=1e-12)
        for g, e in zip(got_grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_merged_attention_passes_gradcheck():
    q, keys, values = inputs(3, t=5)
    assert torch.autograd.gradcheck(lambda q, *kv: ttt_attention(q, list(kv[:3]), list(kv[3:]), SCALE, kernel="math"),
                                    (q, *keys, *values))


def test_auto_on_cpu_is_the_reference_bit_for_bit():
    """CPU runs keep the exact numbers of earlier runs (resume, bit-exactness tests)."""
    q, keys, values = inputs(4)
    assert torch.equal(ttt_attention(q, keys, values, SCALE), reference_ttt_attention(q, keys, values, SCALE))


def test_reference_equals_model_attend_ttt():
    cfg = DraftModelConfig(hidden_size=12, intermediate_size=16, num_attention_heads=3, num_key_value_heads=3,
                           head_dim=8, vocab_size=20, draft_vocab_size=20, target_hidden_size=12,
                           rms_norm_eps=1e-6, max_position_embeddings=64, aux_layer_ids=(0, 1, 2))
    attn = Attention(cfg).double()
    q, keys, values = inputs(3)
    b, nh, t, hd = q.shape
    mine = attn.o_proj(reference_ttt_attention(q, keys, values, SCALE).transpose(1, 2).reshape(b, t, nh * hd))
    assert torch.equal(mine, attn.attend_ttt(q, keys, values))


def test_unknown_kernel_is_refused_with_the_choices():
    q, keys, values = inputs(1)
    with pytest.raises(ValueError, match="kernel 'triton' unknown.*flash_cuda"):
        ttt_attention(q, keys, values, SCALE, kernel="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_merge_on_cuda_matches_float32_reference():
    g = torch.Generator().manual_seed(0)
    q, *kv = [torch.randn(1, 4, 300, 64, generator=g).cuda().bfloat16().requires_grad_(True) for _ in range(7)]
    weight = torch.randn(1, 4, 300, 64, generator=g).cuda()
    got = ttt_attention(q, kv[:3], kv[3:], 0.125)
    got_grads = torch.autograd.grad((got.float() * weight).sum(), [q, *kv])
    ref_in = [x.detach().float().requires_grad_(True) for x in (q, *kv)]
    ref = reference_ttt_attention(ref_in[0], ref_in[1:4], ref_in[4:], 0.125)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in)
    for a, b in zip((got, *got_grads), (ref, *ref_grads)):
        assert float((a.detach().float() - b.detach()).norm() / b.detach().norm()) < 2e-2
