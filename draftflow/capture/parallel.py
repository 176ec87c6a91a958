"""How one copy of the target spans devices during capture, and which ranks capture what.

A capture job of W ranks (torchrun; W = 1 without it) forms W / capture.tp_size
groups of consecutive ranks. Each group holds one copy of the target and captures
every G-th sample (G groups); its first rank, the leader, publishes the features,
the others only take part in the forward's collectives. Consumers cannot tell.

`capture.parallel`:
- none: tp_size 1; every rank is a group of its own and holds the whole target.
- tp: transformers' own tensor parallelism (the family's `base_model_tp_plan`,
  DTensor) over the group's ranks. Weights are read shard by shard from the
  safetensors files onto each rank's device; the whole target never exists on one
  device or on the host. Decoder layers return replicated hidden states, so the
  capture hooks see the full features on every rank of the group.
- pipeline: transformers' `device_map="auto"` in one process: the target's layers
  placed in turn over this process's GPUs, for families without a TP plan.
- auto: none at tp_size 1; else tp where the family has a plan, pipeline where not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("auto", "none", "tp", "pipeline")


@dataclass(frozen=True, slots=True)
class CapturePlan:
    mode: str  # none | tp | pipeline
    tp_size: int
    rank: int
    world_size: int

    @property
    def num_groups(self) -> int:
        return self.world_size // self.tp_size

    @property
    def group(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_leader(self) -> bool:
        """Publishes its group's features (the group's first rank)."""
        return self.rank % self.tp_size == 0

    def shard(self, samples: list) -> list:
        """The samples this rank's group captures."""
        return samples[self.group::self.num_groups]


def has_tp_plan(hf_config) -> bool:
    return bool(getattr(hf_config, "base_model_tp_plan", None))


def plan_capture(capture_cfg, hf_config, world_size: int, rank: int, device: torch.device) -> CapturePlan:
    """Check capture.parallel and capture.tp_size against the target, the job and the
    host, and resolve auto; every error names the key and what to do."""
    mode, tp = capture_cfg.parallel, capture_cfg.tp_size
    family = getattr(hf_config, "model_type", "?")
    if mode == "auto":
        mode = "none" if tp == 1 else ("tp" if has_tp_plan(hf_config) else "pipeline")
    if mode == "none" and tp != 1:
        raise ValueError(f"capture.tp_size: {tp} with capture.parallel none; set capture.parallel tp (or auto), "
                         "or capture.tp_size 1")
    if mode == "pipeline":
        if world_size != 1:
            raise ValueError("capture.parallel: pipeline places the target over one process's GPUs; run one "
                             f"process (not torchrun with {world_size} ranks), or use capture.parallel tp")
        if device.type != "cuda":
            raise ValueError("capture.parallel: pipeline spreads the target over CUDA GPUs, but capture runs on "
                             f"{device}; use capture.parallel none on CPU")
        return CapturePlan("pipeline", 1, rank, world_size)
    if mode == "tp":
        if not has_tp_plan(hf_config):
            raise ValueError(f"capture.parallel: tp, but transformers has no tensor-parallel plan for model type "
                             f"{family!r}; use capture.parallel pipeline (one process over its GPUs)")
        if tp > world_size or world_size % tp:
            raise ValueError(f"capture.tp_size: {tp} must divide the job's {world_size} rank(s) (torchrun "
                             f"--nproc_per_node); with {world_size} rank(s) use a divisor of it")
        if device.type == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"capture.tp_size: {tp} exceeds the {torch.cuda.device_count()} GPU(s) of this host")
        heads = getattr(hf_config, "num_attention_heads", 0)
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        if heads % tp or kv_heads % tp:
            raise ValueError(f"capture.tp_size: {tp} does not divide the target's {heads} attention heads and "
                             f"{kv_heads} key/value heads; choose a common divisor")
    return CapturePlan(mode, tp, rank, world_size)


def tp_mesh(plan: CapturePlan, device: torch.device):
    """The device mesh of this rank's TP group (one mesh dimension per group layout)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (plan.num_groups, plan.tp_size), mesh_dim_names=("group", "tp"))
    return mesh["tp"]


class LeaderOnly:
    """A group member's view of the store: it sees what is published (so every rank of
    a group skips the same batches and their collectives stay matched) and publishes
    nothing; the leader puts the features."""

    def __init__(self, store):
        self.store = store

    def lookup(self, sample_id: str, index: int):
        return self.store.lookup(sample_id, index)

    def put(self, sample_id: str, index: int, tensors):
        return None
