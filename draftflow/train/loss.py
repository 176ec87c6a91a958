"""EAGLE3 test-time-training targets: the teacher, alignment and validity masks.

The loss itself (soft cross-entropy per unroll step, weighted decay^k, and the
per-step metrics) is `chunked_loss.chunked_ttt_loss`, which runs the draft head in
chunks of positions.

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
