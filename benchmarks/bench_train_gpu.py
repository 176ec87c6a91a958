"""Draft training throughput and MFU on GPU, on random features.

One optimizer step is the trainer's own (`parallel.TrainState.step`): chunked
teacher, step masks, TTT loss with fused TTT attention and chunked draft head
(through FSDP2 on CUDA, one GPU included), backward, clipping, AdamW. MFU is
against the card's bf16 matmul rate measured in the same run.

    python benchmarks/bench_train_gpu.py --out bench.json              # one GPU, 2k/8k/32k
    torchrun --nproc_per_node 2 benchmarks/bench_train_gpu.py --seqs 8192 --out scale2.json
    python benchmarks/bench_train_gpu.py --small --out smoke.json      # CPU smoke test

FLOPs per token: each TTT step runs q/k/v/o, the MLP and the draft lm_head plus
causal attention over a mean prefix of T/2, three times (forward and backward);
the fc runs once per token (three times, it is trained) and the frozen target
lm_head once (forward only). Recomputation (of the draft head and of the decoder
layer, by `--recompute`; each run's JSON says which auto chose and the peak the
memory model predicted for it, beside the measured one) is not counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

# As the `draftflow` command does (cli.main): long steps need the allocator's expandable
# segments, or 128k runs out of memory in fragmented blocks (docs/benchmarks.md).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from draftflow.config import COMPILE_CHOICES, TrainConfig, compile_option
from draftflow.train.batches import collate
from draftflow.train.distributed import init_distributed, shutdown
from draftflow.train.loss import Teacher
from draftflow.train.memory import GIB
from draftflow.train.model import DraftModelConfig, Eagle3Draft
from draftflow.train.parallel import TrainState
from draftflow.train.ttt_attention import reference_ttt_attention, ttt_attention

LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, vocab_size=128256, draft_vocab_size=32000, target_hidden_size=4096)
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=512, draft_vocab_size=128, target_hidden_size=64)
TTT_STEPS = 7


def draft_config(shape: dict) -> DraftModelConfig:
    return DraftModelConfig(**shape, rms_norm_eps=1e-5, max_position_embeddings=131072, aux_layer_ids=(1, 15, 28),
                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def build(shape: dict, device: torch.device):
    cfg = draft_config(shape)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    draft.t2d[: cfg.draft_vocab_size] = True  # draft vocab = the first Vd target ids (d2t stays 0)
    draft = draft.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = Teacher(torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=dtype) * 0.02,
                      torch.arange(cfg.draft_vocab_size)).to(device)
    return cfg, draft, teacher, "model.py"


def random_batch(cfg: DraftModelConfig, t: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = cfg.target_hidden_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sample = {"input_ids": torch.randint(0, cfg.vocab_size, (t,), generator=g),
              "loss_mask": torch.ones(t, dtype=torch.uint8),
              "aux_hidden": torch.randn(t, 3 * h, generator=g).to(dtype),
              "last_hidden": torch.randn(t, h, generator=g).to(dtype)}
    return collate([sample], ["bench"]).to(device)


def flops_per_token(cfg: DraftModelConfig, t: int, num_steps: int = TTT_STEPS) -> float:
    h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    matmul = 2 * (2 * h * nh * hd + 2 * 2 * h * nkv * hd + nh * hd * h + 3 * h * cfg.intermediate_size
                  + h * cfg.draft_vocab_size)
    attention = 2 * 2 * nh * hd * (t / 2)  # q.k and p.v over a mean causal prefix of T/2
    fc = 2 * 3 * cfg.target_hidden_size * h
    return 3 * num_steps * (matmul + attention) + 3 * fc + 2 * h * cfg.vocab_size


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 30) -> float:
    """The card's bf16 dense matmul rate, measured now."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - start) / 1e12


def train_step(state: TrainState, batch) -> float:
    return state.step([batch])["loss"]


