"""FSDP2 training of the draft across ranks (torchrun in a subprocess).

The CUDA test (2 GPUs, NCCL, bf16) is skipped without them; the same worker
runs on CPU with gloo, in float32, where it must match one process exactly
enough to catch a gradient that is averaged instead of summed, and where resume
from a sharded checkpoint must reproduce the uninterrupted losses bit for bit.

This file is also the worker: `torchrun --nproc_per_node 2 tests/test_gpu.py DEVICE OUT_JSON`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS, RESUME_AT, NUM_TTT = 6, 3, 3


def tiny_draft(device: str):
    from draftflow.train.model import DraftModelConfig, Eagle3Draft
    cfg = DraftModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, vocab_size=96, draft_vocab_size=64, target_hidden_size=64,
                           rms_norm_eps=1e-6, max_position_embeddings=256, aux_layer_ids=(0, 1, 2))
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    draft.d2t.fill_(8)  # draft id i is target id i + 8
    draft.t2d[8:72] = True
    return draft.to(device)


def tiny_teacher(device: str):
    from draftflow.train.loss import Teacher
    g = torch.Generator().manual_seed(1)
    return Teacher(torch.randn(96, 64, generator=g) * 0.5, torch.arange(8, 72)).to(device)


def rank_batch(rank: int, device: str):
    """A fixed sample per rank (so the loss can fall by fitting it)."""
    from draftflow.train.batches import collate
    g = torch.Generator().manual_seed(100 + rank)
    t = 48 + 8 * rank
    sample = {"input_ids": torch.randint(0, 96, (t,), generator=g), "loss_mask": torch.ones(t, dtype=torch.uint8),
              "aux_hidden": torch.randn(t, 192, generator=g), "last_hidden": torch.randn(t, 64, generator=g)}
    return collate([sample], [f"s{rank}"]).to(torch.device(device))


def train_config():
    from draftflow.config import TrainConfig
    return TrainConfig(lr=3e-3, warmup_steps=1, max_steps=NUM_STEPS, max_grad_norm=1.0, compile=False)


def train_steps(state, batches, steps) -> list[float]:
    """The trainer's own step (`TrainState.step`: global valid counts, backward per
    micro-batch, gradient reduction, clip, AdamW)."""
    return [state.step(batches)["loss"] for _ in range(steps)]


def worker(device: str, out_json: str) -> None:
    import torch.distributed as dist
    from draftflow.train.distributed import init_distributed, shutdown
    from draftflow.train.parallel import TrainState
    info = init_distributed(device)
    dev = str(info.device)
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    ckpt_root = Path(out_json).parent / "checkpoints"

    def fresh():
        return TrainState(tiny_draft(dev), tiny_teacher(dev), train_config(), NUM_TTT, 0.8, shard=True,
                          param_dtype=dtype)

    batches = [rank_batch(info.rank, dev)]
    state = fresh()
    first = train_steps(state, batches, RESUME_AT)
    ckpt = state.save(ckpt_root, RESUME_AT, {"test": True})
    rest = train_steps(state, batches, NUM_STEPS - RESUME_AT)
    state = fresh()
    step, _ = state.load(ckpt)
    resumed = train_steps(state, batches, NUM_STEPS - step)
    embed_state = [k for k in state.optimizer.state_dict()["state"]]  # only trainable params carry state
    if info.rank == 0:
        Path(out_json).write_text(json.dumps({"losses": first + rest, "resumed": resumed, "resume_step": step,
                                              "world_size": dist.get_world_size(), "num_states": len(embed_state),
                                              "num_trainable": len(state.params),
                                              "checkpoint_files": sorted(p.name for p in ckpt.iterdir())}))
    shutdown()


def run_workers(device: str, tmp: Path) -> dict:
    out = tmp / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), device, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def single_process_losses() -> list[float]:
    """Both ranks' samples as micro-batches of one process: what FSDP2 must reproduce."""
    from draftflow.train.parallel import TrainState
    state = TrainState(tiny_draft("cpu"), tiny_teacher("cpu"), train_config(), NUM_TTT, 0.8)
    return train_steps(state, [rank_batch(0, "cpu"), rank_batch(1, "cpu")], NUM_STEPS)


def check_result(res: dict, exact_resume: bool) -> None:
    losses = res["losses"]
    assert res["world_size"] == 2 and len(losses) == NUM_STEPS
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.9 * losses[0], losses
    assert res["num_states"] == res["num_trainable"]  # nothing for the frozen embedding
    assert {"dcp", "model.safetensors", "meta.json", "trainer.pt", "rng.rank0.pt", "rng.rank1.pt"} <= set(
        res["checkpoint_files"])
    if exact_resume:
        assert res["resumed"] == losses[RESUME_AT:]
    else:
        torch.testing.assert_close(torch.tensor(res["resumed"]), torch.tensor(losses[RESUME_AT:]), rtol=2e-2, atol=0)


def test_fsdp2_on_two_cpu_ranks_matches_one_process_and_resumes_exactly():
    with tempfile.TemporaryDirectory() as tmp:
        res = run_workers("cpu", Path(tmp))
    check_result(res, exact_resume=True)
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(single_process_losses()),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp2_on_two_gpus_trains_with_falling_finite_loss_and_resumes():
    with tempfile.TemporaryDirectory() as tmp:
        check_result(run_workers("cuda", Path(tmp)), exact_resume=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_gpu_trainer_goes_through_fsdp2_and_resumes_from_its_sharded_checkpoint(tmp_path):
    """A single-process CUDA run trains through FSDP2 (a one-rank group): its checkpoints
    are sharded (DCP), resume continues from one, and a CPU run resumes it too."""
    from draftflow.config import load_config
    from draftflow.roles import run_colocated
    from draftflow.train.metrics import read_metrics

    def cfg(root, *more):
        return load_config([ROOT / "examples" / "tiny.yaml"], [
            f"features.root={root / 'feat'}", f"train.output_dir={root / 'run'}", "train.progress=false",
            "train.tensorboard=false", "capture.device=cuda", "train.device=cuda", "train.max_steps=6",
            "data.max_samples=12", "train.batch_size=2", "train.grad_accum=2", "train.log_every=1", *more])

    run_colocated(cfg(tmp_path / "a"))
    first = run_colocated(cfg(tmp_path / "b"), stop_after=3)
    meta = json.loads((first.checkpoint / "meta.json").read_text())
    assert meta["layout"] == "dcp" and meta["world_size"] == 1
    assert (first.checkpoint / "dcp").is_dir() and (first.checkpoint / "model.safetensors").is_file()
    resumed = run_colocated(cfg(tmp_path / "b"))
    assert resumed.final_dir is not None
    straight = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    again = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [m["step"] for m in again] == list(range(1, 7))
    losses = torch.tensor([m["loss"] for m in straight])
    assert torch.isfinite(losses).all() and losses[-1] < losses[0], losses
    # bf16 on GPU with atomics in flash attention's backward: close, not bit-equal
    torch.testing.assert_close(torch.tensor([m["loss"] for m in again]), losses, rtol=2e-2, atol=0)
    # Another device kind continues the same checkpoint (the features stay the ones captured on CUDA).
    on_cpu = run_colocated(cfg(tmp_path / "b", "train.device=cpu", "capture.device=cuda", "train.max_steps=8"))
    assert on_cpu.final_dir is not None
    assert [m["step"] for m in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")] == list(range(1, 9))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
