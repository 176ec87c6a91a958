"""SpecForge's EAGLE3 training step beside DraftFlow's, in one process on one GPU.

Same Llama-3.1-8B-shaped draft (`bench_train_gpu.LLAMA31_8B`), TTT 7, batch 1,
random features, one sequence length at a time: SpecForge at 2k, 8k and 32k, then
DraftFlow at the same lengths and alone at 64k and 128k. Per length: tokens/s,
peak GiB, MFU against the bf16 matmul rate measured at the start of the run, and
for DraftFlow what `train.recompute: auto` chose and the peak it predicted.

    pip install --no-deps .gpu/wheels/specforge-0.2.0-py3-none-any.whl   # once, on the GPU machine
    python benchmarks/bench_specforge_gpu.py --out sidebyside.json
    python benchmarks/bench_specforge_gpu.py --small --out smoke.json    # CPU smoke test, DraftFlow only

SpecForge's side (PyPI `specforge` 0.2.0, called, never copied) is its offline
EAGLE3 step as its trainer assembles it: `LlamaForCausalLMEagle3` in bf16 with
the training config's default attention backend (flex_attention) and a frozen
embedding, `OnlineEagle3Model` (TTT length 7), `Eagle3TrainStrategy` with a
`TargetHead` that re-runs the target lm_head over the stored final hidden state
(its default `compact_teacher: false`), loss weights 0.8^k, and `BF16Optimizer`
(its default: AdamW over float32 masters, clipping at 0.5, warmup + cosine).
Its FSDP1/DDP wrapper is left out: on one rank it shards nothing. The TargetHead
loads from a model folder, so a throwaway one (config.json, index, bf16 lm_head)
is written to a temporary directory.

Only SpecForge's modules listed in `SPECFORGE_MODULES` are imported, not
`specforge.cli` or its launch/runtime planes, which pull in sglang, datasets and
the rest of its requirements: these need torch, transformers (with
huggingface_hub and safetensors) and triton, which CUDA builds of torch bring, so
the specforge wheel is the only one to carry. Its loss is a Triton kernel, so on
CPU (`--small`) only DraftFlow's side runs; the JSON says so.

Each system is built, run over its lengths and then deleted (gc, empty_cache)
before the other is built. An out-of-memory error is recorded for its length and
the run goes on. The JSON is rewritten after every length.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# As the `draftflow` command does (cli.main): long steps need the allocator's expandable
# segments, or 128k runs out of memory in fragmented blocks (docs/benchmarks.md).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_gpu import (LLAMA31_8B, SMALL, TTT_STEPS, bench_seq, build, draft_config,  # noqa: E402
                             flops_per_token, matmul_tflops, random_batch, recomputed)

from draftflow.config import TrainConfig  # noqa: E402
from draftflow.train.memory import GIB  # noqa: E402
from draftflow.train.model import DraftModelConfig  # noqa: E402
from draftflow.train.parallel import TrainState  # noqa: E402

SPECFORGE_MODULES = ("specforge.algorithms.eagle3.model", "specforge.modeling.draft.llama3_eagle",
                     "specforge.modeling.target.target_head", "specforge.optimizer", "specforge.runtime.contracts",
                     "specforge.training.strategies.base")
SPECFORGE_BACKEND = "flex_attention"  # TrainingConfig.attention_backend's default in specforge 0.2.0


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- SpecForge -----------------------------------------------------------------------

def write_target_head_folder(cfg: DraftModelConfig, root: Path) -> Path:
    """The files `TargetHead.from_pretrained` reads: config.json, a safetensors index
    naming lm_head.weight, and that weight (random, bf16)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=cfg.target_hidden_size, vocab_size=cfg.vocab_size, num_hidden_layers=1,
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                intermediate_size=cfg.intermediate_size).save_pretrained(root)
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(cfg.vocab_size, cfg.target_hidden_size, generator=g) * 0.02).to(torch.bfloat16)
    save_file({"lm_head.weight": weight}, str(root / "model.safetensors"))
    index = {"weight_map": {"lm_head.weight": "model.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def build_specforge(cfg: DraftModelConfig, device: torch.device, head_folder: Path, total_steps: int):
    """SpecForge's strategy and optimizer for a draft of `cfg`'s shape (module docstring)."""
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.training.strategies.base import Eagle3TrainStrategy
    from transformers import LlamaConfig

    draft_config = LlamaConfig(
        architectures=["LlamaForCausalLMEagle3"], hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
        draft_vocab_size=cfg.draft_vocab_size, target_hidden_size=cfg.target_hidden_size, num_hidden_layers=1,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu",
        rope_parameters=dict(cfg.rope_parameters), pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    draft = LlamaForCausalLMEagle3(draft_config, attention_backend=SPECFORGE_BACKEND).to(dtype=torch.bfloat16)
    with torch.no_grad():  # draft vocab = the first Vd target ids, as DraftFlow's side
        draft.t2d.zero_()
        draft.t2d[: cfg.draft_vocab_size] = True
        draft.d2t.zero_()
    draft.freeze_embedding()
    draft = draft.to(device)
    model = OnlineEagle3Model(draft_model=draft, length=TTT_STEPS,
                              attention_backend=SPECFORGE_BACKEND).to(device=device, dtype=torch.bfloat16)
    head = TargetHead.from_pretrained(str(head_folder)).to(device)
    strategy = Eagle3TrainStrategy(model, target_head=head, ploss_decay=0.8)
    optimizer = BF16Optimizer(draft, lr=1e-4, max_grad_norm=0.5, total_steps=total_steps, warmup_ratio=0.015)
    return strategy, optimizer


def specforge_batch(cfg: DraftModelConfig, t: int, device: torch.device):
    """The same random sample as DraftFlow's side, as SpecForge's offline batch."""
    from specforge.runtime.contracts import TrainBatch

    b = random_batch(cfg, t, device, seed=0)
    tensors = {"input_ids": b.input_ids, "attention_mask": torch.ones_like(b.input_ids), "loss_mask": b.loss_mask,
               "hidden_state": b.aux_hidden.to(torch.bfloat16), "target": b.last_hidden.to(torch.bfloat16)}
    return TrainBatch(sample_ids=["bench"], strategy="eagle3", tensors=tensors,
                      metadata={"target_repr": "hidden_state"})


def specforge_step(strategy, optimizer, batch) -> float:
    out = strategy.forward_loss(batch)
    out.loss.backward()
    optimizer.step()  # clips, steps AdamW over the float32 masters, copies back, drops the grads
    return float(out.loss.detach())


def bench_specforge_seq(strategy, optimizer, cfg, t, device, warmup, steps) -> dict:
    batch = specforge_batch(cfg, t, device)
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(warmup):
            specforge_step(strategy, optimizer, batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        losses = [specforge_step(strategy, optimizer, batch) for _ in range(steps)]
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - start) / steps
    except Exception as e:  # out of memory, or anything else of SpecForge's: recorded, the run goes on
        for p in strategy.eagle3_model.parameters():
            p.grad = None
        kind = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
        return {"seq": t, "error": f"{kind}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {"seq": t, "step_s": step_s, "tokens_per_s": t / step_s,
            "peak_gib": torch.cuda.max_memory_allocated(device) / GIB, "final_loss": losses[-1]}


def run_specforge(cfg, seqs, device, args, result: dict, out: Path) -> None:
    side = result["specforge"] = {"attention_backend": SPECFORGE_BACKEND, "runs": []}
    if device.type != "cuda":
        side["skipped"] = "its loss is a Triton kernel (specforge.core.loss.LogSoftmaxLoss): CUDA only"
        progress(f"specforge: skipped, {side['skipped']}")
        return
    try:
        for name in SPECFORGE_MODULES:
            importlib.import_module(name)
        side["version"] = dist_version("specforge")
        with tempfile.TemporaryDirectory() as tmp:
            progress("specforge: building")
            strategy, optimizer = build_specforge(cfg, device, write_target_head_folder(cfg, Path(tmp)),
                                                  total_steps=1000)
    except ImportError as e:
        side["skipped"] = f"not importable: {e} (install the wheel: see the module docstring)"
        progress(f"specforge: skipped, {side['skipped']}")
        return
    except Exception as e:  # a third-party API change must not cost DraftFlow's half of the run
        side["skipped"] = f"could not be built: {e!r}"
        progress(f"specforge: skipped, {side['skipped']}")
        return
    for t in seqs:
        warmup, steps = schedule(t, args)
        progress(f"specforge: seq {t}, {warmup} warm-up + {steps} timed steps")
        run = bench_specforge_seq(strategy, optimizer, cfg, t, device, warmup, steps)
        side["runs"].append(with_mfu(run, cfg, result))
        progress(f"specforge: {json.dumps(run)}")
        write(out, result)
    del strategy, optimizer
    free_memory(device)


def dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---- DraftFlow -----------------------------------------------------------------------

def run_draftflow(shape, seqs, device, args, result: dict, out: Path) -> None:
    side = result["draftflow"] = {"recompute": "auto", "runs": []}
    progress("draftflow: building")
    cfg, draft, teacher, _ = build(shape, device)
    tc = TrainConfig(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, max_grad_norm=1.0, recompute="auto", compile="auto")
    state = TrainState(draft, teacher, tc, TTT_STEPS, 0.8)  # the trainer's step: FSDP2 on CUDA, compiled
    side.update(compile=state.compile, fsdp2=state.sharded)
    for t in seqs:
        warmup, steps = schedule(t, args)
        progress(f"draftflow: seq {t}, {warmup} warm-up + {steps} timed steps")
        run = bench_seq(state, cfg, t, device, 0, warmup, steps)
        if "error" in run:
            state.optimizer.zero_grad(set_to_none=True)
        else:
            run["tokens_per_s"] = run.pop("tokens_per_s_per_gpu")
        side["runs"].append(with_mfu(run, cfg, result))
        progress(f"draftflow: {json.dumps(run)}")
        write(out, result)
    del state, draft, teacher
    free_memory(device)


# ---- both ----------------------------------------------------------------------------

def schedule(t: int, args) -> tuple[int, int]:
    """(warm-up, timed) steps: fewer timed steps past 32k, where one step takes seconds."""
    return args.warmup, args.steps if t <= 32768 else args.long_steps


def with_mfu(run: dict, cfg, result: dict) -> dict:
    if "tokens_per_s" in run and "matmul_tflops" in result:
        run["mfu"] = flops_per_token(cfg, run["seq"]) * run["tokens_per_s"] / (result["matmul_tflops"] * 1e12)
    return run


def write(out: Path, result: dict) -> None:
    result["comparison"] = compare(result)
    out.write_text(json.dumps(result, indent=1))


def compare(result: dict) -> list[dict]:
    """One row per length: both systems' tok/s and peak, DraftFlow/SpecForge."""
    theirs = {r["seq"]: r for r in result.get("specforge", {}).get("runs", [])}
    rows = []
    for r in result.get("draftflow", {}).get("runs", []):
        row = {"seq": r["seq"], "draftflow_tokens_per_s": r.get("tokens_per_s"),
               "draftflow_peak_gib": r.get("peak_gib"), "predicted_peak_gib": r.get("predicted_peak_gib"), "auto_recomputed": recomputed(r),
               "draftflow_error": r.get("error")}
        sf = theirs.get(r["seq"])
        if sf is not None:
            row.update(specforge_tokens_per_s=sf.get("tokens_per_s"), specforge_peak_gib=sf.get("peak_gib"),
                       specforge_error=sf.get("error"))
            if row["draftflow_tokens_per_s"] and row["specforge_tokens_per_s"]:
                row["ratio"] = row["draftflow_tokens_per_s"] / row["specforge_tokens_per_s"]
        rows.append(row)
    return rows


def print_table(result: dict) -> None:
    print(f"\n{result['device']}, torch {result['torch']}, {result['date']}, bf16 matmul "
          f"{result.get('matmul_tflops', float('nan')):.0f} TFLOP/s; SpecForge "
          f"{result['specforge'].get('version') or result['specforge'].get('skipped', '')}")
    print(f"{'seq':>7} {'DF tok/s':>9} {'DF GiB':>7} {'predicted':>9} {'SF tok/s':>9} {'SF GiB':>7} {'DF/SF':>6}"
          "  auto recomputed")

    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-".rjust(int(fmt.split(".")[0]))

    for r in result["comparison"]:
        print(f"{r['seq']:>7} {num(r['draftflow_tokens_per_s'], '9.0f')} {num(r['draftflow_peak_gib'], '7.1f')} "
              f"{num(r['predicted_peak_gib'], '9.1f')} {num(r.get('specforge_tokens_per_s'), '9.0f')} "
              f"{num(r.get('specforge_peak_gib'), '7.1f')} {num(r.get('ratio'), '6.2f')}  {r['auto_recomputed']}"
              + "".join(f"  [{who}: {r[k]}]" for who, k in (("DF", "draftflow_error"), ("SF", "specforge_error"))
                        if r.get(k)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--both-seqs", default="2048,8192,32768", help="lengths both systems train")
    ap.add_argument("--draftflow-seqs", default="65536,131072", help="lengths only DraftFlow trains")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps up to 32k")
    ap.add_argument("--long-steps", type=int, default=2, help="timed steps beyond 32k")
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU: a smoke test (DraftFlow only)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.small and args.both_seqs == ap.get_default("both_seqs"):
        args.both_seqs, args.draftflow_seqs = "32,64", "96"
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    both = [int(s) for s in args.both_seqs.split(",") if s]
    alone = [int(s) for s in args.draftflow_seqs.split(",") if s]
    shape = SMALL if args.small else LLAMA31_8B
    cfg = draft_config(shape)
    out = Path(args.out)
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "shape": shape, "ttt_steps": TTT_STEPS, "warmup": args.warmup, "steps": args.steps,
              "long_steps": args.long_steps}
    if device.type == "cuda":
        progress("measuring the bf16 matmul rate")
        result["matmul_tflops"] = matmul_tflops(device)
    run_specforge(cfg, both, device, args, result, out)
    run_draftflow(shape, both + alone, device, args, result, out)
    write(out, result)
    print_table(result)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    main()
