"""EAGLE3 test-time-training loss and its per-step metrics.

Alignment (DESIGN.md section 5): at position t the draft sees aux(t) and token t+1
and learns the target's distribution at position t+1 (which predicts token t+2).
Unroll step k shifts everything by k more: it is taught the target at t+1+k.

A position is valid at step k when the token the teacher predicts (t+2+k) exists
and is an assistant token, and the target's own argmax lies in the draft vocab
(otherwise the draft cannot express it). Losses are normalised by the number of
valid positions, counted over the whole optimizer step (all micro-batches and
ranks), so padding and prompt tokens never dilute the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from draftflow.train.model import Eagle3Draft


@dataclass(frozen=True, slots=True)
class Targets:
    """Teacher quantities for one micro-batch, each [B, T] or [B, T, Vd]."""

    log_probs: torch.Tensor  # log softmax of target logits restricted to the draft vocab
    full_probs: torch.Tensor  # target's full-vocab probabilities at the draft vocab ids
    argmax: torch.Tensor  # target argmax over the full vocab (target ids)
    valid: torch.Tensor  # bool: teacher position usable (argmax in draft vocab)


class Teacher(torch.nn.Module):
    """The frozen target lm_head, applied to stored final hidden states."""

    def __init__(self, lm_head_weight_vh: torch.Tensor, draft_ids: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", lm_head_weight_vh.detach().clone(), persistent=False)
        self.register_buffer("draft_ids", draft_ids.clone(), persistent=False)
        t2d = torch.zeros(lm_head_weight_vh.shape[0], dtype=torch.bool)
        t2d[draft_ids] = True
        self.register_buffer("t2d", t2d, persistent=False)

    @torch.no_grad()
    def forward(self, last_hidden_bth: torch.Tensor) -> Targets:
        logits = F.linear(last_hidden_bth.to(self.weight.dtype), self.weight).float()  # [B, T, V]
        argmax = logits.argmax(-1)
        full_log_probs = torch.log_softmax(logits, -1)
        draft_logits = logits[..., self.draft_ids]
        return Targets(log_probs=torch.log_softmax(draft_logits, -1),
                       full_probs=full_log_probs[..., self.draft_ids].exp(),
                       argmax=argmax, valid=self.t2d[argmax])


def shift_left(x: torch.Tensor, n: int, fill=0) -> torch.Tensor:
    """x[:, t] <- x[:, t + n] along dim 1, padding the end with `fill`."""
    if n == 0:
        return x
    pad = torch.full_like(x[:, :n], fill)
    return torch.cat([x[:, n:], pad], dim=1)


def step_masks(loss_mask_bt: torch.Tensor, lengths_b: torch.Tensor, targets: Targets,
               num_steps: int) -> list[torch.Tensor]:
    """Valid-position mask [B, T] for each unroll step k (see module docstring)."""
    b, t = loss_mask_bt.shape
    pos = torch.arange(t, device=loss_mask_bt.device).expand(b, t)
    masks = []
    for k in range(num_steps):
        predicted = pos + 2 + k  # index of the token the teacher at t+1+k predicts
        in_seq = predicted < lengths_b[:, None]
        assistant = shift_left(loss_mask_bt.bool(), 2 + k, False)
        teacher_ok = shift_left(targets.valid, 1 + k, False)
        masks.append(in_seq & assistant & teacher_ok)
    return masks


def ttt_loss(draft: Eagle3Draft, batch, targets: Targets, masks: list[torch.Tensor], decay: float,
             denominators: list[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted TTT loss of one micro-batch and summed metric numerators.

    `denominators[k]` is the number of valid positions of step k in the whole
    optimizer step; the returned loss is already divided by it, so micro-batch
    losses add up to the step's loss. Metrics come back as sums (ploss_k, acc_k,
    accept_k) to be divided by the same denominators after reduction.
    """
    num_steps = len(masks)
    d2t = draft.d2t
    total = torch.zeros((), device=batch.input_ids.device)
    sums: dict[str, torch.Tensor] = {}
    ids_next = shift_left(batch.input_ids, 1)  # the draft at t is fed token t+1
    for k, hidden in draft.unroll(ids_next, batch.aux_hidden, num_steps):
        mask = masks[k]
        log_q = torch.log_softmax(draft.logits(hidden).float(), -1)  # [B, T, Vd]
        log_p = shift_left(targets.log_probs, 1 + k)
        ce = -(log_p.exp() * log_q).sum(-1)  # soft cross-entropy per position
        ce_sum = (ce * mask).sum()
        denom = max(denominators[k], 1.0)
        total = total + (decay ** k) * ce_sum / denom
        with torch.no_grad():
            top = log_q.argmax(-1)
            correct = (top + d2t[top]) == shift_left(targets.argmax, 1 + k)
            accept = torch.minimum(shift_left(targets.full_probs, 1 + k), log_q.exp()).sum(-1)
            sums[f"ploss_{k}"] = ce_sum.detach()
            sums[f"acc_{k}"] = (correct & mask).sum().float()
            sums[f"accept_{k}"] = (accept * mask).sum()
    return total, sums
