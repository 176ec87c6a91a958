"""Predicted peak memory of one training step on CUDA, and `train.recompute: auto`'s
choice from it: keep activations (fastest) whenever the whole step fits the card
with headroom, and recompute only what it must.

The step's peak comes at the start of backward, when every kept activation of the
TTT unroll is alive, on top of a fixed part that does not depend on the sequence:

    peak = fixed(shapes)
         + teacher_rows * TEACHER_BYTES_PER_ROW(Vd) + positions * feature bytes(Ht)
         + head_rows * (kept or recomputed head bytes per row)
         + positions * ttt_length * (kept or recomputed layer bytes per position)
         + what backward rebuilds at once: one step's layer (layer recomputed),
           one chunk of head rows (head recomputed)

Each term's constant says why it has its value. The layer's are calibrated on the
peaks measured in docs/benchmarks.md (Llama-3.1-8B-shaped draft, TTT 7, one H200,
compiled, through FSDP2): 14.2 GiB at 2,048 and 32.5 GiB at 8,192 positions with
nothing recomputed, 40.7 GiB at 32,768 with both recomputed. The model predicts
15.6, 33.9 and 41.3 GiB there: high by 1.4 GiB at the two short lengths (the
fixed part below counts every buffer the step can hold; the measured 2k-8k line
crosses zero tokens at 8.1 GiB, not 9.5) and by 0.6 GiB at 32k. It errs high
on purpose: a prediction too low means an out-of-memory crash, one too high only
a recompute that was not needed. An older H100 run (32k, head recomputed, layer
kept, 84.5 "GiB") is not used: that code kept the layer's activations eagerly in
float32 and gathered teacher rows outside the checkpoint, and 84.5 GiB exceeds an
80 GB H100's 79.6 GiB, so the figure was either GB or from another card.

Recompute options cost extra forward FLOPs per position and unroll step: the head
2*H*Vd (its matmul; its softmax passes are memory-bound and scale with the same
rows), the layer the forward of q/k/v/o and the MLP (flash attention's outputs are
kept, so attention is not rerun). `auto` tries nothing first, then the single
option that saves the most bytes per extra FLOP (the head, for every Llama-like
shape: it saves ~8*Vd bytes per row for 2*H*Vd FLOPs, the layer ~12*I bytes for
~6*H*I), then the other, then both, and takes the first whose prediction fits
`card_bytes * (1 - HEADROOM)`. When none fits it recomputes both (the least memory)
and says so (`RecomputePlan.fits`).
"""

from __future__ import annotations

from dataclasses import dataclass

from draftflow.train.model import DraftModelConfig

GIB = 2 ** 30

# Headroom left free on the card: the caching allocator's fragmentation (reserved
# exceeds allocated by a few GiB on long steps), the CUDA context, cuBLAS and NCCL
# workspaces (outside torch's count, ~1 GiB), and the model's error when
# extrapolated from the 2k-32k calibration to 128k. 10% is 14 GiB of an H200 and
# 8 GiB of an 80 GB H100, about ten times the worst error seen at calibration.
HEADROOM = 0.10

# Fixed part, bytes per parameter. Trainable: float32 master (4) + AdamW's two
# float32 moments (8) + the bf16 copy FSDP2 gathers for forward and keeps until
# backward ends (2); gradients are not yet allocated when activations peak. The
# frozen target embedding: float32 shard (4) + its gathered bf16 copy (2), no
# optimizer state. The frozen target lm_head (the teacher): one bf16 copy.
TRAINABLE_BYTES_PER_PARAM = 14
EMBEDDING_BYTES_PER_PARAM = 6
TEACHER_BYTES_PER_PARAM = 2

# Per teacher row: its float32 log-probs and probabilities over the draft vocab,
# kept for the whole step (`loss.Targets`). Per position: the bf16 features on the
# device (aux [3Ht] and last hidden [Ht]) and ids, mask and row indices (~16 B).
TEACHER_BYTES_PER_LOGIT = 8
FEATURE_BYTES_PER_VALUE = 2
INDEX_BYTES_PER_POSITION = 16

