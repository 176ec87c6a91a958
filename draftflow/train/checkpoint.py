"""Checkpoints with exact resume, one format for every layout and world size.

A checkpoint is a folder `step_XXXXXXXX/`, written under a temporary name and
renamed into place once complete; `meta.json` is written last inside it, so a
folder without it (a crash mid-save) is never taken for a checkpoint. It holds:

    dcp/               model and optimizer state through torch.distributed.checkpoint
                       (DCP), keyed by parameter name, so a checkpoint written by N
                       ranks (sharded by FSDP2, or replicated) loads on M ranks of
                       either layout, and on another device kind
    model.safetensors  the full draft weights, for export
    trainer.pt         scheduler, step and data position (samples the run has read)
    rng.rank<R>.pt     each rank's RNG state
    meta.json          format, step, layout, world size, run identity

Checkpoints of DraftFlow before this format (`optimizer.pt` in place of `dcp/`,
written by CPU runs) still load: their optimizer state, which is keyed by position,
is renamed to parameter names first.

Every rank calls `save_checkpoint` and `load_checkpoint` (both are collectives).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from draftflow.fsutil import naming

CHECKPOINT_VERSION = 1
LAYOUT = "dcp"
EXCLUDED = ("embed_tokens.",)  # frozen target weights: reloaded from the target
_PREFIX = "draft."  # the draft's parameter names inside the loss module


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns on every save and load in a process without a process group that it
    assumes one process; that is what a one-process run is, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _kept(name: str) -> bool:
    return not name.removeprefix(_PREFIX).startswith(EXCLUDED)


def _trainable_state(module, optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(module, optimizer)
    return {"model": {k: v for k, v in model_sd.items() if _kept(k)}, "optim": optim_sd}


def _full_draft_state(module) -> dict[str, torch.Tensor]:
    """Unsharded draft weights on CPU (a collective; rank 0 gets the tensors)."""
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(_PREFIX): v.contiguous() for k, v in full.items() if _kept(k)}


def save_checkpoint(root: Path, step: int, module, optimizer, scheduler, meta: dict, keep: int,
                    data: dict | None = None) -> Path:
    """Write and publish checkpoint `step` of `module` (the loss module holding the
    draft); `data` is the data position to resume from. Returns the folder."""
    rank, world = _rank_world()
    root, final = Path(root), Path(root) / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"  # one name for all ranks: they write into it together
    if rank == 0:
        with naming(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    _barrier()
    with naming(tmp), _one_process_quiet():
        dcp.save(_trainable_state(module, optimizer), checkpoint_id=str(tmp / "dcp"), no_dist=world == 1)
        full = _full_draft_state(module)
        torch.save(rng_state(), tmp / f"rng.rank{rank}.pt")
    _barrier()
    if rank == 0:
        with naming(tmp):
            save_file(full, str(tmp / "model.safetensors"))
            torch.save({"scheduler": scheduler.state_dict(), "step": step, "data": data or {}}, tmp / "trainer.pt")
            publish(tmp, final, {"format_version": CHECKPOINT_VERSION, "step": step, "layout": LAYOUT,
                                 "world_size": world, **meta}, keep)
    _barrier()
    return final


def publish(tmp: Path, final: Path, meta: dict, keep: int) -> Path:
    """Finish a checkpoint written in `tmp`: `meta.json` last (it marks the folder
    complete), rename it to `final`, keep only the `keep` newest checkpoints."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())


def read_meta(ckpt: Path) -> dict:
    path = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{ckpt}: not a DraftFlow checkpoint (no meta.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')!r} is not supported "
                         f"(this DraftFlow reads version {CHECKPOINT_VERSION})")
    return meta


def check_same_run(ckpt: Path, meta: dict) -> None:
    """Refuse to resume `ckpt` if it trained another run: other features (provenance,
    data hash included) or another manifest run id. Names both values of each field."""
    theirs = read_meta(ckpt)
    ours_prov, their_prov = meta.get("provenance") or {}, theirs.get("provenance") or {}
    diffs = [f"{k}: checkpoint has {their_prov.get(k)!r}, this run has {ours_prov.get(k)!r}"
             for k in sorted(set(ours_prov) | set(their_prov))
             if k != "producer_version" and ours_prov.get(k) != their_prov.get(k)]
    if theirs.get("run_id") != meta.get("run_id"):
        diffs.append(f"run_id: checkpoint has {theirs.get('run_id')!r}, this run has {meta.get('run_id')!r}")
    if diffs:
        raise ValueError(f"{ckpt}: checkpoint of another run; refusing to resume it (use a fresh "
                         "train.output_dir):\n  " + "\n  ".join(diffs))


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / "model.safetensors"))


def load_checkpoint(ckpt: Path, module, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG in place, on any world size and
    layout; returns (the step to continue from, the data position saved with it)."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if meta.get("layout") is None and (ckpt / "optimizer.pt").is_file():
        _load_plain_state(ckpt, module, optimizer)
    elif meta.get("layout") == LAYOUT:
        state = _trainable_state(module, optimizer)
        with naming(ckpt / "dcp"), _one_process_quiet():
            dcp.load(state, checkpoint_id=str(ckpt / "dcp"), no_dist=_rank_world()[1] == 1)
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
    else:
        raise ValueError(f"{ckpt / 'meta.json'}: layout {meta.get('layout')!r} is not one this DraftFlow "
                         f"reads (expected {LAYOUT!r})")
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(_rng_for_this_rank(ckpt, trainer))
    return int(trainer["step"]), dict(trainer.get("data") or {})


def _rng_for_this_rank(ckpt: Path, trainer: dict) -> dict:
    """This rank's RNG state; on another world size, that of rank (rank mod saved
    ranks). Training draws no random numbers today, so this only keeps resume exact
    should it ever do."""
    if "rng" in trainer:  # a checkpoint of the plain format
        return trainer["rng"]
    rank, _ = _rank_world()
    saved = sorted(ckpt.glob("rng.rank*.pt"), key=lambda p: int(p.name[len("rng.rank"):-len(".pt")]))
    if not saved:
        raise ValueError(f"{ckpt}: no rng.rank*.pt files; the checkpoint is incomplete")
    return torch.load(saved[rank % len(saved)], weights_only=True)


def _load_plain_state(ckpt: Path, module, optimizer) -> None:
    """A checkpoint of the plain format: full weights in model.safetensors, the
    optimizer's own state_dict (parameters by position: the draft's trainable
    parameters in order) in optimizer.pt."""
    weights = {_PREFIX + k: v for k, v in load_model_state(ckpt).items()}
    names = [_PREFIX + n for n, p in module.draft.named_parameters() if p.requires_grad]
    old = torch.load(ckpt / "optimizer.pt", weights_only=True)
    held = [i for g in old["param_groups"] for i in g["params"]]
    if sorted(held) != list(range(len(names))):
        raise ValueError(f"{ckpt / 'optimizer.pt'}: holds state for {len(held)} parameters, the draft has "
                         f"{len(names)} trainable ones; it belongs to another draft (start a new train.output_dir)")
    optim = {"state": {names[i]: s for i, s in old["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in old["param_groups"]]}
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"{ckpt / 'model.safetensors'}: does not fit the draft (missing {missing})")
    set_state_dict(module, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, strict=False))
