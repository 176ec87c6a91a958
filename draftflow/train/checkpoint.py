"""Checkpoints with exact resume: model, optimizer, scheduler, RNG and step.

A checkpoint is a folder `step_XXXXXXXX/` written under a temporary name and
renamed into place once complete; `meta.json` is written last inside it, so a
folder without it (a crash mid-save) is never taken for a checkpoint. The data
position needs no saving of its own: the sample order is a function of the step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_VERSION = 1
EXCLUDED = ("embed_tokens.",)  # frozen target weights: reloaded from the target


def draft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(EXCLUDED)}


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


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, meta: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(draft_state(model), str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step}, tmp / "trainer.pt")
    return publish(tmp, final, {"format_version": CHECKPOINT_VERSION, "step": step, **meta}, keep)


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


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> int:
    """Restore everything in place; returns the step to continue from."""
    meta = read_meta(ckpt)
    if meta.get("layout") is not None:
        raise ValueError(f"{ckpt}: a sharded checkpoint (meta.json layout {meta['layout']!r}) written by a CUDA "
                         f"run on {meta.get('world_size')} GPU(s): resume it on CUDA")
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    missing = [k for k in missing if not k.startswith(EXCLUDED)]
    if missing or unexpected:
        raise ValueError(f"{ckpt}: checkpoint does not fit the draft (missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", weights_only=True))
    state = torch.load(Path(ckpt) / "trainer.pt", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])