def profile_steps(step, steps: int, top: int = 30) -> list[dict]:
    """Device time per kernel/op name over `steps` more steps (torch.profiler): where a
    step's time goes, largest first, with its share of the total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    # on CUDA only the kernels (an aten op's row repeats its kernels' time)
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0 and (not cuda or e.device_type.name == "CUDA")]
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: -getattr(e, attr))[:top]
    return [{"name": e.key[:120], "ms_per_step": getattr(e, attr) / 1e3 / steps, "share": getattr(e, attr) / total,
             "calls_per_step": e.count / steps} for e in rows]


def bench_seq(state: TrainState, cfg, t, device, rank, warmup, steps, profile: bool = False) -> dict:
    batch = random_batch(cfg, t, device, seed=rank)
    plan = state.loss.plan(state.loss.prepare(batch))  # what auto chooses, and the peak it predicts
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(warmup):
            train_step(state, batch)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = [train_step(state, batch) for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / steps
        kernels = profile_steps(lambda: train_step(state, batch), 2) if profile else None
    except torch.cuda.OutOfMemoryError as e:
        return {"seq": t, "error": f"out of memory: {str(e).splitlines()[0]}", "head_recomputed": plan.head,
                "layer_recomputed": plan.layer, "predicted_peak_gib": plan.predicted_bytes / GIB}
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
    out = {"seq": t, "step_s": step_s, "tokens_per_s_per_gpu": t / step_s, "peak_gib": peak,
           "final_loss": losses[-1], "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
           "head_recomputed": plan.head, "layer_recomputed": plan.layer,
           "predicted_peak_gib": plan.predicted_bytes / GIB, "predicted_fits_card": plan.fits}
    if kernels is not None:
        out["profile"] = kernels
    return out


def check_attention(device: torch.device) -> dict:
    """Fused merge (flash on CUDA) against the reference math in float32, output and grads."""
    g = torch.Generator().manual_seed(0)
    q, *kv = [torch.randn(1, 8, 1024, 128, generator=g).to(device, torch.bfloat16).requires_grad_(True)
              for _ in range(9)]
    keys, values = kv[:4], kv[4:]
    w = torch.randn(1, 8, 1024, 128, generator=g).to(device)
    fused = ttt_attention(q, keys, values, 128 ** -0.5)
    grads = torch.autograd.grad((fused.float() * w).sum(), [q, *keys, *values])
    inputs32 = [x.detach().float().requires_grad_(True) for x in (q, *keys, *values)]
    ref = reference_ttt_attention(inputs32[0], inputs32[1:5], inputs32[5:], 128 ** -0.5)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs32)

    def rel(a, b):
        return float((a.detach().float() - b.detach()).norm() / b.detach().norm())

    return {"kernel": "flash_cuda" if device.type == "cuda" else "reference", "out_rel_err": rel(fused, ref),
            "grad_rel_err_max": max(rel(a, b) for a, b in zip(grads, ref_grads))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="2048,8192,32768")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU: a smoke test of this script")
    ap.add_argument("--recompute", default="auto", help="train.recompute: auto | always | never")
    ap.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                    help="train.compile (auto, the default: on CUDA)")
    ap.add_argument("--profile", action="store_true", help="also profile 2 steps per seq: device time by kernel")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    info = init_distributed("cpu" if args.small else "auto")
    device = info.device
    cfg, draft, teacher, attention_from = build(SMALL if args.small else LLAMA31_8B, device)
    # lr as small as a fine-tune's, no warmup or decay: the benchmark measures speed
    tc = TrainConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, max_grad_norm=1.0, recompute=args.recompute,
                     compile=compile_option(args.compile))
    state = TrainState(draft, teacher, tc, TTT_STEPS, 0.8)  # as the trainer: FSDP2 on CUDA, one GPU included
    options = {"recompute": args.recompute, "compile": state.compile}
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "world_size": info.world_size,
              **options,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "attention": attention_from, "fsdp2": state.sharded, "ttt_steps": TTT_STEPS, "runs": []}
    if device.type == "cuda":
        result["matmul_tflops"] = matmul_tflops(device)
    result["attention_check"] = check_attention(device)
    for t in [int(s) for s in args.seqs.split(",")]:
        run = bench_seq(state, cfg, t, device, info.rank, args.warmup, args.steps, args.profile)
        if "step_s" in run:
            run["flops_per_token"] = flops_per_token(cfg, t)
            run["tokens_per_s"] = run["tokens_per_s_per_gpu"] * info.world_size
            if "matmul_tflops" in result:
                run["mfu"] = run["flops_per_token"] * run["tokens_per_s_per_gpu"] / (result["matmul_tflops"] * 1e12)
        result["runs"].append(run)
        if info.is_main:
            print(json.dumps({k: v for k, v in run.items() if k != "profile"}), flush=True)
            for row in run.get("profile", []):
                print(f"  {row['ms_per_step']:8.2f} ms {row['share']:6.1%} x{row['calls_per_step']:<6g} {row['name']}")
    if info.is_main:
        print_table(result)
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutdown()


def print_table(result: dict) -> None:
    print(f"\n{result['device']} x{result['world_size']}, torch {result['torch']}, {result['date']}, "
          f"bf16 matmul {result.get('matmul_tflops', float('nan')):.0f} TFLOP/s, attention: {result['attention']}, "
          f"recompute {result['recompute']}, compile {result['compile']}, fsdp2 {result['fsdp2']}")
    print(f"{'seq':>7} {'tok/s':>9} {'tok/s/gpu':>10} {'MFU':>6} {'peak GiB':>9} {'predicted':>9} {'step s':>7}"
          "  recomputed")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['seq']:>7} {r['error']}")
            continue
        print(f"{r['seq']:>7} {r['tokens_per_s']:>9.0f} {r['tokens_per_s_per_gpu']:>10.0f} "
              f"{r.get('mfu', float('nan')):>6.1%} {r['peak_gib']:>9.1f} {r['predicted_peak_gib']:>9.1f} "
              f"{r['step_s']:>7.3f}  {recomputed(r)}")


def recomputed(run: dict) -> str:
    """What backward recomputed in a run: nothing, head, layer, or head and layer."""
    parts = [p for p in ("head", "layer") if run[f"{p}_recomputed"]]
    return " and ".join(parts) or "nothing"


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
