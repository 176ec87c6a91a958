"""Assembly of a run for each role: colocated, producer, consumer.

One function per stage, shared by every role:
- `plan_data`: tokenizer, prepared samples, draft vocab, provenance;
- `produce`: run the target over the samples and publish features to the store;
- `train_from_refs`: everything after "a ref source and a store", identical for a
  colocated run and a consumer, so both build byte-identical batches and, on CPU,
  end with bit-identical weights for the same seed and steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import draftflow
from draftflow.capture.capture import capture_features, resolve_device_dtype
from draftflow.capture.target import (LoadedTarget, config_hash, load_target, load_target_head,
                                      random_identity, resolve_aux_layer_ids, resolve_target_folder)
from draftflow.config import Config
from draftflow.data.prepare import PreparedData, data_hash, prepare_dataset
from draftflow.data.tokenizer import load_tokenizer, tokenizer_hash
from draftflow.export import export_draft
from draftflow.records import Provenance
from draftflow.stores import build_store
from draftflow.train import checkpoint as ckpt
from draftflow.train.batches import ListRefSource, RefSource
from draftflow.train.distributed import init_distributed
from draftflow.train.trainer import TargetHead, Trainer, build_draft_config
from draftflow.train.vocab import build_draft_vocab

log = logging.getLogger("draftflow")

ROLES = ("colocated", "producer", "consumer")


@dataclass(frozen=True, slots=True)
class DataPlan:
    prepared: PreparedData
    draft_ids: list[int]
    tokenizer_hash: str
    data_hash: str


@dataclass(frozen=True, slots=True)
class RunResult:
    output_dir: Path
    final_dir: Path | None
    checkpoint: Path | None
    num_samples: int
    num_tokens: int


def tokenizer_spec(cfg: Config) -> str:
    if cfg.target.tokenizer:
        return cfg.target.tokenizer
    if cfg.target.path is None:
        raise ValueError("target.tokenizer: a random target needs a tokenizer, "
                         "e.g. target.tokenizer=builtin:bytes-chatml")
    return str(resolve_target_folder(cfg.target))


def plan_data(cfg: Config, vocab_size: int) -> DataPlan:
    """Tokenise the configured conversations and choose the draft vocab."""
    tok = load_tokenizer(tokenizer_spec(cfg))
    if len(tok) > vocab_size:
        raise ValueError(f"target.tokenizer has {len(tok)} tokens but the target's vocab_size is "
                         f"{vocab_size}; they must belong together")
    prepared = prepare_dataset(cfg.data, tok)
    draft_ids = build_draft_vocab(prepared.train, cfg.draft.vocab_size, vocab_size)
    return DataPlan(prepared=prepared, draft_ids=draft_ids, tokenizer_hash=tokenizer_hash(tok),
                    data_hash=data_hash(prepared.train))


def target_hf_config(cfg: Config):
    """The target's transformers config, without loading its weights."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.target.random is not None:
        return LlamaConfig(**cfg.target.random)
    return AutoConfig.from_pretrained(str(resolve_target_folder(cfg.target)))


def target_identity(cfg: Config) -> str:
    return random_identity(cfg.target) if cfg.target.random is not None else str(cfg.target.path)


def build_provenance(cfg: Config, hf_config, aux_ids: list[int], plan: DataPlan) -> Provenance:
    return Provenance(target=target_identity(cfg), target_config_hash=config_hash(hf_config),
                      tokenizer_hash=plan.tokenizer_hash, hidden_size=hf_config.hidden_size,
                      vocab_size=hf_config.vocab_size, aux_layer_ids=tuple(aux_ids),
                      feature_dtype=cfg.features.dtype, data_hash=plan.data_hash,
                      producer_version=draftflow.__version__)


def feature_dtype(cfg: Config) -> torch.dtype:
    dtype = getattr(torch, cfg.features.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"features.dtype: {cfg.features.dtype!r} is not a floating torch dtype "
                         "(expected bfloat16, float16 or float32)")
    return dtype


def produce(cfg: Config, plan: DataPlan, store, target: LoadedTarget, aux_ids: list[int], on_ref=None):
    """Capture every training sample into `store` (skipping published ones)."""
    return capture_features(target, aux_ids, plan.prepared.train, store, cfg.capture,
                            feature_dtype=feature_dtype(cfg), progress=cfg.train.progress,
                            **({"on_ref": on_ref} if on_ref is not None else {}))


def train_from_refs(cfg: Config, aux_ids: list[int], draft_ids: list[int], store, source: RefSource,
                    provenance: Provenance, stop_after: int | None = None) -> RunResult:
    """Train and export: the part a colocated run and a consumer share line for line."""
    dist = init_distributed(cfg.train.device)
    embed, lm_head, hf_config = load_target_head(cfg.target)
    head = TargetHead(embed_weight=embed, lm_head_weight=lm_head, hf_config=hf_config)
    hidden = head.hf_config.hidden_size
    if provenance.hidden_size != hidden:
        raise ValueError(f"features have hidden size {provenance.hidden_size} but the target config "
                         f"gives {hidden}")
    model_cfg = build_draft_config(cfg, head.hf_config, aux_ids, len(draft_ids))
    trainer = Trainer(cfg, model_cfg, head, draft_ids, store, source, dist,
                      extra_meta={"provenance": provenance.to_dict()})
    last = trainer.fit(stop_after=stop_after)
    out = Path(cfg.train.output_dir)
    final = None
    if dist.is_main and last is not None and stop_after is None:
        final = export_draft(ckpt.load_model_state(last), model_cfg, out / "final")
    return RunResult(output_dir=out, final_dir=final, checkpoint=last,
                     num_samples=source.num_samples, num_tokens=0)


def run_colocated(cfg: Config, stop_after: int | None = None) -> RunResult:
    hf_config = target_hf_config(cfg)
    plan = plan_data(cfg, hf_config.vocab_size)
    aux_ids = resolve_aux_layer_ids(cfg.target, hf_config.num_hidden_layers)
    provenance = build_provenance(cfg, hf_config, aux_ids, plan)
    store = build_store(cfg.features)
    device, dtype = resolve_device_dtype(cfg.capture)
    target = load_target(cfg.target, device, dtype)
    refs = produce(cfg, plan, store, target, aux_ids)
    del target  # free the target before the draft trains
    result = train_from_refs(cfg, aux_ids, plan.draft_ids, store, ListRefSource(refs), provenance,
                             stop_after=stop_after)
    store.close()
    return RunResult(output_dir=result.output_dir, final_dir=result.final_dir, checkpoint=result.checkpoint,
                     num_samples=len(refs), num_tokens=sum(r.num_tokens for r in refs))


def run_role(cfg: Config, role: str) -> RunResult:
    if role not in ROLES:
        raise ValueError(f"--role: unknown role {role!r}, expected one of {list(ROLES)}")
    if role == "colocated":
        return run_colocated(cfg)
    raise ValueError(f"--role {role} needs features.backend shared_dir or mooncake "
                     "(disaggregated roles are not available yet)")
