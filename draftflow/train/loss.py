"""The EAGLE3 test-time-training loss, in one place: teacher, alignment, the rows
that learn, the TTT unroll's loss and its chunking.

Alignment (DESIGN.md section 5): at position t the draft sees aux(t) and token t+1
and learns the target's distribution at position t+1 (which predicts token t+2).
Unroll step k shifts everything by k more: it is taught the target at t+1+k.

A position learns at step k when the token the teacher predicts (t+2+k) exists
and is an assistant token, and the target's own argmax lies in the draft vocab
(otherwise the draft cannot express it). Losses are normalised by the number of
such positions, counted over the whole optimizer step (all micro-batches and
ranks), so padding and prompt tokens never dilute the gradient.

Only those positions are computed: `loss_rows` lists them (from the loss mask and
lengths alone, on the host, so no device sync), the teacher runs on the rows some
step needs and each step's draft head on that step's rows. Prompt tokens and
padding, often most of a real batch, cost the decoder layer but neither
vocabulary-sized head.

Memory does not grow with full vocab x sequence x unroll steps: the teacher's
full-vocab logits [c, V] exist for one chunk of rows at a time (only the
draft-vocab log-probs, the full-vocab probabilities at the draft ids [N, Vd] and
the argmax [N] are kept), and each step's draft head runs per chunk, under
activation checkpointing where `DraftLoss.plan` asks for it, so autograd
keeps a chunk's hidden rows [c, H] instead of its [c, Vd] log-probs. Every
operation is row-wise, so a chunk computes exactly what the whole did for its rows.

The flow of one optimizer step (`parallel.TrainState.step`):
  inputs = [loss.prepare(batch) for each micro-batch]      # teacher, rows
  denominators = all-reduced sum of inputs' counts()        # global valid rows
  out = loss(inputs[i], denominators) per micro-batch       # StepOutput, backward
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from draftflow.config import RECOMPUTE_MODES
from draftflow.train.memory import GIB, HEADROOM, RecomputePlan, choose_recompute, predicted_peak_bytes
from draftflow.train.model import Eagle3Draft
from draftflow.train.ttt_attention import EAGER_MERGE, Merge, compiled_merge

CHUNK_ROWS = 2048  # [2048, 128256] float32 teacher logits: 1 GiB for a Llama-3 teacher


# ---- the teacher ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Targets:
    """Teacher quantities for the teacher rows of one micro-batch ([N] or [N, Vd])."""

    log_probs: torch.Tensor  # log softmax of target logits restricted to the draft vocab
    full_probs: torch.Tensor  # target's full-vocab probabilities at the draft vocab ids
    argmax: torch.Tensor  # target argmax over the full vocab (target ids)
    valid: torch.Tensor  # bool: teacher row usable (argmax in draft vocab)


def teacher_targets(logits_nv: torch.Tensor, draft_ids: torch.Tensor, t2d: torch.Tensor):
    """(log_probs, full_probs, argmax, valid) of `Targets` from the target's logits,
    row-wise; a pure function, so that train.compile fuses the passes over [N, V]."""
    logits = logits_nv.float()
    argmax = logits.argmax(-1)
    full_log_probs = torch.log_softmax(logits, -1)
    return (torch.log_softmax(logits[..., draft_ids], -1), full_log_probs[..., draft_ids].exp(), argmax,
            t2d[argmax])


class Teacher(nn.Module):
    """The frozen target lm_head, applied to stored final hidden states. compile
    (`train.compile`): the softmaxes, gathers and argmax after the matmul run as one
    compiled graph instead of a kernel per pass over the [N, V] float32 logits."""

    def __init__(self, lm_head_weight_vh: torch.Tensor, draft_ids: torch.Tensor, compile: bool = False):
        super().__init__()
        self.register_buffer("weight", lm_head_weight_vh.detach().clone(), persistent=False)
        self.register_buffer("draft_ids", draft_ids.clone(), persistent=False)
        t2d = torch.zeros(lm_head_weight_vh.shape[0], dtype=torch.bool)
        t2d[draft_ids] = True
        self.register_buffer("t2d", t2d, persistent=False)
        self.targets = torch.compile(teacher_targets) if compile else teacher_targets

    @torch.no_grad()
    def forward(self, last_hidden: torch.Tensor) -> Targets:
        """Row-wise over any leading dims of last_hidden [..., H]."""
        logits = F.linear(last_hidden.to(self.weight.dtype), self.weight)  # [..., V]
        return Targets(*self.targets(logits, self.draft_ids, self.t2d))


# ---- which rows learn ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LossRows:
    """Which rows of a micro-batch the loss touches, as flat indices b * T + t.

    teacher: the positions whose target distribution some unroll step learns
    (ascending); draft[k]: the positions unroll step k learns at; teacher_row[k]: for
    each of those, its teacher's index into `teacher` (the position t + 1 + k).
    """

    teacher: torch.Tensor  # int64 [N]
    draft: tuple[torch.Tensor, ...]  # int64 [N_k] per unroll step
    teacher_row: tuple[torch.Tensor, ...]  # int64 [N_k] per unroll step

    def to(self, device: torch.device) -> "LossRows":
        return LossRows(self.teacher.to(device, non_blocking=True),
                        tuple(d.to(device, non_blocking=True) for d in self.draft),
                        tuple(r.to(device, non_blocking=True) for r in self.teacher_row))


def loss_rows(loss_mask_bt: torch.Tensor, lengths_b: torch.Tensor, num_steps: int) -> LossRows:
    """The rows of each unroll step (see module docstring), before the teacher's
    argmax check, which `prepare` applies on the device."""
    b, t = loss_mask_bt.shape
    pos = torch.arange(t).expand(b, t)
    lengths = lengths_b.to("cpu")[:, None]
    assistant = loss_mask_bt.to("cpu").bool()
    # teacher position p serves some step when token p + 1 exists and is an assistant token
    need = torch.zeros(b, t, dtype=torch.bool)
    need[:, 1:-1] = assistant[:, 2:] & (pos[:, 2:] < lengths)
    teacher = need.flatten().nonzero().squeeze(1)
    row_of = torch.full((b * t,), -1, dtype=torch.int64)
    row_of[teacher] = torch.arange(teacher.numel())
    draft, teacher_row = [], []
    for k in range(num_steps):
        learns = torch.zeros(b, t, dtype=torch.bool)
        if t > 2 + k:  # step k at t is taught the target at t + 1 + k, predicting token t + 2 + k
            learns[:, : t - 2 - k] = need[:, 1 + k : t - 1]
        flat = learns.flatten().nonzero().squeeze(1)
        draft.append(flat)
        teacher_row.append(row_of[flat + 1 + k])
    return LossRows(teacher, tuple(draft), tuple(teacher_row))


@dataclass(frozen=True, slots=True)
class LossInputs:
    """One micro-batch on the device with its rows and teacher targets: what
    `DraftLoss.forward` takes."""

    batch: object  # TrainBatch
    rows: LossRows
    targets: Targets
    valid: list[torch.Tensor]  # bool [N_k] per unroll step: the row's teacher argmax is in the draft vocab

    def counts(self) -> torch.Tensor:
        """Positions each unroll step learns at, float [num_steps] (on the device)."""
        return torch.stack([v.sum() for v in self.valid]).float()

    def counts_all(self) -> torch.Tensor:
        """Loss positions of each unroll step, also those whose teacher argmax lies
        outside the draft vocab (SpecForge's acc denominator), float [num_steps]."""
        # Filled on the device from sizes the host knows: no host-to-device copy, which
        # from pageable memory would wait for the GPU on every micro-batch.
        return torch.stack([torch.full((), float(v.numel()), device=v.device) for v in self.valid])


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk; one empty chunk when n == 0, so that the loss still
    depends on every parameter (FSDP's backward hooks and the graph stay the same)."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)] or [(0, 0)]


@torch.no_grad()
def chunked_targets(teacher: Teacher, last_hidden_bth: torch.Tensor, positions: torch.Tensor,
                    chunk: int = CHUNK_ROWS) -> Targets:
    """`teacher` on the rows `positions` of last_hidden, `chunk` rows at a time."""
    flat = last_hidden_bth.flatten(0, 1)  # [B * T, H]: the index space of LossRows
    parts = [teacher(flat[positions[a:b]]) for a, b in _chunks(positions.numel(), chunk)]
    if len(parts) == 1:
        return parts[0]
    return Targets(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Targets)))


