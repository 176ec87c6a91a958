"""Regenerating the training replies with the target: split kept, replies are the target's greedy decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from draftflow.capture.target import load_target
from draftflow.cli import main
from draftflow.config import load_config
from draftflow.data.conversations import load_conversations
from draftflow.data.prepare import prepare_dataset, prompt_ids
from draftflow.data.regenerate import greedy_replies
from draftflow.data.tokenizer import build_bytes_chatml_tokenizer
from draftflow.speculative import greedy_generate

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config([TINY], ["capture.device=cpu"])
    return cfg, load_target(cfg.target, torch.device("cpu"), torch.float32)


def test_batched_left_padded_replies_equal_one_by_one_greedy_decode(tiny):
    cfg, target = tiny
    tok = build_bytes_chatml_tokenizer()
    convs = load_conversations(["builtin:tiny-chat"])[:5]
    prompts = [prompt_ids(tok, c.messages[:1]) for c in convs]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    eos = {257}
    budgets = [24, 5, 24, 17, 24]
    batched = greedy_replies(target.model, prompts, budgets, eos, pad_id=258, batch_size=8)
    for prompt, budget, got in zip(prompts, budgets, batched):
        want = greedy_generate(target.model, prompt, budget, sorted(eos))
        assert got == [t for t in want if t not in eos]


def test_regenerated_file_keeps_order_split_and_heldout(tiny, tmp_path, capsys):
    cfg, _ = tiny
    out = tmp_path / "regen.jsonl"
    assert main(["regenerate", "-c", str(TINY), "--out", str(out), "--max-new-tokens", "16", "--max-turns", "2",
                 "capture.device=cpu", "data.max_samples=10"]) == 0
    assert "regenerated" in capsys.readouterr().out
    before = load_conversations(cfg.data.sources)
    after = load_conversations([str(out)])
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a.messages != b.messages]
    assert 0 < len(changed) <= 10
    for i in changed:  # the same user turns, each answered by the target
        users_before = [m for m in before[i].messages if m.role == "user"][:2]
        users_after = [m for m in after[i].messages if m.role == "user"]
        assert 1 <= len(users_after) and users_after == users_before[:len(users_after)]
        assert after[i].messages[-1].role == "assistant"
    tok = build_bytes_chatml_tokenizer()
    old = prepare_dataset(cfg.data, tok)
    new = prepare_dataset(load_config([TINY], [f"data.sources=[{out}]"]).data, tok)
    assert [s.input_ids.tolist() for s in new.heldout] == [s.input_ids.tolist() for s in old.heldout]
    first_train = json.loads(out.read_text().splitlines()[changed[0]])
    assert first_train["messages"][1]["role"] == "assistant"


@pytest.mark.parametrize("option, name", [("--max-turns", "max_turns"), ("--max-prompt-tokens", "max_prompt_tokens"),
                                          ("--max-new-tokens", "max_new_tokens"), ("--batch-size", "batch_size"),
                                          ("--batch-tokens", "batch_tokens"), ("--workers", "workers")])
def test_regenerate_rejects_bad_arguments(tmp_path, capsys, option, name):
    out = tmp_path / "x.jsonl"
    assert main(["regenerate", "-c", str(TINY), "--out", str(out), option, "0", "capture.device=cpu"]) == 2
    assert f"{name}=0, expected at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_two_worker_processes_write_the_same_file_as_one(tmp_path):
    """--workers 2: a second process with its own target answers half of each turn's
    prompts; the file is byte-identical to a one-process run."""
    args = ["-c", str(TINY), "--max-new-tokens", "12", "--max-turns", "2", "capture.device=cpu",
            "data.max_samples=8"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["regenerate", *args, "--out", str(one)]) == 0
    assert main(["regenerate", *args, "--out", str(two), "--workers", "2"]) == 0
    assert one.read_bytes() == two.read_bytes()


def test_two_training_conversations_with_one_prompt_keep_the_split(tmp_path, caplog):
    """Two training conversations asking the same thing get the same greedy reply; the
    second keeps its original reply, so the file read back under data.dedupe has as many
    conversations as the source and splits the same way (else `evaluate` would hold out
    other prompts than regenerate did)."""
    from draftflow.data.prepare import load_split_conversations, split_indices

    rows = [[("user", f"question {i}?"), ("assistant", f"answer {i}.")] for i in range(12)]
    rows += [[("user", "same question?"), ("assistant", "one answer.")],
             [("user", "same question?"), ("assistant", "another answer.")]]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in row]}) + "\n"
                           for row in rows))
    over = ["capture.device=cpu", f"data.sources=[{src}]", "data.num_heldout=3"]
    cfg = load_config([TINY], over)
    held, train = split_indices(load_split_conversations(cfg.data), cfg.data)
    assert {12, 13} <= set(train)  # both copies are regenerated (the case under test)
    out = tmp_path / "regen.jsonl"
    with caplog.at_level("INFO", logger="draftflow.data"):
        assert main(["regenerate", "-c", str(TINY), "--out", str(out), "--max-new-tokens", "8", *over]) == 0
    assert "1 conversation(s) keep their original replies" in caplog.text
    after = load_conversations([str(out)])
    assert after[13].messages[-1].content == "another answer."  # kept as it was
    assert after[12].messages[-1].content != "one answer."  # the first copy was regenerated
    back = load_config([TINY], [*over[:1], f"data.sources=[{out}]", *over[2:]])
    conversations = load_split_conversations(back.data)
    assert len(conversations) == len(rows)
    assert split_indices(conversations, back.data) == (held, train)


def test_a_reply_ends_where_the_target_starts_the_next_turn(caplog):
    """A pretrained target (builtin:plain) rarely emits EOS: what it writes after its
    reply, the user's next turn or another reply, is cut off at the template's header."""
    from draftflow.data.conversations import Conversation, Message
    from draftflow.data.prepare import next_reply_header, next_turn_header
    from draftflow.data.regenerate import regenerate_conversations
    from draftflow.data.tokenizer import PLAIN_CHAT_TEMPLATE

    assert next_turn_header(build_bytes_chatml_tokenizer()) == "<|im_end|>\n<|im_start|>user"
    tok = build_bytes_chatml_tokenizer(PLAIN_CHAT_TEMPLATE)
    assert next_turn_header(tok) == "\n\nUser:"
    assert next_reply_header(tok) == "\n\nAssistant:"
    assert next_reply_header(build_bytes_chatml_tokenizer()) == "<|im_end|>\n<|im_start|>assistant"
    alternating = ("{% for m in messages %}{% if loop.index0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                   "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['role'] + ': ' + m['content'] + "
                   "'\n' }}{% endfor %}")
    assert next_reply_header(build_bytes_chatml_tokenizer(alternating)) is None  # refuses two replies in a row
    assert next_turn_header(build_bytes_chatml_tokenizer(alternating)) == "\nuser:"
    outputs = iter(["Paris.\n\nUser:\nAnd Spain?\n\nAssistant:\nMadrid.", "\n\nUser: hi", "No header here",
                    "Rome.\n\nAssistant:\nRome.\n\nUser:\nOK"])

    def generate(prompts, budgets):
        return [tok(next(outputs), add_special_tokens=False)["input_ids"] for _ in prompts]

    convs = [Conversation(source="t", line=n, messages=(Message(role="user", content=q),
                                                        Message(role="assistant", content="old")))
             for n, q in enumerate(["Capital of France?", "Say hi", "Anything", "Capital of Italy?"])]
    caplog.set_level("INFO")
    out, replies, _ = regenerate_conversations(generate, tok, convs, [0, 1, 2, 3], max_length=512,
                                               max_new_tokens=64, max_turns=1, max_prompt_tokens=256)
    # cut at the first header, of the next user turn or of another reply; empty after the cut: kept
    assert [c.messages[1].content for c in out] == ["Paris.", "old", "No header here", "Rome."]
    assert replies == 3 and "3 replies cut where the target went on to write the next turn" in caplog.text
