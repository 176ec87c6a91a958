"""Export a draft in the layout SGLang and vLLM load as an EAGLE3 draft.

`config.json` says `LlamaForCausalLMEagle3`; `model.safetensors` holds exactly the
names their loaders expect (SGLang skips unknown names silently, so a misnamed
tensor would serve garbage: `EXPORT_NAMES` is checked on every export).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from draftflow.train import checkpoint as ckpt
from draftflow.train.model import DraftModelConfig

EXPORT_NAMES = (
    "fc.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    "norm.weight", "lm_head.weight", "d2t", "t2d",
)


def serving_config(cfg: DraftModelConfig, dtype: str = "bfloat16") -> dict:
    rope = dict(cfg.rope_parameters)
    rope_type = rope.get("rope_type", "default")
    scaling = None if rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": dtype,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids),
            "use_aux_hidden_state": True,
            "use_input_layernorm_in_first_layer": True,
            "use_last_layernorm": True,
        },
    }


def export_draft(state: dict[str, torch.Tensor], cfg: DraftModelConfig, out_dir: str | Path,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `config.json` and `model.safetensors` into `out_dir`, atomically."""
    missing = [n for n in EXPORT_NAMES if n not in state]
    if missing:
        raise ValueError(f"draft state lacks tensors needed for serving: {missing}")
    tensors = {}
    for name in EXPORT_NAMES:
        t = state[name].detach().cpu()
        tensors[name] = t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(serving_config(cfg, str(dtype).removeprefix("torch.")), indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """`draftflow export`: a training checkpoint folder -> a servable draft folder."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"--checkpoint {checkpoint_dir}: no such folder")
    if not (checkpoint_dir / "meta.json").exists():
        found = ckpt.list_checkpoints(checkpoint_dir / "checkpoints") or ckpt.list_checkpoints(checkpoint_dir)
        if not found:
            raise ValueError(f"--checkpoint {checkpoint_dir}: no checkpoint here (expected meta.json, "
                             "or a run folder with checkpoints/step_*)")
        checkpoint_dir = found[-1]
    meta = ckpt.read_meta(checkpoint_dir)
    cfg = DraftModelConfig.from_dict(meta["draft_config"])
    return export_draft(ckpt.load_model_state(checkpoint_dir), cfg, out_dir)
