"""What the serving engines do with an EAGLE3 draft, per target family: one table.

Audited against the sources of vLLM 0.32 (`model_executor/models/<family>.py`,
`llama_eagle3.py`, `v1/spec_decode/llm_base_proposer.py`, `v1/worker/gpu_model_runner.py`)
and SGLang 0.5.23 (`srt/models/<family>.py`, `llama_eagle3.py`,
`srt/speculative/eagle_worker_v2.py`). docs/serving.md has the table in words.

What holds for every family below, so it is not repeated per row:
- The draft is served as a Llama (`LlamaForCausalLMEagle3`) from config.json alone:
  both engines read `head_dim`, `rope_theta`/`rope_scaling`, `rms_norm_eps`,
  `target_hidden_size`, `draft_vocab_size` there, and export writes the values the draft
  was trained with (the target's, or Gemma 3's full-attention RoPE).
- The draft's token embedding is the target's embedding TABLE, unscaled: vLLM shares the
  target's `embed_tokens` module with a draft that has none (export writes none), SGLang
  copies `embed_tokens.weight` into the draft (`set_embed`, even over a draft's own).
  Training and DraftFlow's evaluator use the same table (`get_input_embeddings().weight`).
  Where the target scales its embeddings (`embed_scale`), the draft still gets the raw
  table; pre-scaling it in the export would help nothing (SGLang overwrites it, and the
  draft's first step on it is an RMSNorm, which a constant factor leaves unchanged up to
  eps) and would make the two engines differ (vLLM would keep the draft's own).
- vLLM reads the ids as layer inputs, for every family with EAGLE3 support (its
  `EagleModelMixin` keeps `hidden + residual` entering layer k); SGLang as layer outputs,
  except the `SGLANG_FIRST_ID_FAMILIES` (export.py writes both keys).
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINE_VERSIONS = {"vllm": "0.32", "sglang": "0.5.23"}


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSupport:
    eagle3: bool  # the engine's target class captures aux hidden states for an EAGLE3 draft
    note: str = ""  # why not, or a known defect: the draft then loads but is fed other features

    @property
    def serves_as_trained(self) -> bool:
        return self.eagle3 and not self.note


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    vllm: EngineSupport
    sglang: EngineSupport
    embed_scale: str | None = None  # the target scales token embeddings (the draft gets the raw table)


_OK = EngineSupport(eagle3=True)

FAMILIES: dict[str, Family] = {
    "llama": Family(vllm=_OK, sglang=_OK),
    "mistral": Family(vllm=_OK, sglang=_OK),  # both engines: MistralForCausalLM(LlamaForCausalLM)
    "qwen2": Family(vllm=_OK, sglang=_OK),
    "qwen3": Family(vllm=_OK, sglang=_OK),
    "qwen3_moe": Family(vllm=_OK, sglang=_OK),
    "gpt_oss": Family(vllm=_OK, sglang=_OK),
    "gemma3_text": Family(
        vllm=EngineSupport(eagle3=False, note=(
            "vLLM's Gemma3ForCausalLM does not implement SupportsEagle3: vLLM refuses the draft at start-up "
            "('Model does not support EAGLE3 interface')")),
        sglang=EngineSupport(eagle3=True, note=(
            "SGLang's Gemma3 captures each layer's last MLP branch without the residual stream, not the layer "
            "output the draft was trained on (fix proposed in sgl-project/sglang PR #39286): the draft serves "
            "losslessly but accepts few tokens")),
        embed_scale="sqrt(hidden_size)"),
}

# SGLang model types whose aux ids mean layer outputs only when the first id is 1
# (sglang/srt/models/deepseek_v2.py, glm4_moe_lite.py in 0.5.23); inputs otherwise.
SGLANG_FIRST_ID_FAMILIES = frozenset({"deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite"})


def family(model_type: str | None) -> Family | None:
    """The audited facts of a target family, or None for one not audited."""
    return FAMILIES.get(model_type)


def engine_support(model_type: str | None) -> dict:
    """The draft card's `serving` section: per engine, whether it serves this target
    family's draft as trained, with the reason where not."""
    fam = family(model_type)
    out = {"model_type": model_type}
    for engine, version in ENGINE_VERSIONS.items():
        if fam is None:
            out[engine] = {"version": version, "eagle3": None, "note": "target family not audited by DraftFlow"}
            continue
        support = getattr(fam, engine)
        out[engine] = {"version": version, "eagle3": support.eagle3, "serves_as_trained": support.serves_as_trained,
                       **({"note": support.note} if support.note else {})}
    if fam is not None and fam.embed_scale:
        out["embedding"] = (f"the target scales token embeddings by {fam.embed_scale}; the draft was trained, "
                            "and is served by both engines, with the unscaled table")
    return out


def serving_warnings(aux_layer_ids, model_type: str | None) -> list[str]:
    """What an engine cannot serve as trained for this target, naming family and engine."""
    ids = [int(i) for i in aux_layer_ids]
    warnings = []
    if model_type in SGLANG_FIRST_ID_FAMILIES and ids[0] == 0:
        warnings.append(f"target.aux_layer_ids={ids}: SGLang reads a {model_type} draft's first id 1 as "
                        "'output of layer 1', so the output of layer 0 cannot be expressed for it (vLLM is "
                        "unaffected); choose a first layer of 1 or more to serve this draft with SGLang")
    fam = family(model_type)
    if fam is None:
        return warnings
    for engine, version in ENGINE_VERSIONS.items():
        support = getattr(fam, engine)
        if support.note:
            what = "cannot serve" if not support.eagle3 else "serves, but not as trained,"
            warnings.append(f"{engine} {version} {what} an EAGLE3 draft of a {model_type} target: {support.note}")
    return warnings
