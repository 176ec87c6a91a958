"""Greedy chain speculative decoding of a frozen target with a draft, verified exactly.

Each round the proposer drafts `depth` tokens one after another, the target scores all
of them in one forward, and the longest prefix equal to the target's own argmax is kept
plus one token from the target (the correction, or the bonus when everything was
accepted). So the output is, token for token, the target's greedy decode.

Alignment (as in training): at position t the EAGLE3 draft is fed the target's aux
features of t and the embedding of token t+1, and predicts token t+2; chained draft step
k sits at rope position t+k. `evaluate.py` measures tau with these loops.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from transformers import DynamicCache

from draftflow.train.model import DraftCache, Eagle3Draft, decode_step


# ---------------------------------------------------------------- the target with its cache

def _cache_kwarg(model) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); accept both versions.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _TargetRunner:
    """The target with its own KV cache; each forward also returns the aux layers' outputs
    (kept by forward hooks, as capture does, so no other layer's states are held)."""

    def __init__(self, model, aux_layer_ids: Sequence[int]):
        self.model, self.aux_layer_ids = model, list(aux_layer_ids)
        # A cache of plain full layers for every family. Sliding-window layers (Gemma 3,
        # Mistral, gpt-oss) still see only their window: transformers builds their masks
        # from config.sliding_window and the positions. But no layer drops keys, so a
        # rejected draft can always be cropped; the price, accepted for evaluation, is that
        # those layers hold and mask every past key. (The config-built cache's sliding layers
        # keep only the window; with past recording on, transformers 5.17 still sized
        # their masks to the window and failed once a sequence outgrew it.)
        self.cache = DynamicCache()
        self.device = next(model.parameters()).device
        self._cache_kw = _cache_kwarg(model)
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "_TargetRunner":
        for i in self.aux_layer_ids:
            self._handles.append(self.model.model.layers[i].register_forward_hook(self._keeper(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keeper(self, i: int):
        def hook(module, args, output):
            self._outputs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, ids: list[int], logits_to_keep: int = 0):
        """Extend the cache by `ids`; return (argmax of the kept logits, aux [1, n, 3H] or None)."""
        input_ids = torch.tensor([ids], dtype=torch.int64, device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep,
                         **{self._cache_kw: self.cache})
        argmax = out.logits[0].argmax(-1).tolist()
        aux = torch.cat([self._outputs.pop(i) for i in self.aux_layer_ids], -1) if self.aux_layer_ids else None
        return argmax, aux

    def crop(self, length: int) -> None:
        # A negative count removes that many entries (the positive "keep" form is gone in 5.2x).
        if self.length > length:
            self.cache.crop(-(self.length - length))


# ---------------------------------------------------------------- decoding

class ChainProposer(Protocol):
    """What speculative decoding asks of a draft."""

    def observe(self, next_ids: list[int], aux_bta: torch.Tensor) -> None:
        """Verified positions p..p+m-1 arrive with the target's aux features [1, m, 3H]
        and the tokens that follow each (the tokens at p+1..p+m)."""

    def propose(self, depth: int) -> list[int]:
        """`depth` target token ids continuing the verified sequence."""


class Eagle3Proposer:
    """An Eagle3Draft served as a chain proposer with its own KV cache (`DraftCache`)."""

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft
        self.cache = DraftCache()
        self.num_verified = 0
        self.last_hidden: torch.Tensor | None = None  # [1, 1, H] at position num_verified - 1
        self.device = draft.fc.weight.device

    def observe(self, next_ids: list[int], aux_bta: torch.Tensor) -> None:
        # Entries of the last chain were drafted, not verified: drop them first.
        self.cache.truncate(self.num_verified)
        p, m = self.num_verified, len(next_ids)
        ids = torch.tensor([next_ids], dtype=torch.int64, device=self.device)
        positions = torch.arange(p, p + m, device=self.device)[None]
        hidden = decode_step(self.draft, ids, self.draft.project_aux(aux_bta.to(self.device)), positions, self.cache)
        self.last_hidden, self.num_verified = hidden[:, -1:], p + m

    def propose(self, depth: int) -> list[int]:
        tokens, hidden = [], self.last_hidden
        for k in range(depth):
            tokens.append(self._target_id(hidden))
            if k + 1 < depth:
                # Drafted token k sits right after the previous one: position p + k.
                ids = torch.tensor([[tokens[-1]]], dtype=torch.int64, device=self.device)
                position = torch.tensor([[self.num_verified + k]], device=self.device)
                hidden = decode_step(self.draft, ids, self.draft.carry(hidden), position, self.cache)
        return tokens

    def _target_id(self, hidden_b1h: torch.Tensor) -> int:
        draft_id = int(self.draft.logits(hidden_b1h)[0, -1].argmax())
        return draft_id + int(self.draft.d2t[draft_id])


@dataclass(frozen=True, slots=True)
class RoundStats:
    drafted: int  # draft tokens proposed this round
    accepted: int  # leading draft tokens equal to the target's argmax
    produced: int  # tokens appended: accepted + 1, fewer when EOS ended the output


@dataclass(frozen=True, slots=True)
class Generation:
    tokens: list[int]  # new tokens, the EOS included when one ended the output
    rounds: list[RoundStats]  # one per verify forward; the prefill is not a round

    @property
    def target_forwards(self) -> int:
        return 1 + len(self.rounds)


def accept_length(drafted: Sequence[int], target_argmax: Sequence[int]) -> int:
    """How many leading drafted tokens equal the target's argmax at the same place."""
    n = 0
    while n < len(drafted) and drafted[n] == target_argmax[n]:
        n += 1
    return n


def _until_eos(tokens: list[int], eos_ids: frozenset[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens


def _prompt_list(prompt_ids) -> list[int]:
    ids = torch.as_tensor(prompt_ids).reshape(-1).tolist()
    if not ids:
        raise ValueError("prompt_ids: empty prompt")
    return ids


def speculative_decode(target_model, proposer: ChainProposer, aux_layer_ids: Sequence[int], prompt_ids,
                       max_new_tokens: int, depth: int, eos_ids: Sequence[int] = ()) -> Generation:
    """Greedy chain speculative decoding of `prompt_ids` with any `ChainProposer`."""
    if max_new_tokens < 1 or depth < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, depth={depth}: expected both >= 1")
    prompt, eos = _prompt_list(prompt_ids), frozenset(eos_ids)
    with torch.inference_mode(), _TargetRunner(target_model, aux_layer_ids) as target:
        argmax, aux = target.forward(prompt, logits_to_keep=1)
        tokens, rounds = [argmax[-1]], []
        observed_ids = prompt[1:] + tokens  # the token after each prefilled position
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            proposer.observe(observed_ids, aux)
            # Never draft past the budget: the round's target token is always produced.
            drafted = proposer.propose(min(depth, max_new_tokens - len(tokens) - 1))
            verified = target.length
            argmax, aux = target.forward([tokens[-1], *drafted])
            accepted = accept_length(drafted, argmax)
            new = drafted[:accepted] + [argmax[accepted]]
            target.crop(verified + accepted + 1)
            kept = _until_eos(new, eos)
            tokens += kept
            rounds.append(RoundStats(drafted=len(drafted), accepted=accepted, produced=len(kept)))
            observed_ids, aux = new, aux[:, :accepted + 1]
    return Generation(tokens=tokens, rounds=rounds)


def speculative_generate(target_model, draft: Eagle3Draft, aux_layer_ids: Sequence[int], prompt_ids,
                         max_new_tokens: int, depth: int, eos_ids: Sequence[int] = ()) -> Generation:
    """Greedy chain speculative decoding with an EAGLE3 draft; the output equals the
    target's greedy decode, and `Generation.rounds` tells how much the draft saved."""
    return speculative_decode(target_model, Eagle3Proposer(draft), aux_layer_ids, prompt_ids,
                              max_new_tokens, depth, eos_ids)


def greedy_generate(target_model, prompt_ids, max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[int]:
    """Plain greedy decoding with a KV cache: one target forward per new token."""
    prompt, eos = _prompt_list(prompt_ids), frozenset(eos_ids)
    with torch.inference_mode(), _TargetRunner(target_model, ()) as target:
        argmax, _ = target.forward(prompt, logits_to_keep=1)
        tokens = [argmax[-1]]
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            argmax, _ = target.forward([tokens[-1]], logits_to_keep=1)
            tokens.append(argmax[-1])
    return tokens
