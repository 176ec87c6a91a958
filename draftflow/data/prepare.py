"""Turn conversations into token ids plus a loss mask that is 1 exactly on assistant tokens.

The mask is found from the chat template itself, with no `{% generation %}`
markers needed: rendering the conversation up to each assistant turn (with the
generation prompt) and through it gives that turn's character span in the full
rendering; the tokenizer's offset mapping turns spans into token positions. So
role headers and any default system prompt a template inserts stay at 0, and the
assistant's content plus the end-of-turn token(s) the template appends are 1.

Reasoning templates (Qwen3-style) render an assistant turn as a think block, then the
reply, and drop the reasoning of turns before the last user message, so a turn renders
differently depending on what follows it. There the spans are found by locating each
turn's reply, in order, after its generation header. A think block at the start of a
span is left out of the loss when empty (a template writes one when thinking is off;
the model never generates it) and, under `data.train_reasoning: false`, always.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from draftflow.config import DataConfig
from draftflow.data.conversations import Conversation, Message, load_conversations, prompt_turns
from draftflow.fsutil import fsync_dir

_LOG = logging.getLogger("draftflow.data")


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PreparedSample:
    """One tokenised conversation, as the target will see it (no padding)."""

    sample_id: str  # "s000042" for train, "h000003" for held-out samples
    index: int  # position in its split; fixes the training order
    input_ids: torch.Tensor = field(repr=False)  # int64 [T]
    loss_mask: torch.Tensor = field(repr=False)  # uint8 [T], 1 on assistant tokens
    origin: str = ""  # "source:line" of the conversation, for messages

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PreparedData:
    train: list[PreparedSample]
    heldout: list[PreparedSample]


# ---------------------------------------------------------------- one conversation

def tokenize_conversation(tok, messages: Sequence[Message | dict], max_length: int, train_reasoning: bool = True
                          ) -> tuple[list[int], list[int]]:
    """Render `messages` with `tok`'s chat template; return (input_ids, loss_mask).

    The loss mask is 1 on the tokens of each assistant message's content and the
    end-of-turn token(s) after it, 0 elsewhere (see the module docstring for think
    blocks). Both lists are cut to `max_length`. Raises ValueError if an assistant
    turn cannot be located in the rendering.
    """
    return _encode(tok, [render_with_spans(tok, messages, train_reasoning)], max_length)[0]


def prompt_ids(tok, messages: Sequence[Message | dict]) -> list[int]:
    """Token ids of `messages` rendered with the generation prompt (what the target
    continues with an assistant reply), with a BOS where the tokenizer expects one."""
    chat = [m.to_dict() if isinstance(m, Message) else dict(m) for m in messages]
    return _encode(tok, [(_render(tok, chat, generation_prompt=True), [])], 2 ** 62)[0][0]


def next_turn_header(tok) -> str | None:
    """What the chat template writes between an assistant reply and the next user
    message, trailing whitespace dropped ("\n\nUser:" for builtin:plain,
    "<|im_end|>\n<|im_start|>user" for ChatML); None where the template writes only
    whitespace there or does not render the probe in order."""
    return _written_after_a_reply(tok, "user")


def next_reply_header(tok) -> str | None:
    """What the chat template writes between an assistant reply and a second assistant
    message right after it ("\n\nAssistant:" for builtin:plain); None where it writes only
    whitespace there, or refuses two assistant messages in a row."""
    return _written_after_a_reply(tok, "assistant")


def _written_after_a_reply(tok, next_role: str) -> str | None:
    reply, nxt = "\x00reply\x00", "\x00next\x00"
    try:
        text = _render(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply},
                             {"role": next_role, "content": nxt}], generation_prompt=False)
    except ValueError:  # e.g. a template that insists on alternating roles
        return None
    start, end = text.find(reply), text.find(nxt)
    if start < 0 or end < start + len(reply):
        return None
    return text[start + len(reply):end].rstrip() or None


def render_with_spans(tok, messages: Sequence[Message | dict], train_reasoning: bool = True
                      ) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template rendering and the [start, end) character span of each assistant turn."""
    chat = [m.to_dict() if isinstance(m, Message) else dict(m) for m in messages]
    full, spans = _assistant_spans(tok, chat)
    return full, [_past_think_block(full, a, b, train_reasoning) for a, b in spans]


