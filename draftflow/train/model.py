"""The EAGLE3 draft model: one Llama decoder layer over the target's features.

Parameter names match SGLang's and vLLM's `LlamaForCausalLMEagle3` loaders exactly
(`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`), so export is a rename-free
copy. Nothing here knows about stores, distribution or checkpoints.

Shapes: B batch, T tokens, H hidden, A = 3H aux features, nh/nkv heads, hd head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from draftflow.train.ttt_attention import EAGER_MERGE, Merge, ttt_attention


@dataclass(frozen=True, slots=True, kw_only=True)
class DraftModelConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int
    aux_layer_ids: tuple[int, ...]  # target decoder layers whose OUTPUTS the draft reads (from 0)
    # EAGLE-3.1 switches, honoured by vLLM and SGLang (export writes them): an RMSNorm
    # over the concatenated aux features before `fc`, and feeding the next draft step
    # the normed (post-`norm`) hidden state instead of the pre-norm one.
    norm_before_fc: bool = False
    norm_output: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DraftModelConfig":
        return cls(**{**d, "aux_layer_ids": tuple(d["aux_layer_ids"])})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: DraftModelConfig) -> torch.Tensor:
    """Inverse frequencies for the target's RoPE variant (default, llama3, yarn, ...),
    computed by transformers' own initialisers so scaled variants match serving."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                     head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                     rope_parameters=dict(cfg.rope_parameters))
    rotary = LlamaRotaryEmbedding(hf)
    return rotary.inv_freq.float().clone(), float(rotary.attention_scaling)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos/sin [B, 1, T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Self-attention whose input is cat(norm(embed), norm(hidden)), i.e. 2H wide."""

    def __init__(self, cfg: DraftModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def project(self, x_bt2h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, nh, T, hd] and k, v [B, nh, T, hd] (kv heads repeated for GQA)."""
        b, t, _ = x_bt2h.shape
        q = self.q_proj(x_bt2h).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x_bt2h).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x_bt2h).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.nh // self.nkv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return q, k, v

    def attend_ttt(self, q, keys: list, values: list, merge: Merge = EAGER_MERGE) -> torch.Tensor:
        """Test-time-training attention for unroll step k = len(keys) - 1.

        Queries of step k see the causal prefix of step 0 (keys[0], values[0]) plus,
        at the same position only, the keys of steps 1..k: exactly what a chain
        draft sees when serving, where step j's token sits right after step j-1's.
        merge: the fused kernel's merge functions (see ttt_attention), eager or compiled.
        """
        out = ttt_attention(q, keys, values, self.hd ** -0.5, merge=merge)  # fused on CUDA; the reference on CPU
        b, nh, t, hd = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg: DraftModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg: DraftModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def qkv(self, embed_bth, hidden_bth, cos, sin):
        x = torch.cat([self.input_layernorm(embed_bth), self.hidden_norm(hidden_bth)], dim=-1)
        return self.self_attn.project(x, cos, sin)

    def finish(self, hidden_bth: torch.Tensor, attn_bth: torch.Tensor) -> torch.Tensor:
        """Residual around attention, then the MLP block; returns the pre-norm hidden
        state that the next draft step is fed (as SGLang does)."""
        hidden = hidden_bth + attn_bth
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftModelConfig):
        super().__init__()
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError("draft: num_attention_heads must be a multiple of num_key_value_heads")
        self.cfg = cfg
        # The target's embedding, frozen; loaded from the target, never exported.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        # Holds no random state (ones), so enabling it leaves every other init unchanged.
        self.input_norm = RMSNorm(3 * cfg.target_hidden_size, cfg.rms_norm_eps) if cfg.norm_before_fc else None
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, positions_bt: torch.Tensor, dtype: torch.dtype):
        freqs = positions_bt.float()[..., None] * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, hd]
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def logits(self, hidden_bth: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_bth))

    def project_aux(self, aux_bta: torch.Tensor) -> torch.Tensor:
        """The target's aux features [.., 3H] -> the draft's step-0 hidden state [.., H]."""
        aux_bta = aux_bta.to(self.fc.weight.dtype)
        if self.input_norm is not None:
            aux_bta = self.input_norm(aux_bta)
        return self.fc(aux_bta)

    def carry(self, hidden_bth: torch.Tensor) -> torch.Tensor:
        """What the next draft step is fed of this step's output: the pre-norm hidden
        state (EAGLE3), or the normed one under `norm_output` (EAGLE-3.1)."""
        return self.norm(hidden_bth) if self.cfg.norm_output else hidden_bth

    def unroll(self, input_ids_bt: torch.Tensor, aux_bta: torch.Tensor, num_steps: int, recompute: bool = False,
               layer=None, merge: Merge = EAGER_MERGE):
        """Test-time training forward: yields (k, hidden_bth) for k = 0..num_steps-1.

        Step k at position t sees the token ids[t + 1 + k] (callers pass ids already
        shifted by one: input_ids_bt[:, t] = ids[t + 1]) and the hidden state the
        draft itself produced at step k-1 (the fc-projected aux features at step 0).
        Step k sits at position t + k, as the k-th chained draft token does when served.

        recompute: keep only each step's inputs, q/k/v and attention output for
        backward and recompute the norms, projections and MLP there: about a fifth
        more compute, and per step about six [T, H]-sized tensors kept instead of
        some twenty plus the MLP's four [T, intermediate] ones. layer: (qkv, finish) to
        run in place of the midlayer's own, e.g. compiled versions of them; merge: the
        attention merge's functions (`ttt_attention.compiled_merge()` under train.compile).
        """
        qkv, finish = layer or (self.midlayer.qkv, self.midlayer.finish)
        if recompute:
            qkv = functools.partial(checkpoint, qkv, use_reentrant=False)
            finish = functools.partial(checkpoint, finish, use_reentrant=False)
        b, t = input_ids_bt.shape
        hidden = self.project_aux(aux_bta)
        positions = torch.arange(t, device=input_ids_bt.device).expand(b, t)
        keys, values = [], []
        for k in range(num_steps):
            # Tokens beyond the sequence end are padded with id 0; callers mask them.
            shift = min(k, t)  # more steps than tokens: all padding
            ids_k = F.pad(input_ids_bt[:, shift:], (0, shift), value=0)
            embed = self.embed_tokens(ids_k).to(hidden.dtype)
            cos, sin = self.rope(positions + k, hidden.dtype)
            q, key, value = qkv(embed, hidden, cos, sin)
            keys.append(key)
            values.append(value)
            attn = self.midlayer.self_attn.attend_ttt(q, keys, values, merge)
            out = finish(hidden, attn)
            yield k, out
            hidden = self.carry(out)