def prepare(teacher: Teacher, batch, num_steps: int, chunk: int = CHUNK_ROWS) -> LossInputs:
    """Rows from the batch's mask and lengths (read on the host: no device sync), then
    the batch moved to the teacher's device and the teacher run on its rows."""
    rows = loss_rows(batch.loss_mask, batch.lengths, num_steps)
    device = teacher.weight.device
    batch, rows = batch.to(device), rows.to(device)
    targets = chunked_targets(teacher, batch.last_hidden, rows.teacher, chunk)
    return LossInputs(batch, rows, targets, [targets.valid[r] for r in rows.teacher_row])


# ---- the unroll's loss ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one micro-batch (or, summed, one optimizer step) gives: the loss to
    backpropagate and per-unroll-step sums, each a tensor [ttt_length], to be divided
    by the step's denominators once reduced over micro-batches and ranks."""

    loss: torch.Tensor  # scalar, already divided by the global denominators
    ploss: torch.Tensor  # soft cross-entropy sums over the valid rows
    correct: torch.Tensor  # rows whose draft argmax is the target's argmax
    accept: torch.Tensor  # sum of min(p_target, q_draft) over the draft vocab: expected acceptance

    def sums(self) -> torch.Tensor:
        """[3, ttt_length]: ploss, correct, accept (detached), to add and reduce at once."""
        return torch.stack([self.ploss, self.correct, self.accept]).detach().float()


