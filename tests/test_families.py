"""Model families beyond Llama as targets (tiny random configs, `target.random.model_type`):
capture, the aux-layer default, training and export run for each."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftflow.config import load_config
from draftflow.roles import run_colocated

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"

FAMILIES = {
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "mistral": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16},
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


def test_an_unknown_family_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"target.random: not a valid config of model_type 'llama9'"):
        run_colocated(family_config(tmp_path, "qwen2", "target.random.model_type=llama9"))
