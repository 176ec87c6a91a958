"""Tensor-parallel capture against single-device capture: feature differences and the
trained draft's per-step metrics (issue 13, item 3).

Two colocated runs of the same config and samples: one process with the whole target
(`capture.parallel: none`, `--tp` micro-batches per step), and a torchrun job of `--tp` ranks
with `capture.parallel: tp` (transformers' own TP plan; every rank trains one
micro-batch, so a step sees the same samples; checked from both runs' samples logs, as
are the stored samples' token ids). Reported: the max abs and max relative
(to the sample's largest value) difference of the stored aux and last features, their
whole difference against the whole signal (rms rel = ||a - b|| / ||a||), and for
each logged metric (loss, acc_0, ploss_2, ...) the largest relative difference over the
steps and the number of significant figures the two runs share at worst. For scale, a
bf16 run adds a third: one device in float32, against which the bf16 single-device run
shows what bf16 rounding alone does to the same features and metrics.

CPU (gloo; the 2-core development VM): `--device cpu`; GPUs (NCCL; single device on
cuda:0, TP over `--tp` GPUs): `--device cuda`. The target is the tiny example's unless
`--target-json` gives other random-target fields (a bigger model, another family with
`model_type`), or `--config` and `--set` name another target (a real one: SmolLM2's 9
heads and 3 KV heads split over 3 ranks):

    python benchmarks/tp_equivalence.py --dtype bfloat16 --out tp.json            # CPU, seconds
    python benchmarks/tp_equivalence.py --tp 3 --config draftflow/configs/demo.yaml \\
        --out tp-smollm2.json                                                    # CPU, minutes
    python benchmarks/tp_equivalence.py --device cuda --tp 2 --dtype bfloat16 \\\
        --target-json '{"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000}' --out tp.json

Not bit-equal by design: sharded matmuls sum their partial products in another order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench_capture_gpu import machine_info  # noqa: E402
from draftflow.train.metrics import read_metrics  # noqa: E402

TINY = ROOT / "examples" / "tiny.yaml"
METRICS = ("loss", "ploss_2", "acc_0", "acc_6")  # acc_*: compared as absolute differences


def overrides(args, folder: Path, work: Path, dtype: str | None = None) -> list[str]:
    """`draftflow train`'s arguments for one run, whose folders are under `folder`."""
    dtype = dtype or args.dtype
    o = ["train.progress=false", "train.tensorboard=false", f"data.max_samples={args.samples}",
         f"train.max_steps={args.steps}", "train.log_every=1", f"train.batch_size={args.batch}",
         f"capture.device={args.device}", f"train.device={args.device}", f"capture.dtype={dtype}",
         f"features.dtype={dtype}", f"features.root={folder / 'feat'}", f"train.output_dir={folder / 'run'}",
         "train.compile=false", "train.save_every=0", *args.set]
    if not any(x.startswith("target.cache_dir=") for x in args.set):
        o.append(f"target.cache_dir={work / 'cache'}")  # a converted GGUF is shared by all runs
    o += [f"target.random.{key}={json.dumps(value)}" for key, value in args.target.items()]
    return ["train", "-c", args.config, *o]


def run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3 * 3600)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} ... failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def compare_features(a_root: Path, b_root: Path) -> dict:
    from safetensors.torch import load_file

    a_files = sorted((a_root / "samples").glob("*.safetensors"))
    a_names, b_names = {p.name for p in a_files}, {p.name for p in (b_root / "samples").glob("*.safetensors")}
    if not a_files or a_names != b_names:
        sys.exit(f"the two runs stored different samples: only in {a_root}: {sorted(a_names - b_names)[:5]}, "
                 f"only in {b_root}: {sorted(b_names - a_names)[:5]}")
    pairs = [(load_file(str(p)), load_file(str(b_root / "samples" / p.name))) for p in a_files]
    for p, (a, b) in zip(a_files, pairs):
        if not a["input_ids"].equal(b["input_ids"]) or any(a[k].shape != b[k].shape for k in a):
            sys.exit(f"sample {p.stem}: the two runs stored other tokens or shapes ({p}, {b_root / 'samples'})")
    out = {}
    for name in ("aux_hidden", "last_hidden"):
        worst_abs = worst_rel = diff_sq = ref_sq = 0.0
        for a_sample, b_sample in pairs:
            a, b = a_sample[name].double(), b_sample[name].double()
            diff = (a - b).abs()
            worst_abs = max(worst_abs, float(diff.max()))
            worst_rel = max(worst_rel, float(diff.max() / a.abs().max()))
            diff_sq, ref_sq = diff_sq + float((diff ** 2).sum()), ref_sq + float((a ** 2).sum())
        # rms_rel: the whole difference against the whole signal, ||a - b|| / ||a||
        out[name] = {"max_abs": worst_abs, "max_rel": worst_rel, "rms_rel": math.sqrt(diff_sq / ref_sq)}
    out["num_samples"] = len(a_files)
    return out


def steps_samples(run_dir: Path) -> dict[int, set[str]]:
    """step -> the samples every rank of the run trained at that step (samples.rank*.jsonl)."""
    out: dict[int, set[str]] = {}
    for log in sorted(run_dir.glob("samples.rank*.jsonl")):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], set()).update(row["samples"])
    return out