def head_terms(draft: Eagle3Draft, hidden_ch, mask_c, teacher_c, log_probs_nv, argmax_n, full_probs_nv):
    """Masked soft-CE sum of one chunk of rows (differentiable), then its metric sums.

    The chunk's teacher rows are picked here (teacher_c indexes the micro-batch's
    targets), so that under checkpoint backward re-gathers them instead of keeping a
    [c, Vd] copy per chunk and unroll step. The metrics come last so that
    checkpoint's recomputation in backward, which stops once the tensors autograd
    saved are rebuilt, does not redo them.
    """
    log_q = torch.log_softmax(draft.logits(hidden_ch).float(), -1)  # [c, Vd]
    ce = -(log_probs_nv[teacher_c].exp() * log_q).sum(-1)  # soft cross-entropy per row
    ce_sum = (ce * mask_c).sum()
    with torch.no_grad():
        top = log_q.argmax(-1)
        correct = (top + draft.d2t[top]) == argmax_n[teacher_c]
        accept = torch.minimum(full_probs_nv[teacher_c], log_q.exp()).sum(-1)
        return ce_sum, (correct & mask_c).sum().float(), (accept * mask_c).sum()


def ttt_loss(draft: Eagle3Draft, inputs: LossInputs, decay: float, denominators: list[float],
             chunk: int = CHUNK_ROWS, recompute: bool = False, recompute_layer: bool = False,
             head=head_terms, layer=None, merge: Merge = EAGER_MERGE) -> StepOutput:
    """Weighted TTT loss of one micro-batch, with each unroll step's draft head run on
    that step's rows, per chunk.

    `denominators[k]` is the number of valid rows of step k in the whole optimizer
    step; the loss is already divided by it, so micro-batch losses add up to the
    step's loss. recompute checkpoints each chunk's head, recompute_layer the decoder
    layer (see `Eagle3Draft.unroll`); `head` may be a compiled `head_terms`, `layer`
    compiled halves of the decoder layer, `merge` the compiled attention merge.
    """
    batch, rows, targets = inputs.batch, inputs.rows, inputs.targets
    total = torch.zeros((), device=batch.input_ids.device)
    per_step = []
    ids_next = F.pad(batch.input_ids[:, 1:], (0, 1))  # the draft at t is fed token t+1
    for k, hidden in draft.unroll(ids_next, batch.aux_hidden, len(rows.draft), recompute_layer, layer, merge):
        hidden_rows = hidden.flatten(0, 1)
        parts = []
        for a, b in _chunks(rows.draft[k].numel(), chunk):
            args = (draft, hidden_rows[rows.draft[k][a:b]], inputs.valid[k][a:b], rows.teacher_row[k][a:b],
                    targets.log_probs, targets.argmax, targets.full_probs)
            parts.append(checkpoint(head, *args, use_reentrant=False) if recompute else head(*args))
        ce_sum, correct, accept = (functools.reduce(torch.add, terms) for terms in zip(*parts))
        total = total + (decay ** k) * ce_sum / max(denominators[k], 1.0)
        per_step.append((ce_sum.detach(), correct, accept))
    ploss, correct, accept = (torch.stack(col) for col in zip(*per_step))
    return StepOutput(total, ploss, correct, accept)


