"""Draft vocabulary: the target tokens the draft can propose, and the d2t/t2d maps.

Chosen as the most frequent loss-masked (assistant) tokens of the training data,
so the draft spends its lm_head on what it will actually be asked to predict.
Stored in serving layout: target_id = draft_id + d2t[draft_id]; t2d[target_id] is
True for tokens in the draft vocab.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch


def build_draft_vocab(samples: Iterable, draft_vocab_size: int, target_vocab_size: int) -> list[int]:
    """Target ids of the draft vocab, ascending. Ties break towards the smaller id;
    when the data has fewer distinct assistant tokens than asked for, the rest is
    filled with the most frequent other tokens, then with the smallest unused ids."""
    size = min(draft_vocab_size, target_vocab_size)
    assistant, other = Counter(), Counter()
    for s in samples:
        ids = torch.as_tensor(s.input_ids).tolist()
        mask = torch.as_tensor(s.loss_mask).tolist()
        for tok, m in zip(ids, mask):
            (assistant if m else other)[tok] += 1
    for tok in list(assistant) + list(other):
        if not 0 <= tok < target_vocab_size:
            raise ValueError(f"token id {tok} is outside the target vocab of {target_vocab_size}")
    chosen: list[int] = []
    seen: set[int] = set()
    for counter in (assistant, other):
        for tok, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(chosen) == size:
                break
            if tok not in seen:
                chosen.append(tok)
                seen.add(tok)
    tok = 0
    while len(chosen) < size:
        if tok not in seen:
            chosen.append(tok)
            seen.add(tok)
        tok += 1
    return sorted(chosen)


def vocab_maps(draft_ids: list[int], target_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t int64 [Vd], t2d bool [V]) for the ascending target ids `draft_ids`."""
    ids = torch.tensor(draft_ids, dtype=torch.int64)
    d2t = ids - torch.arange(len(draft_ids), dtype=torch.int64)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d
