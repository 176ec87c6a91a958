"""Teacher and TTT loss computed in chunks of positions, so peak memory does not
grow with full vocab x sequence x unroll steps.

Where a sequence fits in one chunk, the same bits as running everything over the
whole sequence at once (every operation is row-wise, so a chunk computes exactly
what the whole did for its rows):
- the teacher's full-vocab logits [B, c, V] exist for one chunk at a time; only
  the draft-vocab log-probs, the full-vocab probabilities at the draft ids [B, T, Vd]
  and the argmax [B, T] are kept;
- each unroll step's draft head (norm, lm_head, log_softmax, soft CE) runs per
  chunk, under activation checkpointing where the caller asks for it (long
  micro-batches on CUDA), so autograd keeps the chunk's hidden state [B, c, H]
  instead of its [B, c, Vd] log-probs; backward recomputes them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.checkpoint import checkpoint

from draftflow.train.loss import Targets, Teacher, shift_left
from draftflow.train.model import Eagle3Draft

CHUNK_POSITIONS = 2048  # [B, 2048, 128256] float32 logits: 1 GiB per sample for a Llama-3 teacher


@torch.no_grad()
def chunked_targets(teacher: Teacher, last_hidden_bth: torch.Tensor, chunk: int = CHUNK_POSITIONS) -> Targets:
    """`teacher(last_hidden_bth)`, holding full-vocab logits for `chunk` positions at a time."""
    parts = [teacher(last_hidden_bth[:, start : start + chunk])
             for start in range(0, last_hidden_bth.shape[1], chunk)]  # full-vocab logits die with each call
    return Targets(*(torch.cat([getattr(p, f.name) for p in parts], dim=1) for f in dataclasses.fields(Targets)))


def shifted_rows(x: torch.Tensor, shift: int, start: int, stop: int) -> torch.Tensor:
    """shift_left(x, shift)[:, start:stop] (zero-filled past the end) without copying all of x."""
    rows = x[:, start + shift : stop + shift]
    missing = stop - start - rows.shape[1]
    if missing:
        rows = torch.cat([rows, torch.zeros_like(x[:, :missing])], dim=1)
    return rows


def head_terms(draft: Eagle3Draft, hidden_bch, log_p_bcv, mask_bc, argmax_bc, full_probs_bcv):
    """Masked soft-CE sum of one chunk (differentiable), then its metric sums.

    The metrics come last so that checkpoint's recomputation in backward, which stops
    once the tensors autograd saved are rebuilt, does not redo them.
    """
    log_q = torch.log_softmax(draft.logits(hidden_bch).float(), -1)  # [B, c, Vd]
    ce = -(log_p_bcv.exp() * log_q).sum(-1)  # soft cross-entropy per position
    ce_sum = (ce * mask_bc).sum()
    with torch.no_grad():
        top = log_q.argmax(-1)
        correct = (top + draft.d2t[top]) == argmax_bc
        accept = torch.minimum(full_probs_bcv, log_q.exp()).sum(-1)
        return ce_sum, (correct & mask_bc).sum().float(), (accept * mask_bc).sum()


def _chunk_terms(draft: Eagle3Draft, hidden: torch.Tensor, targets: Targets, mask: torch.Tensor, k: int,
                 start: int, stop: int, recompute: bool, head=head_terms):
    """(ce_sum, correct, accept) over positions start:stop of unroll step k."""
    # No slice node when one chunk covers the sequence: the autograd graph, and so the
    # order in which gradients are summed, stays that of an unchunked loss.
    rows = hidden if (start, stop) == (0, hidden.shape[1]) else hidden[:, start:stop]
    args = (draft, rows, shifted_rows(targets.log_probs, 1 + k, start, stop), mask[:, start:stop],
            shifted_rows(targets.argmax, 1 + k, start, stop), shifted_rows(targets.full_probs, 1 + k, start, stop))
    if recompute:
        return checkpoint(head, *args, use_reentrant=False)
    return head(*args)


def chunked_ttt_loss(draft: Eagle3Draft, batch, targets: Targets, masks: list[torch.Tensor], decay: float,
                     denominators: list[float], chunk: int = CHUNK_POSITIONS,
                     recompute: bool = False, recompute_layer: bool = False,
                     head=head_terms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted TTT loss of one micro-batch and summed metric numerators, with the
    draft head run per chunk of positions.

    `denominators[k]` is the number of valid positions of step k in the whole
    optimizer step; the loss is already divided by it, so micro-batch losses add up
    to the step's loss. Metrics come back as sums (ploss_k, acc_k, accept_k) to be
    divided by the same denominators after reduction. recompute checkpoints each
    chunk's head, so memory for the [B, c, Vd] log-probs is freed after every chunk
    instead of kept for backward (`DraftLoss` decides, by device and micro-batch size).
    recompute_layer does the same for the decoder layer (see `Eagle3Draft.unroll`);
    `head` may be a compiled `head_terms`.
    """
    total = torch.zeros((), device=batch.input_ids.device)
    sums: dict[str, torch.Tensor] = {}
    ids_next = shift_left(batch.input_ids, 1)  # the draft at t is fed token t+1
    t = batch.input_ids.shape[1]
    for k, hidden in draft.unroll(ids_next, batch.aux_hidden, len(masks), recompute_layer):
        ce_sum, correct, accept = _chunk_terms(draft, hidden, targets, masks[k], k, 0, min(chunk, t), recompute,
                                               head)
        for start in range(chunk, t, chunk):  # further chunks, where the sequence is longer than one
            more = _chunk_terms(draft, hidden, targets, masks[k], k, start, min(start + chunk, t), recompute,
                                head)
            ce_sum, correct, accept = ce_sum + more[0], correct + more[1], accept + more[2]
        total = total + (decay ** k) * ce_sum / max(denominators[k], 1.0)
        sums[f"ploss_{k}"] = ce_sum.detach()
        sums[f"acc_{k}"] = correct
        sums[f"accept_{k}"] = accept
    return total, sums
