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
held-out prompts. For the same reason, under `data.dedupe` a regenerated conversation
that would repeat an earlier one (two training conversations with one prompt get one
greedy reply) keeps its original replies: the copy would be dropped when the file is
read, and the split of the shorter list would differ (`keep_distinct`). A conversation
whose first reply cannot be generated (no room left within `data.max_length`, or an
immediate end of turn) is kept as it was; later empty replies end the conversation
there. The file is written atomically.

Precision: the target runs on capture.device, in float32 unless capture.dtype names
another dtype (as in evaluate: these replies are then the very greedy decode that
evaluation compares against).

Workers: on CUDA (capture.device `cuda`), one process per visible GPU by default, each
with its own copy of the target; every turn's prompts are dealt out longest first, so
the workers get similar shares. A reply does not depend on which worker or batch
produced it up to floating-point batch effects (exact on CPU, where `workers` > 1 runs
several processes too).
"""

from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from draftflow.data.conversations import Conversation, Message
from draftflow.data.prepare import (load_split_conversations, messages_key, next_reply_header, next_turn_header,
                                    prompt_ids, split_indices)
from draftflow.fsutil import write_atomic

_LOG = logging.getLogger("draftflow.data")
# Padded prompt tokens per generate call by default: the prefill of long prompts is what
# costs memory (an attention mask over left padding rules out the fused kernels).
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
                   batch_size: int, batch_tokens: int = PREFILL_TOKENS) -> list[list[int]]:
    """The target's greedy continuation of each prompt, at most `budgets[i]` tokens,
    cut before the first end-of-turn id. Prompts are batched by length, left-padded,
    at most batch_size rows and batch_tokens padded prompt tokens a batch."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches, begin = [], 0
    while begin < len(order):  # longest first
        rows = max(1, min(batch_size, batch_tokens // len(prompts[order[begin]])))
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


Generate = Callable[[list[list[int]], list[int]], list[list[int]]]  # (prompts, budgets) -> replies


def regenerate_conversations(generate: Generate, tok, conversations: list[Conversation], which: list[int], *,
                             max_length: int, max_new_tokens: int, max_turns: int, max_prompt_tokens: int,
                             log: logging.Logger = _LOG) -> tuple[list[Conversation], int, int]:
    """Replace the assistant turns of `conversations[i]` for i in `which`, with replies
    from `generate`; returns the new list (same length and order), the number of
    replies and of generated tokens."""
    chats = {i: _start(conversations[i], max_turns) for i in which}
    replies = tokens = cut = 0
    # A pretrained model rarely emits EOS: after its reply it writes the user's next turn,
    # or another reply, itself. The reply ends where the template would start either.
    headers = [h for h in (next_turn_header(tok), next_reply_header(tok)) if h]
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
        for i, reply in zip(asked, generate(prompts, budgets)):
            # as emitted: replies end before EOS, and tags a tokenizer marks special
            # (<think> in some reasoning models) delimit what train_reasoning keeps
            text = tok.decode(reply, skip_special_tokens=False)
            ends = [text.index(h) for h in headers if h in text]
            if ends:
                text, cut = text[:min(ends)], cut + 1
            visible = text
            for special in tok.all_special_tokens:
                visible = visible.replace(special, "")
            if not visible.strip():
                continue  # nothing to train on: the conversation ends before this turn
            chat = chats[i]
            chat.history += [chat.user_turns[turn], Message(role="assistant", content=text)]
            chat.replies += 1
            replies += 1
            tokens += len(reply)
        log.info("regenerate: turn %d, %d replies in %.0f s", turn + 1, len(asked), time.perf_counter() - start)
    if cut:
        log.info("regenerate: %d replies cut where the target went on to write the next turn (%s)", cut,
                 " or ".join(map(repr, headers)))
    out = list(conversations)
    for i, chat in chats.items():
        if chat.replies:
            out[i] = Conversation(source=out[i].source, line=out[i].line, messages=tuple(chat.history))
    return out, replies, tokens


def keep_distinct(original: list[Conversation], new: list[Conversation],
                  log: logging.Logger = _LOG) -> list[Conversation]:
    """`new`, except that a regenerated conversation equal to an earlier one keeps its
    original replies. Two training conversations with the same prompt get the same greedy
    reply; read back under `data.dedupe` the copy would be dropped, and the seeded split
    of the shorter list would hold out other conversations than this run held out."""
    seen, out, kept = set(), [], 0
    for old, conv in zip(original, new):
        key = messages_key(conv.messages)
        if conv is not old and key in seen:
            conv, key, kept = old, messages_key(old.messages), kept + 1
        seen.add(key)
        out.append(conv)
    if kept:
        log.info("regenerate: %d conversation(s) keep their original replies: regenerated, they repeat an "
                 "earlier conversation, which data.dedupe would drop and so change the split", kept)
    if len(seen) < len(out):  # an original reply equal to an earlier regenerated one: rare, and only warned
        log.warning("regenerate: %d conversation(s) still repeat an earlier one; read back with "
                    "data.dedupe, the file splits differently from this run", len(out) - len(seen))
    return out


def write_jsonl(path: Path, conversations: list[Conversation]) -> None:
    """All conversations as `{"messages": [...]}` lines, published atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps({"messages": [m.to_dict() for m in conv.messages]}, ensure_ascii=False)
                               + "\n" for conv in conversations).encode())


def _worker_main(device: str, target_cfg, dtype: torch.dtype, eos_ids: set[int], pad_id: int, batching: tuple,
                 tasks, results) -> None:
    """A worker process: its own target on `device`, answering (prompts, budgets) tasks
    until it gets None."""
    from draftflow.capture.target import load_target

    try:
        model = load_target(target_cfg, torch.device(device), dtype).model
        results.put(("ready", None))
        while (task := tasks.get()) is not None:
            results.put(("ok", greedy_replies(model, *task, eos_ids, pad_id, *batching)))
    except BaseException as e:  # reported to the parent, which names the device
        results.put(("error", f"{type(e).__name__}: {e}"))


class _Workers:
    """`generate` spread over the parent (the first device) and one process per other
    device; a failed or vanished worker raises instead of hanging."""

    def __init__(self, local: Generate, devices: list[str], target_cfg, dtype, eos_ids, pad_id, batching):
        ctx = torch.multiprocessing.get_context("spawn")
        self.local, self.devices, self.workers = local, devices, []
        try:
            for device in devices[1:]:
                tasks, results = ctx.Queue(), ctx.Queue()
                proc = ctx.Process(target=_worker_main, daemon=True, name=f"regenerate-{device}",
                                   args=(device, target_cfg, dtype, eos_ids, pad_id, batching, tasks, results))
                proc.start()
                self.workers.append((device, proc, tasks, results))
            for worker in self.workers:
                self._result(worker)  # each has loaded its target
        except BaseException:
            self.close()  # no worker outlives a failed start
            raise

    def _result(self, worker):
        device, proc, _, results = worker
        while True:
            try:
                kind, value = results.get(timeout=5)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"regenerate: the worker on {device} exited (code {proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"regenerate: the worker on {device} failed: {value}")
        return value

    def __call__(self, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
        n = len(self.devices)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        shares = [order[w::n] for w in range(n)]  # dealt out longest first: similar work each
        for (_, _, tasks, _), share in zip(self.workers, shares[1:]):
            tasks.put(([prompts[i] for i in share], [budgets[i] for i in share]))
        out: list[list[int]] = [[] for _ in prompts]
        parts = [self.local([prompts[i] for i in shares[0]], [budgets[i] for i in shares[0]])]
        parts += [self._result(worker) for worker in self.workers]
        for share, replies in zip(shares, parts):
            for i, reply in zip(share, replies):
                out[i] = reply
        return out

    def close(self) -> None:
        """Stop every worker: idle ones end on None; busy ones (after an error
        elsewhere) are killed rather than waited for."""
        for _, proc, tasks, _ in self.workers:
            if proc.is_alive():
                tasks.put(None)
        for _, proc, _, _ in self.workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def worker_devices(device: torch.device, workers: int | None) -> list[str]:
    """The device of each worker: the visible GPUs from `device` on (one each by
    default), or `workers` processes on the CPU."""
    if device.type == "cuda":
        first = device.index or 0
        visible = torch.cuda.device_count() - first
        n = visible if workers is None else workers
        if not 1 <= n <= visible:
            raise ValueError(f"regenerate: workers={n}, expected 1 to {visible} (the GPUs visible from {device})")
        return [f"cuda:{first + w}" for w in range(n)]
    n = 1 if workers is None else workers
    if n < 1:
        raise ValueError(f"regenerate: workers={n}, expected at least 1")
    return [str(device)] * n


def regenerate(cfg, out: str | Path, *, max_new_tokens: int = 512, max_turns: int = 1, batch_size: int = 64,
               max_prompt_tokens: int | None = None, workers: int | None = None,
               batch_tokens: int | None = None, log: logging.Logger = _LOG) -> RegenerateStats:
    """Write `cfg.data`'s conversations to `out` with the training ones' replies
    regenerated by `cfg.target` (see the module doc); `workers` processes (default:
    one per visible GPU on CUDA, one on CPU)."""
    from draftflow.capture.capture import resolve_device_dtype
    from draftflow.capture.target import load_target, target_eos_ids
    from draftflow.roles import target_tokenizer

    max_prompt_tokens = cfg.data.max_length if max_prompt_tokens is None else max_prompt_tokens
    batch_tokens = PREFILL_TOKENS if batch_tokens is None else batch_tokens
    for name, value in (("max_new_tokens", max_new_tokens), ("max_turns", max_turns), ("batch_size", batch_size),
                        ("max_prompt_tokens", max_prompt_tokens), ("batch_tokens", batch_tokens)):
        if value < 1:
            raise ValueError(f"regenerate: {name}={value}, expected at least 1")
    out = Path(out)
    start = time.perf_counter()
    device, dtype = resolve_device_dtype(cfg.capture)
    devices = worker_devices(device, workers)
    conversations = load_split_conversations(cfg.data, log)
    which = sorted(split_indices(conversations, cfg.data, log)[1])
    tok = target_tokenizer(cfg)
    if cfg.capture.dtype == "auto":
        dtype = torch.float32  # the greedy decode evaluate compares against
    target = load_target(cfg.target, torch.device(devices[0]), dtype)  # (converts a GGUF once, for all)
    eos = ({tok.eos_token_id} if tok.eos_token_id is not None else set()) | target_eos_ids(target.config)
    if not eos:
        raise ValueError("regenerate: neither the tokenizer nor the target config names an eos token")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    log.info("regenerate: %d of %d conversations, up to %d turn(s) of %d tokens, on %s (%s)", len(which),
             len(conversations), max_turns, max_new_tokens, ", ".join(devices), str(dtype).removeprefix("torch."))

    batching = (batch_size, batch_tokens)

    def local(prompts, budgets):
        return greedy_replies(target.model, prompts, budgets, eos, pad_id, *batching)

    generate = _Workers(local, devices, cfg.target, dtype, eos, pad_id, batching) if len(devices) > 1 else None
    try:
        new, replies, tokens = regenerate_conversations(
            generate or local, tok, conversations, which, max_length=cfg.data.max_length,
            max_new_tokens=max_new_tokens, max_turns=max_turns, log=log,
            max_prompt_tokens=max_prompt_tokens)
    finally:
        if generate is not None:
            generate.close()
    if cfg.data.dedupe:
        new = keep_distinct(conversations, new, log)
    write_jsonl(out, new)
    changed = sum(a is not b for a, b in zip(conversations, new))
    return RegenerateStats(conversations=len(new), regenerated=changed, replies=replies, new_tokens=tokens,
                           seconds=time.perf_counter() - start)
