"""EAGLE3 test-time-training targets: the teacher, alignment and the rows that learn.

The loss itself (soft cross-entropy per unroll step, weighted decay^k, and the
per-step metrics) is `chunked_loss.chunked_ttt_loss`, which runs the draft head in
chunks of rows.

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
step needs and the draft head on each step's rows. Prompt tokens and padding, often
most of a real batch, cost the decoder layer but neither vocabulary-sized head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


class Teacher(torch.nn.Module):
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
    argmax check, which `step_valid` applies on the device."""
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


def step_valid(targets: Targets, rows: LossRows) -> list[torch.Tensor]:
    """bool [N_k] per unroll step: whether the row's teacher argmax is in the draft vocab."""
    return [targets.valid[r] for r in rows.teacher_row]
