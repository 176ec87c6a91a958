"""Model families beyond Llama as targets (tiny random configs, `target.random.model_type`):
capture, the aux-layer default, training, export and evaluation run for each; the export
carries each family's fields and the card says which engine serves it (`families.py`)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftflow.capture.target import build_random_model, load_embedding_and_lm_head, random_config
from draftflow.config import load_config
from draftflow.evaluate import evaluate
from draftflow.families import FAMILIES as SERVING, engine_support, serving_warnings
from draftflow.roles import run_colocated

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"

FAMILIES = {
    "qwen2": {},
    "qwen3": {"head_dim": 32},  # not hidden / heads (64 / 4): export must say so
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "mistral": {"head_dim": 16},
    "gemma3_text": {"head_dim": 32, "sliding_window": 32, "query_pre_attn_scalar": 32},
    "gpt_oss": {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 32},
}


def family_config(tmp: Path, family: str, *more: str):
    extra = [f"target.random.{k}={json.dumps(v)}" for k, v in FAMILIES[family].items()]
    return load_config([TINY], [f"target.random.model_type={family}", *extra, f"features.root={tmp / 'feat'}",
                                f"train.output_dir={tmp / 'run'}", "train.progress=false", "train.tensorboard=false",
                                "data.max_samples=8", "train.max_steps=3", "train.log_every=1", *more])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_captures_trains_and_exports(tmp_path, family):
    result = run_colocated(family_config(tmp_path, family))
    features = load_file(str(next((tmp_path / "feat" / "samples").glob("*.safetensors"))))
    assert features["aux_hidden"].shape[1] == 3 * 64 and features["last_hidden"].shape[1] == 64
    assert torch.isfinite(features["aux_hidden"].float()).all()
    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    card = json.loads((result.final_dir / "draftflow.json").read_text())
    assert card["target"]["model_type"] == family
    assert card["layers"]["trained_outputs"] == [1, 3, 4]  # EAGLE3's default rule on 8 layers
    losses = [m["loss"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    check_family_fields(family, family_config(tmp_path, family), config, card)
    # DraftFlow's evaluator serves the exported draft as the engines would: losslessly.
    result = evaluate(family_config(tmp_path, family), result.final_dir, depth=3, max_new_tokens=12, num_prompts=2)
    assert result["lossless"] and result["rounds"] > 0


def check_family_fields(family: str, cfg, config: dict, card: dict) -> None:
    """What the engines read from config.json is the target's, per family."""
    hf = random_config(cfg.target)
    assert config["head_dim"] == FAMILIES[family].get("head_dim", 64 // 4)
    assert config["hidden_size"] == config["target_hidden_size"] == hf.hidden_size
    assert config["vocab_size"] == hf.vocab_size and config["rms_norm_eps"] == hf.rms_norm_eps
    rope = hf.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma 3: the full-attention layers' RoPE
    assert config["rope_theta"] == rope["rope_theta"]
    if rope.get("rope_type", "default") == "default":
        assert config["rope_scaling"] is None
    else:  # gpt-oss: YaRN, every parameter carried
        assert config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta" and v is not None}
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]  # vLLM: layer inputs
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # SGLang: outputs
    assert card["serving"] == engine_support(family) and card["serving"]["model_type"] == family
    for engine in ("vllm", "sglang"):
        assert card["serving"][engine]["eagle3"] == getattr(SERVING[family], engine).eagle3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_draft_embeds_tokens_with_the_raw_table_the_engines_share(tmp_path, family):
    """Gemma 3 scales token embeddings by sqrt(hidden) inside the target; both engines hand
    the draft the unscaled table (vLLM shares `embed_tokens`, SGLang its weight), and the
    draft DraftFlow trains and evaluates uses that same table. The table says which
    families scale, and this checks it against transformers."""
    cfg = family_config(tmp_path, family)
    target = build_random_model(cfg.target)
    table = target.model.embed_tokens.weight
    ids = torch.tensor([[3, 7, 11]])
    scale = (target.get_input_embeddings()(ids) / table[ids]).mean().item()
    assert scale == pytest.approx(64 ** 0.5 if SERVING[family].embed_scale else 1.0, rel=1e-3)
    trained_with, _, _ = load_embedding_and_lm_head(cfg.target)  # the trainer's draft embedding
    assert torch.equal(trained_with, table)
    assert target.get_input_embeddings().weight is table  # what evaluate.py hands its drafts


def test_each_engine_that_cannot_serve_a_family_as_trained_is_named():
    assert serving_warnings([1, 3, 4], "qwen3") == [] and serving_warnings([1, 3, 4], "gpt_oss") == []
    vllm, sglang = serving_warnings([1, 3, 4], "gemma3_text")
    assert vllm.startswith("vllm 0.32 cannot serve an EAGLE3 draft of a gemma3_text target") and "SupportsEagle3" in vllm
    assert sglang.startswith("sglang 0.5.23 serves, but not as trained,") and "residual" in sglang
    assert engine_support("phi3")["vllm"]["eagle3"] is None  # not audited: the card says so


def test_evaluate_with_vllm_refuses_a_family_vllm_cannot_serve(tmp_path):
    from draftflow.engines.vllm import evaluate_with_vllm

    with pytest.raises(ValueError, match=r"vLLM 0.32 cannot serve an EAGLE3 draft of a gemma3_text target"):
        evaluate_with_vllm(family_config(tmp_path, "gemma3_text"), tmp_path / "no-draft")


def test_an_unknown_family_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"target.random: not a valid config of model_type 'llama9'"):
        run_colocated(family_config(tmp_path, "qwen2", "target.random.model_type=llama9"))


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_oss"])
def test_the_evaluator_crops_sliding_window_layers_past_their_window(tmp_path, family):
    """Speculative decoding extends the target's cache by a drafted chain and crops the
    rejected part: past the sliding window (32 here) that must still give the target's
    own logits. (transformers 5.17, which the vLLM extra may install, failed here with the
    config-built sliding cache layers: masks sized to the window while past recording
    kept every key. 5.24 passes either way.)"""
    from draftflow.speculative import _TargetRunner

    model = build_random_model(family_config(tmp_path, family).target).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits[0].argmax(-1).tolist()
        with _TargetRunner(model, [1, 3, 4]) as runner:
            assert runner.forward(ids[0, :40].tolist())[0] == full[:40]  # a prompt longer than the window
            runner.forward(ids[0, 40:46].tolist())  # a drafted chain ...
            runner.crop(43)  # ... of which three tokens are rejected
            got, aux = runner.forward(ids[0, 43:90].tolist())
    assert got == full[43:90] and aux.shape == (1, 47, 3 * model.config.hidden_size)
