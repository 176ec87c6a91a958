"""`draftflow evaluate --engine vllm`: real vLLM (the `vllm` extra, CPU build) serves a
draft that DraftFlow trained and exported, fed the layers it was trained on, and agrees
with DraftFlow's evaluator round for round. No part of vLLM is replaced: these tests
skip where vLLM is not installed (`make install-vllm`), except the install hint."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from draftflow.cli import main
from draftflow.config import load_config
from draftflow.engines.vllm import compare, evaluate_with_vllm, format_comparison, uncut_accepted_per_pos
from draftflow.evaluate import write_json

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
AUX = [1, 3, 4]  # the EAGLE3 default for the tiny 8-layer target (layer outputs)
# vLLM's CPU attention takes head sizes of 32 and up: the tiny target with 2 heads of 32.
OVERRIDES = ["target.random.num_attention_heads=2", "target.random.num_key_value_heads=1",
             "train.progress=false", "train.tensorboard=false", "capture.device=cpu"]
DEPTH, MAX_NEW, PROMPTS = 3, 48, 8

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (make install-vllm)")


def save_repetitive_target(folder: Path, overrides=()) -> Path:
    """The tiny random target with one direction added to every token embedding: its
    greedy output repeats itself, so a 60-step draft accepts at every depth (tau ~1.5;
    on the plain random target it stays near 1.0 and deep positions would go untested)."""
    from draftflow.capture.target import build_random_model

    model = build_random_model(load_config([TINY], [*OVERRIDES, *overrides]).target)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(4.0 * direction / direction.norm())
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny draft trained and exported by DraftFlow, evaluated by both tools."""
    from draftflow.roles import run_colocated

    root = tmp_path_factory.mktemp("vllm")
    target = save_repetitive_target(root / "target")
    cfg = load_config([TINY], [*OVERRIDES, "target.random=null", f"target.path={target}",
                               f"features.root={root / 'feat'}", f"train.output_dir={root / 'run'}"])
    run = run_colocated(cfg)
    return evaluate_with_vllm(cfg, run.final_dir, depth=DEPTH, max_new_tokens=MAX_NEW, num_prompts=PROMPTS), run


@needs_vllm
def test_vllm_feeds_the_draft_the_layers_it_was_trained_on(served):
    result, run = served
    config = json.loads((Path(run.final_dir) / "config.json").read_text())
    aux = result["comparison"]["aux_layers"]
    assert aux["trained_outputs"] == AUX
    # vLLM's id k is the hidden state entering layer k: the output of layer k-1.
    assert result["vllm"]["aux_layer_ids_used"] == [i + 1 for i in AUX] == config["eagle_aux_hidden_state_layer_ids"]
    assert result["vllm"]["aux_layers_from"] == "speculative config" and aux["ok"]


@needs_vllm
def test_vllm_serves_the_draft_losslessly_and_accepts_its_tokens(served):
    result, run = served
    ours, theirs = result["draftflow"], result["vllm"]
    assert theirs["lossless"] and theirs["mismatched_prompts"] == [] and ours["lossless"]
    card = json.loads((Path(run.final_dir) / "draftflow.json").read_text())  # both results on the draft card
    assert [e["engine"] for e in card["evaluations"]] == ["draftflow", "vllm"]
    assert [e["tau"] for e in card["evaluations"]] == [ours["tau"], theirs["tau"]]
    assert result["comparison"]["outputs_equal"]  # vLLM's float32 target == transformers'
    assert theirs["counters_match_log"] and theirs["rounds"] > 0
    assert theirs["accepted_per_pos"][0] > 0 and theirs["tau"] > 1.0


@needs_vllm
def test_both_tools_count_the_same_accepted_tokens_per_position(served):
    """Exact agreement on every round the budget does not cut; at the budget end vLLM
    drafts and counts a full chain where DraftFlow drafts only what the budget has left."""
    result, _ = served
    ours, theirs, cmp = result["draftflow"], result["vllm"], result["comparison"]
    uncut = cmp["uncut"]
    assert uncut["agree"] and uncut["accepted_per_pos"]["draftflow"] == uncut["accepted_per_pos"]["vllm"]
    assert uncut["rounds"]["draftflow"] == uncut["rounds"]["vllm"] > 0
    assert cmp["rounds_agree"] and cmp["first_disagreeing_round"] == [None] * PROMPTS
    assert ours["rounds"] == theirs["rounds"] and ours["tau"] == pytest.approx(theirs["tau"])
    assert theirs["drafted_tokens"] == DEPTH * theirs["rounds"]  # vLLM never shortens a chain
    assert ours["drafted_per_pos"][-1] < ours["rounds"]  # DraftFlow's last rounds did
    assert all(a >= b for a, b in zip(theirs["accepted_per_pos"], ours["accepted_per_pos"]))
    text = format_comparison(result)
    assert "agree" in text and "DISAGREE" not in text and "OK" in text