# Per draft-head row and unroll step, kept: a bf16 logit and a float32 log-prob per
# draft-vocab entry for backward (`loss.head_terms`). Recomputed: only the chunk's
# gathered bf16 hidden rows [c, H]; backward then rebuilds one chunk of HEAD_CHUNK_ROWS
# rows at a time, its logits, log-softmax and their gradient (~12 B per entry).
HEAD_BYTES_PER_LOGIT = 8
HEAD_INPUT_BYTES_PER_HIDDEN = 2
HEAD_CHUNK_BYTES_PER_LOGIT = 12

# Per position and unroll step, the compiled decoder layer keeps about 18 bf16 values
# per hidden unit (inputs, normed q/k/v input, q, attention output before and after
# o_proj, residual, MLP input, output: ~9 [T, H] tensors) and 6 bytes per
# intermediate unit (gate and up, bf16, plus the SiLU product). 18H + 6I is the
# count; the measured 2k-8k slope (3.20 MB per position, less the teacher, feature
# and head terms) gives 159.6 kB for the 8B shape, where 18H + 6I = 159.7 kB.
# A second calibration (2026-12-02, same card and shape) measured 112.2 GiB at 65,536
# positions with the head recomputed and the layer kept, 12.7 GiB above that count,
# and 71.2 GiB with both recomputed, as predicted. The gap is about
# LAYER_OUTPUT_BYTES_PER_HIDDEN per hidden unit, position and step: the kept layer's
# output as autograd holds it for the next step, which a kept head's activations
# already include (so the nothing-recomputed fit above has it), while a recomputed
# head keeps only its own bf16 copy of its input. It is added only in that case.
LAYER_BYTES_PER_HIDDEN = 18
LAYER_BYTES_PER_INTERMEDIATE = 6
LAYER_OUTPUT_BYTES_PER_HIDDEN = 8  # 12.7 GiB over 65,536 x 7 x 4096 is 6.8; rounded up to err high
# Recomputed (`Eagle3Draft.unroll`): checkpoint keeps each step's inputs (embedding,
# hidden), q, and the attention output before and after o_proj, ~5 bf16 [T, H]
# tensors, plus k and v [T, nkv*hd] that later steps attend to.
LAYER_RECOMPUTED_BYTES_PER_HIDDEN = 10
LAYER_RECOMPUTED_BYTES_PER_KV = 4
# Backward of a recomputed layer rebuilds one step's activations and their gradients
# while the kept ones of every other step are alive: calibrated as this many steps'
# worth of kept layer activations (the 32k point gives 2.12; rounded up).
LAYER_REBUILD_STEPS = 2.25

HEAD_CHUNK_ROWS = 2048  # loss.CHUNK_ROWS (not imported: loss imports this module; a test ties them)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecomputePlan:
    """What backward recomputes, the peak predicted for it, and whether that fits
    the card with headroom (None when no card size was given: CPU)."""

    head: bool
    layer: bool
    predicted_bytes: int
    fits: bool | None = None


def trainable_params(cfg: DraftModelConfig) -> int:
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    aux = 3 * cfg.target_hidden_size
    attention = 2 * h * (q + 2 * kv) + q * h  # q/k/v take the 2H concatenation
    norms = 4 * h + (aux if cfg.norm_before_fc else 0)
    return aux * h + attention + 3 * h * cfg.intermediate_size + norms + h * cfg.draft_vocab_size


def fixed_bytes(cfg: DraftModelConfig) -> int:
    """Weights, optimizer state and the frozen embedding and teacher."""
    frozen = cfg.vocab_size * cfg.hidden_size
    return (TRAINABLE_BYTES_PER_PARAM * trainable_params(cfg) + EMBEDDING_BYTES_PER_PARAM * frozen
            + TEACHER_BYTES_PER_PARAM * cfg.vocab_size * cfg.target_hidden_size)


def _layer_kept_bytes(cfg: DraftModelConfig) -> int:
    """Kept activations of the decoder layer, per position and unroll step (as counted;
    `predicted_peak_bytes` adds its output where a recomputed head does not hold it)."""
    return LAYER_BYTES_PER_HIDDEN * cfg.hidden_size + LAYER_BYTES_PER_INTERMEDIATE * cfg.intermediate_size


