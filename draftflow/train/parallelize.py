"""FSDP2 for the draft, and sharded (DCP) checkpoints with exact resume.

Every CUDA run trains through FSDP2, one GPU included (a one-rank process group):
its bf16 parameter policy casts each weight once per step, where autocast over
float32 weights would cast it again at every use in the unroll and add every bf16
weight gradient into a float32 one. CPU runs keep a plain `DraftLoss` (float32,
bit-exact across world sizes with the trainer's own gradient all-reduce).

FSDP2 gathers parameters in hooks around a module's `forward`; the draft is
driven through `unroll` and `logits`, so the loss runs inside `DraftLoss.forward`
and the whole draft is sharded as one unit (one decoder layer: nothing to gain
from finer units). Master weights stay float32 and sharded; compute sees
bfloat16 copies; gradients are reduced in float32 and summed, not averaged,
because losses are already normalised by the global count of valid positions.

A sharded checkpoint keeps the layout of `checkpoint.py` (a `step_XXXXXXXX/`
folder renamed into place, `meta.json` written last) with `dcp/` (model and
optimizer shards) in place of `optimizer.pt`, a full `model.safetensors` for
export, and one RNG file per rank.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from draftflow.config import RECOMPUTE_MODES
from draftflow.train.checkpoint import (CHECKPOINT_VERSION, EXCLUDED, publish, read_meta, rng_state,
                                        set_rng_state)
from draftflow.train.chunked_loss import chunked_ttt_loss, head_terms
from draftflow.train.model import Eagle3Draft
from draftflow.train.ttt_attention import EAGER_MERGE, compiled_merge

LAYOUT = "dcp"


def compile_enabled(value, device: torch.device) -> bool:
    """`train.compile`: true, false, or auto (on CUDA, where the fused graphs pay for their
    compile time within a few steps; on CPU the compile time would dominate short runs)."""
    if isinstance(value, bool):
        return value
    if value == "auto":
        return device.type == "cuda"
    raise ValueError(f"train.compile: {value!r}, expected true, false or auto")


# `auto` on CUDA. The draft head keeps, for backward, about HEAD_BYTES_PER_LOGIT bytes per
# row and draft-vocab entry (a bf16 logit and a float32 log-prob; 5.8 measured with
# train.compile on an H200: 9.7 GiB more at 8192 rows x 7 steps for a 32k draft vocab; 8
# for the eager head's extra copies). It is kept while that takes at most HEAD_MEMORY_SHARE of
# the card and recomputed per chunk beyond, which costs the head's forward again (about
# 10% of a step). The decoder layer's activations (about 2 GiB per 2048 positions over 7
# steps for an 8B-shaped draft) are recomputed from RECOMPUTE_LAYER_TOKENS positions of
# the micro-batch on.
HEAD_BYTES_PER_LOGIT = 8
HEAD_MEMORY_SHARE = 0.25
RECOMPUTE_LAYER_TOKENS = 16384


@functools.cache
def _card_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


class DraftLoss(nn.Module):
    """The draft's TTT loss as a module forward (see module docstring).

    recompute (`train.recompute`): whether backward recomputes the draft head (per
    chunk of rows) and the decoder layer instead of keeping their activations:
    always, never, or auto (on CUDA: the head once its kept activations would take
    more than HEAD_MEMORY_SHARE of the card, the layer from RECOMPUTE_LAYER_TOKENS
    positions of the micro-batch on; each costs compute). compile (`train.compile`):
    torch.compile the layer's two halves, the draft head and the attention merge,
    fusing the norms, RoPE, SiLU, the soft cross-entropy's and the merge's elementwise
    work.
    """

    def __init__(self, draft: Eagle3Draft, recompute: str = "auto", compile: bool = False):
        super().__init__()
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute: {recompute!r}, expected one of {', '.join(RECOMPUTE_MODES)}")
        self.draft = draft
        self.recompute = recompute
        # compiled callables held here, so the draft itself stays as built
        self.head = torch.compile(head_terms) if compile else head_terms
        self.layer = None
        self.merge = compiled_merge() if compile else EAGER_MERGE
        if compile:
            self.layer = (torch.compile(draft.midlayer.qkv), torch.compile(draft.midlayer.finish))

    def recomputes(self, inputs) -> tuple[bool, bool]:
        """(head, layer): what backward recomputes for this micro-batch (auto: by the
        memory the head's rows would keep, and by all the positions the layer runs on)."""
        if self.recompute == "auto":
            ids = inputs.batch.input_ids
            if not ids.is_cuda:
                return False, False
            head_bytes = (sum(r.numel() for r in inputs.rows.draft) * self.draft.cfg.draft_vocab_size
                          * HEAD_BYTES_PER_LOGIT)
            return head_bytes > HEAD_MEMORY_SHARE * _card_bytes(ids.device), ids.numel() >= RECOMPUTE_LAYER_TOKENS
        return (self.recompute == "always",) * 2

    def forward(self, inputs, decay: float, denominators: list[float]):
        head, layer = self.recomputes(inputs)
        return chunked_ttt_loss(self.draft, inputs, decay, denominators, recompute=head, recompute_layer=layer,
                                head=self.head, layer=self.layer, merge=self.merge)


def loss_module(draft: Eagle3Draft, recompute: str = "auto", compile: bool | str = False,
                ) -> tuple[DraftLoss, bool]:
    """(module, sharded): the loss module a run calls for `draft` (already on its
    device), and whether it is FSDP2's. On CUDA the draft goes through FSDP2 over all
    ranks, or over a one-rank group of its own in a single process (see the module
    docstring); on CPU it is a plain `DraftLoss`, and a multi-process CPU run
    all-reduces gradients itself."""
    device = next(draft.parameters()).device
    compile = compile_enabled(compile, device)
    if device.type != "cuda":
        return DraftLoss(draft, recompute, compile), False
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    return apply_fsdp2(draft, recompute=recompute, compile=compile), True


def apply_fsdp2(draft: Eagle3Draft, param_dtype: torch.dtype = torch.bfloat16, recompute: str = "auto",
                compile: bool = False) -> DraftLoss:
    """Shard `draft` (already on this rank's device) over all ranks and return the
    loss module to call. The frozen `embed_tokens` is sharded too
    but has no gradient, so an optimizer over `requires_grad` parameters keeps no
    state for it. `param_dtype` float32 is for tests that compare with one process."""
    mesh = init_device_mesh(next(draft.parameters()).device.type, (dist.get_world_size(),))
    module = DraftLoss(draft, recompute, compile)
    # Inputs keep their dtypes: the teacher's float32 log-probs are soft targets (the
    # default would cast every floating input to param_dtype); the draft casts its
    # features itself.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # One unit, kept gathered from forward to backward: the draft is one layer, and the
    # TTT unroll calls it num_steps times per forward.
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    module.set_gradient_divide_factor(1.0)  # sum: losses are already globally normalised
    if mesh.device_type == "cpu":
        module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM (NCCL does)
    return module


# ---- sharded checkpoints ------------------------------------------------------------

def _trainable_state(module: DraftLoss, optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(module, optimizer)
    model_sd = {k: v for k, v in model_sd.items() if not k.removeprefix("draft.").startswith(EXCLUDED)}
    return {"model": model_sd, "optim": optim_sd}


def _full_draft_state(module: DraftLoss) -> dict[str, torch.Tensor]:
    """Unsharded draft weights on CPU (a collective; rank 0 gets the tensors)."""
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("draft."): v.contiguous() for k, v in full.items()
            if not k.removeprefix("draft.").startswith(EXCLUDED)}


def save_sharded_checkpoint(root: Path, step: int, module: DraftLoss, optimizer, scheduler, meta: dict,
                            keep: int) -> Path:
    """Every rank calls this; returns the checkpoint folder."""
    rank = dist.get_rank()
    root, final = Path(root), Path(root) / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"  # one name for all ranks: they write into it together
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_trainable_state(module, optimizer), checkpoint_id=str(tmp / "dcp"))
    full = _full_draft_state(module)
    torch.save(rng_state(), tmp / f"rng.rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        save_file(full, str(tmp / "model.safetensors"))
        torch.save({"scheduler": scheduler.state_dict(), "step": step}, tmp / "trainer.pt")
        publish(tmp, final, {"format_version": CHECKPOINT_VERSION, "step": step, "layout": LAYOUT,
                             "world_size": dist.get_world_size(), **meta}, keep)
    dist.barrier()
    return final


def load_sharded_checkpoint(ckpt: Path, module: DraftLoss, optimizer, scheduler) -> int:
    """Restore model shards, optimizer shards, scheduler and this rank's RNG in
    place (every rank calls this); returns the step to continue from."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if meta.get("layout") != LAYOUT:
        raise ValueError(f"{ckpt}: not a sharded checkpoint (meta.json layout {meta.get('layout')!r}, "
                         f"expected {LAYOUT!r}); it was written by a CPU run (resume it on CPU) or by a one-GPU "
                         "run of a DraftFlow that did not yet train one GPU through FSDP2 (start a new "
                         "train.output_dir)")
    rng_file = ckpt / f"rng.rank{dist.get_rank()}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{ckpt}: no {rng_file.name}; it was written by {meta.get('world_size')} ranks, "
                         f"this run has {dist.get_world_size()}")
    state = _trainable_state(module, optimizer)
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(torch.load(rng_file, weights_only=True))
    return int(trainer["step"])
