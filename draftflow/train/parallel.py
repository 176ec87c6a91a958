"""How the draft trains on this process's device and ranks: the one seam where
device kind and parallelism are decided (the trainer has no branch on either).

`TrainState` is built once, from the draft, its teacher, the train config and the
device, and owns everything that depends on them:

- the layout. On CUDA the draft trains through FSDP2, one GPU included (a one-rank
  process group): its bf16 parameter policy casts each weight once per step, where
  autocast over float32 weights would cast it again at every use in the unroll and
  add every bf16 weight gradient into a float32 one. On CPU the draft is replicated
  and gradients are summed by one all-reduce of a flat buffer (float32, bit-exact
  across world sizes, so a two-rank run equals a one-process run).
- the loss module (`loss.DraftLoss`) with `train.compile` and `train.recompute`
  applied, in one place;
- AdamW (one fused kernel on CUDA), warmup + cosine schedule, bf16 autocast on CUDA,
  batches collated into pinned memory on CUDA;
- `step(batches)`: one optimizer step (the trainer's, the GPU benchmark's and the
  GPU test's: there is no other copy);
- `save` / `load`: checkpoints through `checkpoint.py` (DCP for every layout, so
  a checkpoint resumes on another world size or device kind).

FSDP2 gathers parameters in hooks around a module's `forward`, which is why the
loss runs inside `DraftLoss.forward`; the whole draft is one unit (one decoder
layer: nothing to gain from finer units), kept gathered from forward to backward
because the unroll calls it ttt_length times. Master weights stay float32;
gradients are reduced in float32 and summed, not averaged, because losses are
already normalised by the global count of valid positions.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from draftflow.config import TrainConfig
from draftflow.train import checkpoint as ckpt
from draftflow.train.distributed import all_reduce_grads, all_reduce_sum
from draftflow.train.loss import DraftLoss, StepOutput, Teacher
from draftflow.train.model import Eagle3Draft


def compile_enabled(value, device: torch.device) -> bool:
    """`train.compile`: true, false, or auto (on CUDA, where the fused graphs pay for their
    compile time within a few steps; on CPU the compile time would dominate short runs)."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        return device.type == "cuda"
    raise ValueError(f"train.compile: {value!r}, expected true, false or auto")


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class TrainState:
    """The draft's training state on this rank (see module docstring).

    shard: None chooses by device (FSDP2 on CUDA, replicated on CPU); True shards
    on CPU too (gloo), for tests that compare the sharded path with one process.
    param_dtype: the compute dtype of FSDP2's parameter policy (bf16; float32 for
    such tests).
    """

    def __init__(self, draft: Eagle3Draft, teacher: Teacher, tc: TrainConfig, ttt_length: int, decay: float,
                 shard: bool | None = None, param_dtype: torch.dtype = torch.bfloat16):
        self.device = next(draft.parameters()).device
        cuda = self.device.type == "cuda"
        self.ttt_length, self.tc = ttt_length, tc
        self.sharded = cuda if shard is None else shard
        self.autocast = cuda
        self.pin_memory = cuda  # the copy to the GPU runs asynchronously from pinned memory
        self.compile = compile_enabled(tc.compile, self.device)
        loss = DraftLoss(draft, teacher.to(self.device), ttt_length, decay, tc.recompute, self.compile)
        self.loss = self._shard(loss, param_dtype) if self.sharded else loss
        self.draft = draft
        self.params = [p for p in draft.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay, fused=cuda)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))

    @staticmethod
    def _shard(loss: DraftLoss, param_dtype: torch.dtype) -> DraftLoss:
        device = next(loss.parameters()).device
        if not dist.is_initialized():  # one process: a one-rank group of its own
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device if device.type == "cuda" else None)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # Inputs keep their dtypes: the teacher's float32 log-probs are soft targets (the
        # default would cast every floating input to param_dtype); the draft casts its
        # features itself. The frozen embedding is sharded too but has no gradient, so
        # the optimizer keeps no state for it.
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        fully_shard(loss, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        loss.set_gradient_divide_factor(1.0)  # sum: losses are already globally normalised
        if device.type == "cpu":
            loss.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM (NCCL does)
        return loss

    def _autocast(self):
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batches) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (a collective: every rank
        calls it, a rank without data with one batch that learns nothing). Returns the
        step's metrics, reduced over micro-batches and ranks."""
        k_steps, decay = self.ttt_length, self.loss.decay
        inputs = [self.loss.prepare(b) for b in batches]
        # Per unroll step: rows whose teacher argmax is in the draft vocab (the loss's
        # denominators), then every row the step learns at (SpecForge's acc denominator).
        both = all_reduce_sum(sum(torch.cat([x.counts(), x.counts_all()]) for x in inputs)).tolist()
        counts, rows = both[:k_steps], both[k_steps:]
        sums = torch.zeros(3, k_steps, device=self.device)
        for x in inputs:
            with self._autocast():
                out = StepOutput(*self.loss(x, counts))
            out.loss.backward()
            sums = sums + out.sums()
        if not self.sharded:  # FSDP2 reduce-scatters (sums) gradients during backward
            all_reduce_grads(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.tc.max_grad_norm)
        if self.sharded:
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        ploss, correct, accept = all_reduce_sum(sums).tolist()
        out = {"grad_norm": float(grad_norm), "valid_tokens": counts[0], "loss_tokens": rows[0]}
        for k in range(k_steps):
            out[f"ploss_{k}"] = ploss[k] / max(counts[k], 1.0)
            out[f"acc_{k}"] = correct[k] / max(rows[k], 1.0)
            out[f"acc_in_vocab_{k}"] = correct[k] / max(counts[k], 1.0)  # the hits the draft vocab can express
            out[f"accept_{k}"] = accept[k] / max(counts[k], 1.0)
        out["loss"] = sum(decay ** k * out[f"ploss_{k}"] for k in range(k_steps))
        return out

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, root: Path, step: int, meta: dict, data: dict | None = None) -> Path:
        return ckpt.save_checkpoint(root, step, self.loss, self.optimizer, self.scheduler, meta,
                                    self.tc.keep_checkpoints, data)

    def load(self, path: Path) -> tuple[int, dict]:
        return ckpt.load_checkpoint(path, self.loss, self.optimizer, self.scheduler)
