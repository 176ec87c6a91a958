"""Regenerate the assistant turns of the training conversations with the target itself.

A draft is judged on how well it predicts the target's own (greedy) continuations,
while chat data sets hold another model's replies. Training on the target's replies
to the same prompts ("self-distillation", as EAGLE and SpecForge recommend) moves the
training distribution onto the one the draft serves.

`regenerate` reads `data.sources`, keeps every conversation in its place and writes
a JSONL file (`{"messages": [...]}` per line) in which the training conversations'
assistant turns are the target's greedy replies: turn by turn, each reply generated
after the user turns and the replies generated so far. Held-out conversations and
those beyond `data.max_samples` are written unchanged, so the file read with the same
`data.seed` and `data.num_heldout` has the same split, and `evaluate` sees the same
held-out prompts. A conversation whose first reply cannot be generated (no room left
within `data.max_length`, or an immediate end of turn) is kept as it was; later empty
replies end the conversation there. The file is written atomically.

Precision: the target runs on capture.device, in float32 unless capture.dtype names
another dtype (as in evaluate: these replies are then the very greedy decode that
evaluation compares against).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from draftflow.data.conversations import Conversation, Message, load_conversations
from draftflow.data.prepare import prompt_ids, split_indices
from draftflow.fsutil import write_atomic

_LOG = logging.getLogger("draftflow.data")
# Padded prompt tokens per generate call: the prefill of long prompts is what costs
# (an attention mask over left padding rules out the fused kernels).
PREFILL_TOKENS = 65536


@dataclass(frozen=True, slots=True)
class RegenerateStats:
    conversations: int  # written, in the order read
    regenerated: int  # with at least their first reply generated
    replies: int
    new_tokens: int
    seconds: float


@dataclass(slots=True)
class _Chat:
    """One conversation being regenerated: its history so far and the user turns left."""

    history: list[Message]
    user_turns: list[Message]
    replies: int = 0


def _start(conv: Conversation, max_turns: int) -> _Chat:
    leading = []
    for m in conv.messages:
        if m.role == "user":
            break
        leading.append(m)  # system prompt(s)
    users = [m for m in conv.messages if m.role == "user"][:max_turns]
    return _Chat(history=leading, user_turns=users)


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_replies(model, prompts: list[list[int]], budgets: list[int], eos_ids: set[int], pad_id: int,
                   batch_size: int) -> list[list[int]]:
    """The target's greedy continuation of each prompt, at most `budgets[i]` tokens,
    cut before the first end-of-turn id. Prompts are batched by length, left-padded."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches, begin = [], 0
    while begin < len(order):  # longest first; at most batch_size rows and PREFILL_TOKENS padded tokens
        rows = max(1, min(batch_size, PREFILL_TOKENS // len(prompts[order[begin]])))
        batches.append(order[begin:begin + rows])
        begin += rows
    begin = 0
    for idx in batches:
        begin += len(idx)
        ids, mask = _left_pad([prompts[i] for i in idx], pad_id, device)
        gen = GenerationConfig(max_new_tokens=max(budgets[i] for i in idx), do_sample=False,
                               eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
        start = time.perf_counter()
        new = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.shape[1]:]
        _LOG.info("regenerate: %d/%d prompts, batch of %d x %d prompt tokens -> %d new in %.1f s",
                  begin, len(order), len(idx), ids.shape[1], new.shape[1], time.perf_counter() - start)
        for row, i in zip(new.tolist(), idx):
            row = row[:budgets[i]]
            end = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
            out[i] = row[:end]
    return out


def regenerate_conversations(model, tok, conversations: list[Conversation], which: list[int], *,
                             max_length: int, max_new_tokens: int, max_turns: int, batch_size: int,
                             max_prompt_tokens: int, eos_ids: set[int], log: logging.Logger = _LOG
                             ) -> tuple[list[Conversation], int, int]:
    """Replace the assistant turns of `conversations[i]` for i in `which`; returns the
    new list (same length and order), the number of replies and of generated tokens."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids)
    chats = {i: _start(conversations[i], max_turns) for i in which}
    replies = tokens = 0
    for turn in range(max_turns):
        active = [i for i, c in chats.items() if len(c.user_turns) > turn and c.replies == turn]
        prompts, budgets, asked = [], [], []
        for i in active:
            ids = prompt_ids(tok, [*chats[i].history, chats[i].user_turns[turn]])
            budget = min(max_new_tokens, max_length - len(ids))
            if budget > 0 and len(ids) <= max_prompt_tokens:
                prompts.append(ids)
                budgets.append(budget)
                asked.append(i)
        if not asked:
            break
        start = time.perf_counter()
        for i, reply in zip(asked, greedy_replies(model, prompts, budgets, eos_ids, pad_id, batch_size)):
            text = tok.decode(reply, skip_special_tokens=True)
            if not text.strip():
                continue  # nothing to train on: the conversation ends before this turn
            chat = chats[i]
            chat.history += [chat.user_turns[turn], Message(role="assistant", content=text)]
            chat.replies += 1
            replies += 1
            tokens += len(reply)
        log.info("regenerate: turn %d, %d replies in %.0f s", turn + 1, len(asked), time.perf_counter() - start)
    out = list(conversations)
    for i, chat in chats.items():
        if chat.replies:
            out[i] = Conversation(source=out[i].source, line=out[i].line, messages=tuple(chat.history))
    return out, replies, tokens


def write_jsonl(path: Path, conversations: list[Conversation]) -> None:
    """All conversations as `{"messages": [...]}` lines, published atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps({"messages": [m.to_dict() for m in conv.messages]}, ensure_ascii=False)
                               + "\n" for conv in conversations).encode())


