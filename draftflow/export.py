"""Export a draft in the layout SGLang and vLLM load as an EAGLE3 draft.

`config.json` says `LlamaForCausalLMEagle3`; `model.safetensors` holds exactly the
names their loaders expect (SGLang skips unknown names silently, so a misnamed
tensor would serve garbage: `export_names` is checked on every export);
`draftflow.json` beside them is the draft card (`card.py`).

Aux layer ids. DraftFlow trains on the OUTPUTS of decoder layers (counted from 0).
The engines read the config's ids differently (docs/serving.md has the table):
- vLLM (0.32) reads the top-level `eagle_aux_hidden_state_layer_ids` first (else
  `eagle_config`'s) as the hidden state ENTERING layer k, i.e. the output of layer
  k-1; so the top-level key gets the trained ids plus one.
- SGLang (0.5.23) reads only `eagle_config.eagle_aux_hidden_state_layer_ids`: as layer
  outputs for most families, with a first-id rule for some (`families.py`).

Which engine serves which target family at all, and what it feeds the draft, is in
`families.py`; the card's `serving` section records it for the exported draft.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from draftflow.families import SGLANG_FIRST_ID_FAMILIES
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
INPUT_NORM = "input_norm.weight"  # EAGLE-3.1 norm_before_fc; both engines load it under this name


def export_names(cfg: DraftModelConfig) -> tuple[str, ...]:
    """The tensors a served draft of this config has, in file order."""
    return (INPUT_NORM, *EXPORT_NAMES) if cfg.norm_before_fc else EXPORT_NAMES


def vllm_layer_ids(aux_layer_ids) -> list[int]:
    """vLLM's ids for the trained layer outputs: the input of the next layer."""
    return [int(i) + 1 for i in aux_layer_ids]


def sglang_layer_ids(aux_layer_ids, target_model_type: str | None) -> list[int]:
    """SGLang's `eagle_config` ids for the trained layer outputs (module doc)."""
    ids = [int(i) for i in aux_layer_ids]
    if target_model_type in SGLANG_FIRST_ID_FAMILIES and ids[0] != 1:
        return [i + 1 for i in ids]  # read as layer inputs: the input of layer i+1 is the output of i
    return ids


def serving_config(cfg: DraftModelConfig, dtype: str = "bfloat16", target_model_type: str | None = None) -> dict:
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
        # vLLM's key (read before eagle_config's): layer-input ids.
        "eagle_aux_hidden_state_layer_ids": vllm_layer_ids(cfg.aux_layer_ids),
        "norm_output": cfg.norm_output,
        "eagle_config": {
            # SGLang's key (vLLM reads it only without the top-level one).
            "eagle_aux_hidden_state_layer_ids": sglang_layer_ids(cfg.aux_layer_ids, target_model_type),
            "use_aux_hidden_state": True,
            "use_input_layernorm_in_first_layer": True,
            "use_last_layernorm": True,
            "norm_before_fc": cfg.norm_before_fc,
        },
    }


def export_draft(state: dict[str, torch.Tensor], cfg: DraftModelConfig, out_dir: str | Path,
                 dtype: torch.dtype = torch.bfloat16, card: dict | None = None) -> Path:
    """Write `config.json`, `model.safetensors` and the draft card `draftflow.json`
    (when `card` is given, see card.py) into `out_dir`, atomically."""
    names = export_names(cfg)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"draft state lacks tensors needed for serving: {missing}")
    tensors = {}
    for name in names:
        t = state[name].detach().cpu()
        tensors[name] = t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()
    model_type = ((card or {}).get("target") or {}).get("model_type")
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = serving_config(cfg, str(dtype).removeprefix("torch."), model_type)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if card is not None:
        from draftflow.card import CARD_NAME, finish_card

        (tmp / CARD_NAME).write_text(json.dumps(finish_card(card, config), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """`draftflow export`: a training checkpoint folder -> a servable draft folder."""
    from draftflow.card import card_from_checkpoint

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
    return export_draft(ckpt.load_model_state(checkpoint_dir), cfg, out_dir,
                        card=card_from_checkpoint(checkpoint_dir, meta))