def predicted_peak_bytes(cfg: DraftModelConfig, positions: int, ttt_length: int, head: bool, layer: bool,
                         head_rows: int | None = None, teacher_rows: int | None = None) -> int:
    """Peak bytes of one training step on one micro-batch of `positions` (B * T)
    positions. head_rows: draft-head rows summed over the unroll steps (default:
    every position at every step); teacher_rows: rows the teacher runs on (default:
    every position)."""
    head_rows = positions * ttt_length if head_rows is None else head_rows
    teacher_rows = positions if teacher_rows is None else teacher_rows
    vd, h = cfg.draft_vocab_size, cfg.hidden_size
    once = (teacher_rows * TEACHER_BYTES_PER_LOGIT * vd
            + positions * (FEATURE_BYTES_PER_VALUE * 4 * cfg.target_hidden_size + INDEX_BYTES_PER_POSITION))
    if head:
        head_bytes = head_rows * HEAD_INPUT_BYTES_PER_HIDDEN * h + HEAD_CHUNK_ROWS * HEAD_CHUNK_BYTES_PER_LOGIT * vd
    else:
        head_bytes = head_rows * HEAD_BYTES_PER_LOGIT * vd
    if layer:
        per_step = (LAYER_RECOMPUTED_BYTES_PER_HIDDEN * h
                    + LAYER_RECOMPUTED_BYTES_PER_KV * cfg.num_key_value_heads * cfg.head_dim)
        layer_bytes = positions * (ttt_length * per_step + LAYER_REBUILD_STEPS * _layer_kept_bytes(cfg))
    else:
        layer_bytes = positions * ttt_length * (_layer_kept_bytes(cfg) + (LAYER_OUTPUT_BYTES_PER_HIDDEN * h if head else 0))
    return int(fixed_bytes(cfg) + once + head_bytes + layer_bytes)


def _extra_flops(cfg: DraftModelConfig) -> dict[str, int]:
    """Forward FLOPs that recomputing each part adds, per position and unroll step."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = 2 * (2 * h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size)
    return {"head": 2 * h * cfg.draft_vocab_size, "layer": layer}


def _options(cfg: DraftModelConfig, ttt_length: int) -> list[tuple[bool, bool]]:
    """(head, layer) from fastest to most memory-saving: nothing, the single option
    saving the most bytes per extra FLOP, the other, both."""
    saved = {"head": (HEAD_BYTES_PER_LOGIT * cfg.draft_vocab_size
                      - (HEAD_INPUT_BYTES_PER_HIDDEN + LAYER_OUTPUT_BYTES_PER_HIDDEN) * cfg.hidden_size),
             "layer": (_layer_kept_bytes(cfg) - LAYER_RECOMPUTED_BYTES_PER_HIDDEN * cfg.hidden_size
                       - LAYER_RECOMPUTED_BYTES_PER_KV * cfg.num_key_value_heads * cfg.head_dim)}
    flops = _extra_flops(cfg)
    singles = sorted(saved, key=lambda part: -saved[part] / flops[part])
    return [(False, False), *((part == "head", part == "layer") for part in singles), (True, True)]


def choose_recompute(cfg: DraftModelConfig, positions: int, ttt_length: int, card_bytes: int,
                     head_rows: int | None = None, teacher_rows: int | None = None,
                     headroom: float = HEADROOM) -> RecomputePlan:
    """`train.recompute: auto` for a card of `card_bytes`: the fastest option whose
    predicted peak fits card_bytes * (1 - headroom); both when none does."""
    budget = card_bytes * (1 - headroom)
    plan = None
    for head, layer in _options(cfg, ttt_length):
        peak = predicted_peak_bytes(cfg, positions, ttt_length, head, layer, head_rows, teacher_rows)
        plan = RecomputePlan(head=head, layer=layer, predicted_bytes=peak, fits=peak <= budget)
        if plan.fits:
            return plan
    return plan