def regenerate(cfg, out: str | Path, *, max_new_tokens: int = 512, max_turns: int = 1, batch_size: int = 64,
               max_prompt_tokens: int | None = None, log: logging.Logger = _LOG) -> RegenerateStats:
    """Write `cfg.data`'s conversations to `out` with the training ones' replies
    regenerated by `cfg.target` (see the module doc)."""
    from draftflow.capture.capture import resolve_device_dtype
    from draftflow.capture.target import load_target, target_eos_ids
    from draftflow.data.tokenizer import load_tokenizer
    from draftflow.roles import tokenizer_spec

    for name, value in (("max_new_tokens", max_new_tokens), ("max_turns", max_turns), ("batch_size", batch_size),
                        ("max_prompt_tokens", 1 if max_prompt_tokens is None else max_prompt_tokens)):
        if value < 1:
            raise ValueError(f"regenerate: {name}={value}, expected at least 1")
    out = Path(out)
    start = time.perf_counter()
    conversations = load_conversations(cfg.data.sources, cfg.data.strict, log)
    which = sorted(split_indices(len(conversations), cfg.data)[1])
    tok = load_tokenizer(tokenizer_spec(cfg))
    device, dtype = resolve_device_dtype(cfg.capture)
    if cfg.capture.dtype == "auto":
        dtype = torch.float32  # the greedy decode evaluate compares against
    target = load_target(cfg.target, device, dtype)
    eos = ({tok.eos_token_id} if tok.eos_token_id is not None else set()) | target_eos_ids(target.config)
    if not eos:
        raise ValueError("regenerate: neither the tokenizer nor the target config names an eos token")
    log.info("regenerate: %d of %d conversations, up to %d turn(s) of %d tokens, on %s (%s)", len(which),
             len(conversations), max_turns, max_new_tokens, device, str(dtype).removeprefix("torch."))
    new, replies, tokens = regenerate_conversations(
        target.model, tok, conversations, which, max_length=cfg.data.max_length, max_new_tokens=max_new_tokens,
        max_turns=max_turns, batch_size=batch_size, eos_ids=eos, log=log,
        max_prompt_tokens=cfg.data.max_length if max_prompt_tokens is None else max_prompt_tokens)
    write_jsonl(out, new)
    changed = sum(a is not b for a, b in zip(conversations, new))
    return RegenerateStats(conversations=len(new), regenerated=changed, replies=replies, new_tokens=tokens,
                           seconds=time.perf_counter() - start)