def _encode(tok, rendered: list[tuple[str, list[tuple[int, int]]]], max_length: int
            ) -> list[tuple[list[int], list[int]]]:
    """Tokenise rendered conversations in one call (a fast tokenizer spreads a batch
    over threads) and turn their spans into loss masks."""
    if not rendered:
        return []
    enc = tok([text for text, _ in rendered], add_special_tokens=False,
              return_offsets_mapping=True)
    bos_id = tok.bos_token_id if _tokenizer_adds_bos(tok) else None
    out = []
    for (text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        # The tokenizer expects a BOS the template did not write: add it, never as a target.
        add_bos = bos_id is not None and not text.startswith(tok.bos_token)
        keep = max_length - 1 if add_bos else max_length
        ids, mask = list(ids[:keep]), _mask_from_offsets(offsets[:keep], spans)
        out.append(([bos_id] + ids, [0] + mask) if add_bos else (ids, mask))
    return out


def _render(tok, chat: list[dict], generation_prompt: bool) -> str:
    try:
        return tok.apply_chat_template(chat, tokenize=False,
                                       add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises its own types (and raise_exception in templates)
        raise ValueError(f"chat template failed on a conversation of {len(chat)} message(s) "
                         f"({type(e).__name__}: {e})") from None


class _RendersDifferently(ValueError):
    pass


def _assistant_spans(tok, chat: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the [start, end) character span of each assistant turn:
    by rendering prefixes where the template renders a turn the same whatever follows,
    else by locating each reply (reasoning templates)."""
    full = _render(tok, chat, generation_prompt=False)
    try:
        return full, _spans_by_prefix(tok, chat, full)
    except _RendersDifferently as e:
        return full, _spans_by_search(tok, chat, full, e)


def _spans_by_prefix(tok, chat: list[dict], full: str) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        before = _render(tok, chat[:i], generation_prompt=True)
        through = _render(tok, chat[:i + 1], generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through)
                and len(before) <= len(through)):
            raise _RendersDifferently(
                f"chat template renders message {i} (assistant) differently depending on what "
                "follows it, so its span cannot be located; expected the rendering of "
                "messages[:i] (with generation prompt) and of messages[:i+1] to be prefixes "
                "of the whole conversation's rendering")
        # Trailing whitespace after the end-of-turn token (ChatML's "\n") is never
        # generated by the model: keep it out of the loss. A template that ends a turn
        # with whitespace alone (builtin:plain's paragraph break) has no end-of-turn
        # token: that whitespace is how the model ends its reply, so it is trained.
        turn = through[len(before):]
        ends_bare = turn.rstrip() == message["content"].rstrip()
        spans.append((len(before), len(through) if ends_bare else len(before) + len(turn.rstrip())))
    return spans


THINK_BLOCK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)  # at the start of an assistant span


def _reply_text(content: str) -> str:
    """What a reasoning template renders as the reply: the content after its think block."""
    match = THINK_BLOCK.match(content)
    return (content[match.end():] if match else content).strip()


def _spans_by_search(tok, chat: list[dict], full: str, why: ValueError) -> list[tuple[int, int]]:
    """Each assistant turn from its generation header to the end-of-turn text after its
    reply, found in order in the full rendering."""
    asked = [{"role": "user", "content": "u"}]
    prompt, plain = _render(tok, asked, generation_prompt=True), _render(tok, asked, generation_prompt=False)
    header_end = prompt[len(plain):] if prompt.startswith(plain) else ""  # e.g. "<|im_start|>assistant\n"
    probe = "\x00reply\x00"
    rendered = _render(tok, [*asked, {"role": "assistant", "content": probe}], False)
    end_of_turn = rendered[rendered.index(probe) + len(probe):].rstrip() if probe in rendered else ""
    spans, cursor = [], 0
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        reply = _reply_text(message["content"])
        at = full.find(reply, cursor) if reply else -1
        header = full.rfind(header_end, cursor, at) if header_end and at >= 0 else -1
        if at < 0 or header < 0:
            raise ValueError(f"{why}; locating the reply of message {i} after its generation header "
                             f"{header_end!r} failed too") from None
        end = at + len(reply)
        if end_of_turn and full.startswith(end_of_turn, end):
            end += len(end_of_turn)
        spans.append((header + len(header_end), end))
        cursor = end
    return spans


def _past_think_block(full: str, a: int, b: int, train_reasoning: bool) -> tuple[int, int]:
    """The span without a leading think block that is empty, or any under
    `train_reasoning: false` (the reply and end of turn stay)."""
    match = THINK_BLOCK.match(full, a, b)
    if match and (not match.group(1).strip() or not train_reasoning):
        return match.end(), b
    return a, b


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap an assistant span.

    A token that straddles a span's start (e.g. "\\n\\n" merging the header's newline
    with the content's) carries content, so it counts as assistant. Empty offsets
    (possible with trimmed whitespace) are treated as one character wide.
    """
    if not offsets:
        return []
    off = torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2)
    starts, ends = off[:, 0], torch.maximum(off[:, 1], off[:, 0] + 1)
    mask = torch.zeros(len(off), dtype=torch.bool)
    for a, b in spans:
        mask |= (starts < b) & (ends > a)
    return mask.to(torch.uint8).tolist()


def _tokenizer_adds_bos(tok) -> bool:
    """Whether the tokenizer itself puts a BOS in front of text (Llama-style)."""
    if not getattr(tok, "bos_token", None):
        return False
    with_special = tok("x", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == tok.bos_token_id


# ---------------------------------------------------------------- the dataset

def prepare_dataset(data_cfg: DataConfig, tok, log: logging.Logger = _LOG) -> PreparedData:
    """Load, shuffle (seeded), split and tokenise the configured conversations.

    The first `num_heldout` shuffled conversations are held out; the next
    `max_samples` (all if None) are the training set. Samples left with no
    assistant token after truncation to `max_length` are skipped and counted.
    """
    _check_config(data_cfg)
    conversations = load_split_conversations(data_cfg, log)
    heldout_idx, train_idx = split_indices(conversations, data_cfg, log)
    heldout_convs = [conversations[i] for i in heldout_idx]
    train_convs = [conversations[i] for i in train_idx]
    heldout, skipped_h = _tokenize_split(tok, heldout_convs, data_cfg.max_length, "h", data_cfg.train_reasoning)
    train, skipped_t = _tokenize_split(tok, train_convs, data_cfg.max_length, "s", data_cfg.train_reasoning)
    if not train:
        raise ValueError(f"data: no training samples (from {len(train_convs)} conversation(s), "
                         f"{len(skipped_t)} without an assistant token within "
                         f"max_length={data_cfg.max_length})")
    _log_summary(log, data_cfg, len(conversations), train, heldout, skipped_t + skipped_h)
    return PreparedData(train=train, heldout=heldout)


def load_split_conversations(data_cfg: DataConfig, log: logging.Logger = _LOG) -> list[Conversation]:
    """The configured conversations that `split_indices` splits: under `data.dedupe` each
    distinct conversation once (the first occurrence), so a repeated one is neither
    trained on twice nor found on both sides of the split."""
    conversations = load_conversations(data_cfg.sources, data_cfg.strict, log)
    if data_cfg.dedupe:
        first: dict[tuple, Conversation] = {}
        for c in conversations:
            first.setdefault(messages_key(c.messages), c)
        unique = list(first.values())
        if len(unique) < len(conversations):
            log.info("data: %d of %d conversation(s) kept, %d exact duplicate(s) dropped (data.dedupe)",
                     len(unique), len(conversations), len(conversations) - len(unique))
        conversations = unique
    if data_cfg.num_heldout >= len(conversations):
        raise ValueError(f"data.num_heldout={data_cfg.num_heldout}: only {len(conversations)} "
                         f"conversation(s) were read from {data_cfg.sources}; expected more "
                         "than num_heldout")
    return conversations


def split_indices(conversations: Sequence[Conversation], data_cfg: DataConfig,
                  log: logging.Logger = _LOG) -> tuple[list[int], list[int]]:
    """(held-out, training) conversation indices, each in shuffled order: after a seeded
    shuffle the first `num_heldout` are held out, the next `max_samples` (all if None) train.
    Under `data.dedupe` a conversation whose prompt (its turns before the first reply, what
    `evaluate` prompts with) is a held-out prompt is not trained on: ShareGPT repeats
    prompts, and a held-out prompt seen in training would inflate the measured tau."""
    order = list(range(len(conversations)))
    random.Random(data_cfg.seed).shuffle(order)
    heldout, rest = order[:data_cfg.num_heldout], order[data_cfg.num_heldout:]
    if data_cfg.dedupe and heldout:
        prompts = {messages_key(prompt_turns(conversations[i].messages)) for i in heldout}
        kept = [i for i in rest if messages_key(prompt_turns(conversations[i].messages)) not in prompts]
        if len(kept) < len(rest):
            log.info("data: %d conversation(s) share their prompt with a held-out one and are not "
                     "trained on (data.dedupe)", len(rest) - len(kept))
        rest = kept
    return heldout, rest if data_cfg.max_samples is None else rest[:data_cfg.max_samples]


def messages_key(messages: Sequence[Message]) -> tuple:
    """What `data.dedupe` compares: two conversations (or prompts) are the same when
    their roles and texts are."""
    return tuple((m.role, m.content) for m in messages)


def _check_config(cfg: DataConfig) -> None:
    if cfg.max_length < 2:
        raise ValueError(f"data.max_length={cfg.max_length}: expected at least 2 tokens")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise ValueError(f"data.max_samples={cfg.max_samples}: expected a positive count or null")
    if cfg.num_heldout < 0:
        raise ValueError(f"data.num_heldout={cfg.num_heldout}: expected 0 or more")
    if not cfg.sources:
        raise ValueError("data.sources: expected at least one source")


_BATCH = 64  # conversations per tokenizer call


def _tokenize_split(tok, conversations: list[Conversation], max_length: int, prefix: str,
                    train_reasoning: bool = True) -> tuple[list[PreparedSample], list[str]]:
    samples, skipped = [], []
    for begin in range(0, len(conversations), _BATCH):
        batch = conversations[begin:begin + _BATCH]
        origins = [f"{c.source}:{c.line}" for c in batch]
        rendered = []
        for conv, origin in zip(batch, origins):
            try:
                rendered.append(render_with_spans(tok, conv.messages, train_reasoning))
            except ValueError as e:
                raise ValueError(f"{origin}: {e}") from None
        for origin, (ids, mask) in zip(origins, _encode(tok, rendered, max_length)):
            if not any(mask):
                skipped.append(origin)
                continue
            index = len(samples)
            samples.append(PreparedSample(
                sample_id=f"{prefix}{index:06d}", index=index, origin=origin,
                input_ids=torch.tensor(ids, dtype=torch.int64),
                loss_mask=torch.tensor(mask, dtype=torch.uint8)))
    return samples, skipped


def _log_summary(log: logging.Logger, cfg: DataConfig, num_read: int, train: list[PreparedSample],
                 heldout: list[PreparedSample], skipped: list[str]) -> None:
    if skipped:
        log.warning("skipped %d conversation(s) with no assistant token within max_length=%d, "
                    "e.g. %s", len(skipped), cfg.max_length, ", ".join(skipped[:5]))
    num_tokens = sum(s.num_tokens for s in train)
    num_loss = sum(int(s.loss_mask.sum()) for s in train)
    log.info("data: %d conversation(s) read; %d train sample(s) (%d tokens, %d loss tokens), "
             "%d held out, %d skipped", num_read, len(train), num_tokens, num_loss,
             len(heldout), len(skipped))


# ---------------------------------------------------------------- identity

def data_hash(samples: Iterable[PreparedSample]) -> str:
    """Stable hash of the samples' token ids and loss masks, in order ("xxh3_128:<hex>")."""
    h = xxhash.xxh3_128()
    for s in samples:
        ids = s.input_ids.to(torch.int32).contiguous()
        mask = s.loss_mask.to(torch.uint8).contiguous()
        h.update(ids.numel().to_bytes(8, "little"))  # sample boundaries are part of the data
        h.update(ids.numpy().astype("<i4", copy=False).tobytes())
        h.update(mask.numpy().tobytes())
    return "xxh3_128:" + h.hexdigest()



# ---------------------------------------------------------------- persistence

PREPARED_FORMAT = "draftflow.prepared"
PREPARED_FORMAT_VERSION = 1
_SPLITS = ("train", "heldout")


def save_prepared(path: str | Path, data: PreparedData) -> None:
    """Write both splits to one safetensors file, atomically (temp, fsync, rename).

    Per split: all ids concatenated (int32), all masks (uint8), and offsets (int64,
    [n+1]) that cut them back into samples; ids, origins and data hash in metadata.
    """
    path = Path(path)
    tensors, metadata = {}, {"format": PREPARED_FORMAT,
                             "format_version": str(PREPARED_FORMAT_VERSION)}
    for split in _SPLITS:
        samples = getattr(data, split)
        lengths = torch.tensor([0] + [s.num_tokens for s in samples], dtype=torch.int64)
        tensors[f"{split}.offsets"] = torch.cumsum(lengths, 0)
        tensors[f"{split}.input_ids"] = _cat([s.input_ids for s in samples], torch.int32)
        tensors[f"{split}.loss_mask"] = _cat([s.loss_mask for s in samples], torch.uint8)
        metadata[f"{split}.sample_ids"] = json.dumps([s.sample_id for s in samples])
        metadata[f"{split}.origins"] = json.dumps([s.origin for s in samples])
        metadata[f"{split}.data_hash"] = data_hash(samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([p.to(dtype) for p in parts])


def load_prepared(path: str | Path) -> PreparedData:
    """Read a file written by `save_prepared`; refuse other formats, versions or bad hashes."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            _check_format(path, metadata)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"prepared data {path}: cannot read ({e})") from None
    splits = {split: _load_split(path, split, tensors, metadata) for split in _SPLITS}
    return PreparedData(**splits)


def _check_format(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != PREPARED_FORMAT:
        raise ValueError(f"prepared data {path}: not a DraftFlow prepared-data file "
                         f"(format {metadata.get('format')!r}, expected {PREPARED_FORMAT!r})")
    version = metadata.get("format_version")
    if version != str(PREPARED_FORMAT_VERSION):
        raise ValueError(f"prepared data {path}: format version {version}, this DraftFlow reads "
                         f"version {PREPARED_FORMAT_VERSION}; prepare the data again")


def _load_split(path: Path, split: str, tensors: dict[str, torch.Tensor],
                metadata: dict[str, str]) -> list[PreparedSample]:
    try:
        offsets = tensors[f"{split}.offsets"].tolist()
        ids = tensors[f"{split}.input_ids"].to(torch.int64)
        mask = tensors[f"{split}.loss_mask"]
        sample_ids = json.loads(metadata[f"{split}.sample_ids"])
        origins = json.loads(metadata[f"{split}.origins"])
        expected_hash = metadata[f"{split}.data_hash"]
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"prepared data {path}: {split} split is incomplete ({e})") from None
    if not len(sample_ids) == len(origins) == len(offsets) - 1 or offsets[-1] != ids.numel():
        raise ValueError(f"prepared data {path}: {split} split sizes disagree "
                         f"({len(sample_ids)} ids, {len(offsets) - 1} offsets, {ids.numel()} tokens)")
    samples = [PreparedSample(sample_id=sid, index=i, origin=origin,
                              input_ids=ids[offsets[i]:offsets[i + 1]],
                              loss_mask=mask[offsets[i]:offsets[i + 1]])
               for i, (sid, origin) in enumerate(zip(sample_ids, origins))]
    got = data_hash(samples)
    if got != expected_hash:
        raise ValueError(f"prepared data {path}: {split} data hash {got} does not match the "
                         f"recorded {expected_hash}; the file is corrupt")
    return samples