def compare_metrics(a_run: Path, b_run: Path) -> dict:
    a, b = read_metrics(a_run / "metrics.jsonl"), read_metrics(b_run / "metrics.jsonl")
    if [m["step"] for m in a] != [m["step"] for m in b]:
        sys.exit(f"the runs logged different steps: {a_run / 'metrics.jsonl'} and {b_run / 'metrics.jsonl'}")
    if (trained := steps_samples(a_run)) != (other := steps_samples(b_run)):
        step = next(s for s in sorted(set(trained) | set(other)) if trained.get(s) != other.get(s))
        sys.exit(f"the runs trained other samples at step {step}: {sorted(trained.get(step, []))} in {a_run}, "
                 f"{sorted(other.get(step, []))} in {b_run}")
    out = {}
    for key in METRICS:
        if key not in a[0]:
            continue
        row = {"first": [a[0][key], b[0][key]], "last": [a[-1][key], b[-1][key]]}
        if key.startswith("acc"):  # fractions near 0 early on: relative differences mean nothing
            row["max_abs"] = max(abs(x[key] - y[key]) for x, y in zip(a, b))
        else:
            rel, x, y = max(((abs(x[key] - y[key]) / max(abs(x[key]), 1e-12), x, y) for x, y in zip(a, b)),
                            key=lambda t: t[0])
            # shared significant figures at the worst step: -log10 of the relative difference
            row.update(max_rel=rel, sig_figs=math.inf if rel == 0 else -math.log10(rel),
                       worst_step=x["step"], worst=[x[key], y[key]])
        out[key] = row
    out["steps"] = len(a)
    return out


def print_comparison(f: dict, m: dict) -> None:
    for name in ("aux_hidden", "last_hidden"):
        print(f"  {name:<12} max abs {f[name]['max_abs']:.3g}  max rel {f[name]['max_rel']:.3g}  "
              f"rms rel {f[name]['rms_rel']:.3g}")
    for key in METRICS:
        if key in m:
            r = m[key]
            worst = (f"max abs diff over steps {r['max_abs']:.2g}" if "max_abs" in r else
                     f"max rel diff over steps {r['max_rel']:.2g} (>= {r['sig_figs']:.1f} significant figures; "
                     f"step {r['worst_step']}: {r['worst'][0]:.6g} / {r['worst'][1]:.6g})")
            print(f"  {key:<12} {worst}; step 1 {r['first'][0]:.6g} / {r['first'][1]:.6g}, last "
                  f"{r['last'][0]:.6g} / {r['last'][1]:.6g}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tp", type=int, default=2, help="ranks of the TP group (GPUs with --device cuda)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="target and stored features (capture.dtype, features.dtype)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2, help="samples per rank per step")
    ap.add_argument("--config", default=str(TINY), help="config file (default examples/tiny.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--target-json", default=None, help="random-target fields over the config's")
    ap.add_argument("--work", default=None, help="folder for both runs (default: a temporary one)")
    ap.add_argument("--out", required=True, help="JSON results file")
    args = ap.parse_args(argv)
    args.target = json.loads(args.target_json or "{}")
    if args.device == "cuda":
        import torch
        if torch.cuda.device_count() < args.tp:
            sys.exit(f"--tp {args.tp}: this host has {torch.cuda.device_count()} GPU(s)")
    work = Path(args.work or tempfile.mkdtemp(prefix="tp-equivalence-"))
    try:
        return measure(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def compare(a: Path, b: Path) -> dict:
    """Features and metrics of run folder `b` against run folder `a`."""
    return {"features": compare_features(a / "feat", b / "feat"), "metrics": compare_metrics(a / "run", b / "run")}


def measure(args, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    one_device = {**env, "CUDA_VISIBLE_DEVICES": "0"} if args.device == "cuda" else env

    def single(folder: Path, dtype: str | None = None) -> None:  # whole target, --tp micro-batches a step
        run([sys.executable, "-m", "draftflow", *overrides(args, folder, work, dtype),
             f"train.grad_accum={args.tp}", "capture.parallel=none"], one_device)

    single(work / "single")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.tp}",
         "-m", "draftflow", *overrides(args, work / "tp", work), "capture.parallel=tp",
         f"capture.tp_size={args.tp}"], env)
    scale = None
    if args.dtype != "float32":  # for scale: what the bf16 rounding alone does, one device
        single(work / "single_f32", "float32")
        scale = compare(work / "single_f32", work / "single")
    result = {"benchmark": "tp_equivalence", "device": args.device, "tp": args.tp, "dtype": args.dtype,
              "config": args.config, "set": args.set, "target_json": args.target, **machine_info(),
              **compare(work / "single", work / "tp"), "single_float32_vs_single": scale}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"TP {args.tp} vs single device ({args.device}, {args.dtype}, torch {result['torch']}, "
          f"transformers {result['transformers']}), {result['features']['num_samples']} samples, "
          f"{result['metrics']['steps']} steps")
    print_comparison(result["features"], result["metrics"])
    if scale:
        print(f"for scale, single device in float32 vs single device in {args.dtype} (the rounding alone):")
        print_comparison(scale["features"], scale["metrics"])
    return result


if __name__ == "__main__":
    main()
