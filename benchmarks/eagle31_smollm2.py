"""EAGLE-3.1 switches on SmolLM2: tau with and without them, on the same data and steps.

Two colocated runs of examples/smollm2-sharegpt.yaml share one feature store (the second
reuses the features the first captured), differ only in `draft.norm_before_fc` and
`draft.norm_output`, and are evaluated together on the same held-out prompts against
the same plain greedy decode (float32, lossless checked).

    python benchmarks/eagle31_smollm2.py --device cuda --max-samples 5000 --max-steps 400 \\
        --num-prompts 60 --max-new-tokens 128 data.sources=[sharegpt.jsonl]

Writes `<out>/eagle31_smollm2.json` (settings, machine, wall times, both training curves,
all evaluations) and prints a table. Made for a GPU; a CPU smoke run:

    python benchmarks/eagle31_smollm2.py --device cpu --max-samples 16 --max-steps 3 \\
        --num-prompts 2 --max-new-tokens 16 data.max_length=256 train.batch_size=1 train.grad_accum=1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_smollm2 import build_config, machine, publish  # noqa: E402

from draftflow.config import replace  # noqa: E402
from draftflow.evaluate import evaluate_drafts  # noqa: E402
from draftflow.roles import run_colocated  # noqa: E402
from draftflow.train.metrics import read_metrics  # noqa: E402

VARIANTS = {"eagle3": (False, False), "eagle3.1": (True, True)}  # (norm_before_fc, norm_output)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./bench-eagle31", help="folder for features, runs, drafts and JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-samples", type=int, help="training conversations (default: the recipe's)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--num-heldout", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="further config overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = build_config(args)
    drafts, wall, curves, runs = {}, {}, {}, {}
    for name, (norm_before_fc, norm_output) in VARIANTS.items():
        cfg = replace(base, draft=replace(base.draft, norm_before_fc=norm_before_fc, norm_output=norm_output),
                      train=replace(base.train, output_dir=str(Path(args.out) / name)))
        start = time.perf_counter()
        runs[name] = run_colocated(cfg)  # the second run finds every sample already captured
        wall[f"train_{name}"] = time.perf_counter() - start
        drafts[name] = runs[name].final_dir
        curves[name] = read_metrics(runs[name].output_dir / "metrics.jsonl")
    eval_cfg = replace(base, capture=replace(base.capture, dtype="float32"))
    start = time.perf_counter()
    results = evaluate_drafts(eval_cfg, drafts, args.depth, args.max_new_tokens,
                              args.num_prompts)
    wall["evaluate"] = time.perf_counter() - start
    report = {"benchmark": "eagle31_smollm2", "settings": {"args": vars(args), "config": base.to_dict(),
                                                          "variants": VARIANTS},
              "machine": machine(), "wall_s": wall, "results": results, "training_curves": curves,
              "train": {name: {"num_samples": r.num_samples, "num_tokens": r.num_tokens} for name, r in runs.items()}}
    return publish(report, Path(args.out) / "eagle31_smollm2.json", f"wall: {wall}")


if __name__ == "__main__":
    sys.exit(main())