class DraftCache:
    """Keys and values of the draft's one layer, for serving-style decoding.

    Holds step-0 entries for every verified position, followed by the entries of
    the chain drafted since; `truncate` drops drafted entries after verification.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def truncate(self, length: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]


@torch.no_grad()
def decode_step(draft: Eagle3Draft, ids_bt: torch.Tensor, hidden_in: torch.Tensor, positions_bt: torch.Tensor,
                cache: DraftCache) -> torch.Tensor:
    """One draft forward over new entries, attending to the cache and causally among
    themselves; returns the pre-norm hidden states [B, n, H] and extends the cache.

    `hidden_in` [B, n, H] is `draft.project_aux(aux)` when extending verified
    positions, or `draft.carry(previous output)` [B, 1, H] when drafting.
    """
    hidden = hidden_in
    embed = draft.embed_tokens(ids_bt).to(hidden.dtype)
    cos, sin = draft.rope(positions_bt, hidden.dtype)
    q, k, v = draft.midlayer.qkv(embed, hidden, cos, sin)
    past = cache.length
    cache.k = k if cache.k is None else torch.cat([cache.k, k], dim=2)
    cache.v = v if cache.v is None else torch.cat([cache.v, v], dim=2)
    n, total = q.shape[2], cache.length
    visible = torch.arange(total, device=q.device)[None, :] <= (past + torch.arange(n, device=q.device))[:, None]
    attn_layer = draft.midlayer.self_attn
    scores = torch.matmul(q, cache.k.transpose(-1, -2)) * attn_layer.hd ** -0.5
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, cache.v)
    b = out.shape[0]
    attn = attn_layer.o_proj(out.transpose(1, 2).reshape(b, n, -1))
    return draft.midlayer.finish(hidden, attn)