@functools.cache
def _card_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


class DraftLoss(nn.Module):
    """The draft and its teacher as one module: `prepare` runs the teacher on a
    micro-batch, `forward` the unroll's loss. The loss runs inside `forward` because
    FSDP2 gathers parameters in hooks around a module's forward, and the draft is
    driven through `unroll` and `logits` rather than its own forward.

    recompute (`train.recompute`): whether backward recomputes the draft head (per
    chunk of rows) and the decoder layer instead of keeping their activations:
    always, never, or auto (on CUDA: nothing while the step's predicted peak fits the
    card with headroom, else the fastest option that does, `memory.choose_recompute`;
    on CPU nothing). compile (`train.compile`, already resolved to a
    bool): torch.compile the layer's two halves, the draft head, the attention merge
    and the teacher's passes over the logits.
    """

    def __init__(self, draft: Eagle3Draft, teacher: Teacher, ttt_length: int, decay: float,
                 recompute: str = "auto", compile: bool = False):
        super().__init__()
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute: {recompute!r}, expected one of {', '.join(RECOMPUTE_MODES)}")
        self.draft, self.teacher = draft, teacher
        self.ttt_length, self.decay, self.recompute = ttt_length, decay, recompute
        # compiled callables held here, so the draft itself stays as built
        self.head = torch.compile(head_terms) if compile else head_terms
        self.layer = (torch.compile(draft.midlayer.qkv), torch.compile(draft.midlayer.finish)) if compile else None
        self.merge = compiled_merge() if compile else EAGER_MERGE
        if compile:
            teacher.targets = torch.compile(teacher_targets)

    def prepare(self, batch) -> LossInputs:
        return prepare(self.teacher, batch, self.ttt_length)

    def plan(self, inputs: LossInputs) -> RecomputePlan:
        """What backward recomputes for this micro-batch and the step's predicted peak
        (`memory.py`); auto chooses by that prediction against the card."""
        ids, rows = inputs.batch.input_ids, inputs.rows
        shape = dict(positions=ids.numel(), ttt_length=self.ttt_length,
                     head_rows=sum(r.numel() for r in rows.draft), teacher_rows=rows.teacher.numel())
        if self.recompute == "auto" and ids.is_cuda:
            card = _card_bytes(ids.device)
            plan = choose_recompute(self.draft.cfg, card_bytes=card, **shape)
            if not plan.fits:
                warnings.warn(f"train.recompute auto: {ids.numel()} positions in a micro-batch are predicted to peak "
                              f"at {plan.predicted_bytes / GIB:.1f} GiB even with the head and layer recomputed, "
                              f"over {1 - HEADROOM:.0%} of this card's {card / GIB:.1f} GiB; a smaller data.max_length "
                              "or batch would fit", stacklevel=2)
            return plan
        head = layer = self.recompute == "always"  # auto on CPU: nothing (no card to fit)
        return RecomputePlan(head=head, layer=layer,
                             predicted_bytes=predicted_peak_bytes(self.draft.cfg, head=head, layer=layer, **shape))

    def forward(self, inputs: LossInputs, denominators: list[float]) -> tuple[torch.Tensor, ...]:
        """The fields of `StepOutput` as a tuple (`StepOutput(*module(...))`): FSDP2 hooks
        its backward through the forward's output tensors, which it finds in tuples but,
        on some torch versions, not inside a dataclass (no gradients then reach the
        sharded parameters)."""
        plan = self.plan(inputs)
        out = ttt_loss(self.draft, inputs, self.decay, denominators, recompute=plan.head, recompute_layer=plan.layer,
                       head=self.head, layer=self.layer, merge=self.merge)
        return out.loss, out.ploss, out.correct, out.accept
