"""Teacher and TTT loss computed on the rows that learn, in chunks of rows, so peak
memory does not grow with full vocab x sequence x unroll steps.

- `loss_inputs` prepares one micro-batch: its rows (`loss.loss_rows`, computed on
  the host), the teacher's quantities on those rows and each step's validity;
- the teacher's full-vocab logits [c, V] exist for one chunk of rows at a time;
  only the draft-vocab log-probs, the full-vocab probabilities at the draft ids
  [N, Vd] and the argmax [N] are kept;
- each unroll step's draft head (norm, lm_head, log_softmax, soft CE) runs on that
  step's rows, per chunk, under activation checkpointing where the caller asks for
  it (long micro-batches on CUDA), so autograd keeps the chunk's hidden rows [c, H]
  instead of its [c, Vd] log-probs; backward recomputes them.

Every operation is row-wise, so a chunk computes exactly what the whole did for its
rows; where a step's rows fit one chunk, the sums are those of an unchunked loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from draftflow.train.loss import LossRows, Targets, Teacher, loss_rows, step_valid
from draftflow.train.model import Eagle3Draft
from draftflow.train.ttt_attention import EAGER_MERGE, Merge

CHUNK_ROWS = 2048  # [2048, 128256] float32 teacher logits: 1 GiB for a Llama-3 teacher


@dataclass(frozen=True, slots=True)
class LossInputs:
    """One micro-batch on the device, ready for `chunked_ttt_loss`."""

    batch: object  # TrainBatch
    rows: LossRows
    targets: Targets
    valid: list[torch.Tensor]  # bool [N_k] per unroll step

    def counts(self) -> torch.Tensor:
        """Positions each unroll step learns at, float [num_steps] (on the device)."""
        return torch.stack([v.sum() for v in self.valid]).float()

    def counts_all(self) -> torch.Tensor:
        """Loss positions of each unroll step, also those whose teacher argmax lies
        outside the draft vocab (SpecForge's acc denominator), float [num_steps]."""
        # Filled on the device from sizes the host knows: no host-to-device copy, which
        # from pageable memory would wait for the GPU on every micro-batch.
        return torch.stack([torch.full((), float(v.numel()), device=v.device) for v in self.valid])


def loss_inputs(teacher: Teacher, batch, num_steps: int, chunk: int = CHUNK_ROWS) -> LossInputs:
    """Rows from the batch's mask and lengths (read on the host: no device sync), then
    the batch moved to the teacher's device and the teacher run."""
    rows = loss_rows(batch.loss_mask, batch.lengths, num_steps)
    device = teacher.weight.device
    batch, rows = batch.to(device), rows.to(device)
    targets = chunked_targets(teacher, batch.last_hidden, rows.teacher, chunk)
    return LossInputs(batch, rows, targets, step_valid(targets, rows))


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


def chunked_ttt_loss(draft: Eagle3Draft, inputs: LossInputs, decay: float, denominators: list[float],
                     chunk: int = CHUNK_ROWS, recompute: bool = False, recompute_layer: bool = False,
                     head=head_terms, layer=None, merge: Merge = EAGER_MERGE,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted TTT loss of one micro-batch and summed metric numerators, with the
    draft head run on each step's rows, per chunk.

    `denominators[k]` is the number of valid rows of step k in the whole optimizer
    step; the loss is already divided by it, so micro-batch losses add up to the
    step's loss. Metrics come back as sums (ploss_k, acc_k, accept_k) to be divided
    by the same denominators after reduction. recompute checkpoints each chunk's head,
    so memory for the [c, Vd] log-probs is freed after every chunk instead of kept for
    backward (`DraftLoss` decides, by device and micro-batch size). recompute_layer
    does the same for the decoder layer (see `Eagle3Draft.unroll`); `head` may be a
    compiled `head_terms`, `layer` compiled halves of the decoder layer, `merge` the
    compiled attention merge.
    """
    batch, rows, targets = inputs.batch, inputs.rows, inputs.targets
    total = torch.zeros((), device=batch.input_ids.device)
    sums: dict[str, torch.Tensor] = {}
    ids_next = F.pad(batch.input_ids[:, 1:], (0, 1))  # the draft at t is fed token t+1
    for k, hidden in draft.unroll(ids_next, batch.aux_hidden, len(rows.draft), recompute_layer, layer, merge):
        hidden_rows = hidden.flatten(0, 1)
        parts = []
        for a, b in _chunks(rows.draft[k].numel(), chunk):
            args = (draft, hidden_rows[rows.draft[k][a:b]], inputs.valid[k][a:b], rows.teacher_row[k][a:b],
                    targets.log_probs, targets.argmax, targets.full_probs)
            parts.append(checkpoint(head, *args, use_reentrant=False) if recompute else head(*args))
        ce_sum, correct, accept = parts[0]
        for more in parts[1:]:
            ce_sum, correct, accept = ce_sum + more[0], correct + more[1], accept + more[2]
        total = total + (decay ** k) * ce_sum / max(denominators[k], 1.0)
        sums[f"ploss_{k}"] = ce_sum.detach()
        sums[f"acc_{k}"] = correct
        sums[f"accept_{k}"] = accept
    return total, sums