@needs_vllm
def test_result_is_written_as_json(served, tmp_path):
    result, _ = served
    out = json.loads(write_json(result, tmp_path / "eval.json").read_text())
    assert set(out) == {"draftflow", "vllm", "comparison"} and "per_prompt" not in out["draftflow"]


def test_uncut_rounds_are_those_with_room_for_a_full_chain():
    # 10 new tokens, depth 3: the prefill gives 1; rounds of (drafted, accepted).
    counts, n = uncut_accepted_per_pos([[3, 3], [3, 1], [2, 2], [1, 0]], 3, 10)
    assert (counts, n) == ([2, 1, 1], 2)  # before round 3 only 10-7 tokens are left: cut


def test_a_round_that_disagrees_is_named():
    ours = [{"tokens": [1, 2, 3, 4, 5], "rounds": [[3, 2], [1, 0]]}]
    theirs = [{"tokens": [1, 2, 3, 4, 5], "rounds": [[3, 1], [3, 0], [3, 0]]}]
    cmp = compare(ours, theirs, 3, 5)
    assert not cmp["rounds_agree"] and cmp["first_disagreeing_round"] == [0]
    assert not cmp["uncut"]["agree"]
    # vLLM accepting past what DraftFlow drafted on a cut round is not a disagreement.
    assert compare([{"tokens": [1], "rounds": [[1, 1]]}], [{"tokens": [1], "rounds": [[3, 3]]}], 3, 3)["rounds_agree"]


def test_engine_vllm_without_vllm_says_how_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    assert main(["evaluate", "-c", str(TINY), "--draft", str(tmp_path), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed" in err and "make install-vllm" in err and "pip install -e '.[vllm]'" in err


@needs_vllm
def test_vllm_honours_the_eagle31_switches(tmp_path):
    """A draft trained with norm_before_fc and norm_output: vLLM loads input_norm.weight
    and feeds each next draft step the normed hidden state, as training did; the two
    evaluators then agree round for round (a vLLM that ignored either switch would, but
    for a coincidence of argmaxes, draft other tokens from the second position on)."""
    from draftflow.evaluate import read_draft_config
    from draftflow.roles import run_colocated

    target = save_repetitive_target(tmp_path / "target")
    cfg = load_config([TINY], [*OVERRIDES, "target.random=null", f"target.path={target}",
                               "draft.norm_before_fc=true", "draft.norm_output=true",
                               f"features.root={tmp_path / 'feat'}", f"train.output_dir={tmp_path / 'run'}"])
    run = run_colocated(cfg)
    exported = read_draft_config(Path(run.final_dir) / "config.json")  # what both evaluators read
    assert exported.norm_before_fc and exported.norm_output
    result = evaluate_with_vllm(cfg, run.final_dir, depth=DEPTH, max_new_tokens=MAX_NEW, num_prompts=PROMPTS)
    cmp = result["comparison"]
    assert result["vllm"]["lossless"] and cmp["aux_layers"]["ok"] and cmp["outputs_equal"]
    assert cmp["rounds_agree"] and cmp["uncut"]["agree"] and result["vllm"]["accepted_per_pos"][0] > 0



# Target families other than Llama that vLLM serves (families.py), with a head_dim other
# than hidden / heads (64 / 4) where the family has one: the draft config must say it.
VLLM_FAMILIES = {
    "qwen3": ["target.random.model_type=qwen3", "target.random.num_attention_heads=4",
              "target.random.num_key_value_heads=2", "target.random.head_dim=32"],
}


@needs_vllm
@pytest.mark.parametrize("family", sorted(VLLM_FAMILIES))
def test_vllm_serves_each_family_as_draftflow_evaluates_it(tmp_path, family):
    from draftflow.roles import run_colocated

    more = VLLM_FAMILIES[family]
    target = save_repetitive_target(tmp_path / "target", more)
    cfg = load_config([TINY], [*OVERRIDES, *more, "target.random=null", f"target.path={target}",
                               f"features.root={tmp_path / 'feat'}", f"train.output_dir={tmp_path / 'run'}"])
    run = run_colocated(cfg)
    assert json.loads((Path(run.final_dir) / "config.json").read_text())["head_dim"] == 32
    result = evaluate_with_vllm(cfg, run.final_dir, depth=DEPTH, max_new_tokens=MAX_NEW, num_prompts=PROMPTS)
    cmp = result["comparison"]
    assert result["vllm"]["aux_layer_ids_used"] == [i + 1 for i in AUX] and cmp["aux_layers"]["ok"]
    assert result["vllm"]["lossless"] and cmp["outputs_equal"] and cmp["rounds_agree"] and cmp["uncut"]["agree"]
    assert result["vllm"]["accepted_per_pos"][0] > 0
    assert result["draftflow"]["tau"] == pytest.approx(result["vllm"]["tau"])
