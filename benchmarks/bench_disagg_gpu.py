"""Disaggregated producer and consumer on one host, against the colocated step on the same features.

Two real processes started together, as an operator runs them (docs/disaggregated.md):
`draftflow train --role consumer` on GPU 1 and `draftflow train --role producer` on
GPU 0, sharing only a folder (`features.backend: shared_dir`) and the run secret
(DRAFTFLOW_SECRET). Target: a random Llama-3.1-8B-shaped model (`target.random`:
hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256;
`capture.dtype` bf16); data: synthetic `messages` conversations, each cut to exactly
`data.max_length` = 2048 tokens by the builtin byte tokenizer; the consumer trains
the 8B-shaped draft at batch 1 with the default recipe (TTT 7, draft vocab 32000),
eager unless `--compile`: compiling took the consumer's first step to 62 s on 2x H200,
longer than the producer's whole 42 s capture of 640 samples, so no step overlapped
capture (more samples do not fit a 128 GB disk at 64 MiB each).

Then the reference, on GPU 1 alone once both have exited: the colocated run's
training half (`roles.train_from_refs` over a `local` store and a `ListRefSource`, as
`run_colocated` calls it after capture) on the features already in the folder, the
same number of steps, a fresh output_dir. It never waits for data. Its process
starts with the pair and builds the random target's head on the CPU meanwhile
(`load_target_weights` builds the whole 8B model: over a minute), then waits for the
pair to exit before it touches the GPU. Reported from each trainer's
metrics.jsonl (step time = the step's tokens / `tokens_per_s`, `data_wait_share`;
`log_every` 1): median step time after `--warmup` steps, their ratio (target: the
consumer within 3% of the reference) and the consumer's data wait as a share of
its training time (target < 2%; over all steps, and after warm-up). Also: producer
tokens/s (refs journaled per second, polled every 0.1 s, times tokens per sample),
how many consumer steps ran while the producer was still publishing, and dd-like
raw write+fsync / read rates of sample-sized files in the same folder.

Two modes (`--mode`):
- stream (default): `features.release: consume_once`. The consumer trains samples
  in arrival order, so it overlaps the capture from its first step. The producer
  is given far more conversations than the consumer trains and is stopped
  (SIGTERM, nothing partial is visible) once the consumer's last step is logged and
  enough untrained samples exist for the reference, which then trains the same
  number of steps on those (same target, shapes and token counts; other samples:
  the consumer deleted what it trained). Back-pressure is set out of the way
  (`features.max_inflight_bytes` above the whole feature set).
- retain: `features.release: retain`, as many samples as steps (one epoch); the
  reference trains exactly the same samples in the same order. But a retain-mode
  consumer trains in the seeded random order of all samples, so its first steps
  wait for samples near the end of the capture: started together, it either finds
  the capture done (no overlap to measure) or waits for most of it.

Draft vocab: the byte tokenizer has 259 tokens, so the data cannot fill a 32000
draft vocab. `build_draft_vocab` fills the rest with the smallest unused target ids:
the draft head has the issue's 32000 rows (same FLOPs and memory), but only the
ids counted under `data` occur in the data (reported, not hidden).

    PYTHONPATH=$PWD python benchmarks/bench_disagg_gpu.py --out disagg.json        # GPUs 0 and 1
    python benchmarks/bench_disagg_gpu.py --small --out smoke.json                 # CPU, seconds

Budget on 4x H100 (stream, 80 steps): about 3.5 minutes, most of it the three CPU
builds of the random 8B target (producer, consumer, reference; in parallel, one
core each: ~2 minutes on a core like the 2-core dev VM's, 71 M parameters/s),
then ~20-40 s of capture and training and ~15 s of checkpoint and export per run.
Disk: up to `--samples` x 64 MiB (640 -> 40 GiB; fewer if --work has less room) of
features plus two ~7 GB checkpoints, all under --work and removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_capture_gpu import (SIZES, TARGET_8B, TARGET_SMALL, bench_config, disk_line, disk_rates, machine_info,
                               run_and_save, sample_bytes)
from draftflow.config import COMPILE_CHOICES, compile_option, load_config
from draftflow.control.manifest import JOURNAL_FILE
from draftflow.roles import control_dir, plan_data
from draftflow.train.metrics import read_metrics

TARGETS = {"step_ratio": 1.03, "data_wait_share": 0.02}
DEFAULTS = {False: {"steps": 80, "warmup": 5, "stream_samples": 640, "timeout_s": 330},
            True: {"steps": 6, "warmup": 2, "stream_samples": 400, "timeout_s": 120}}
POLL_S = 0.1


# ------------------------------------------------------------ the reference (its own process)

def reference_main(cfg_path: str, overrides: list[str]) -> None:
    """Load the target's embedding and lm_head, wait for "go" on stdin, then train like a colocated run
    on the features in the store (GPU: CUDA_VISIBLE_DEVICES set by the benchmark)."""
    import draftflow.roles as roles
    from draftflow.control.binding import open_store_record
    from draftflow.control.manifest import ManifestReader
    from draftflow.control.signing import load_secret
    from draftflow.stores import build_store
    from draftflow.train.batches import ListRefSource
    from draftflow.train.trainer import load_target_weights

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config([cfg_path], overrides)
    target = load_target_weights(cfg.target)  # built while the pair runs
    print("reference: target weights ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("reference: stdin closed before 'go'; not training")
    secret = load_secret(cfg.features, os.environ)
    reader = ManifestReader(control_dir(cfg), secret)
    keys, _ = open_store_record(cfg.features.root, secret, None)
    store = build_store(dataclasses.replace(cfg.features, backend="local"), keys)
    # Stream mode: the consumer deleted what it trained; the rest is complete and unread.
    left = [r for r in sorted(reader.refs_so_far(), key=lambda r: r.index) if store.path_of(r.sample_id).exists()]
    refs = [keys.sign_ref(dataclasses.replace(r, index=i)) for i, r in enumerate(left)]  # renumbered: signed again
    print(f"reference: training on {len(refs)} stored samples", flush=True)
    h = reader.header
    roles.train_from_refs(cfg, target, list(h.provenance.aux_layer_ids), list(h.draft_vocab), store,
                          ListRefSource(refs), h.provenance, None)


# ------------------------------------------------------------ processes and polling

def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _tail(path: Path, num_lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except FileNotFoundError:
        return ""


def _launch(argv: list[str], log: Path, env: dict, gpu: str | None, stdin=None) -> subprocess.Popen:
    env = {**env, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=stdin)


def _role_argv(role: str, cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "draftflow", "train", "-c", str(cfg_path), "--role", role]


def run_pair(cfg, cfg_path: Path, work: Path, env: dict, gpus, mode: str, steps: int, timeout_s: float) -> dict:
    """Start consumer and producer together; poll the journal and metrics until both exit.
    In stream mode the producer is stopped once the consumer's last step is logged and
    `2 * steps + 2` samples are published (the reference's share untouched)."""
    journal = control_dir(cfg) / JOURNAL_FILE
    metrics = Path(cfg.train.output_dir) / "metrics.jsonl"
    t0 = time.monotonic()
    procs = {"consumer": _launch(_role_argv("consumer", cfg_path), work / "consumer.log", env, gpus[1]),
             "producer": _launch(_role_argv("producer", cfg_path), work / "producer.log", env, gpus[0])}
    points, ends, stopped_at, reference_ready_s = [], {}, None, None
    try:
        while len(ends) < 2:
            t = time.monotonic() - t0
            state = (_count_lines(journal), _count_lines(metrics))
            if not points or points[-1][1:] != state:
                points.append((round(t, 2), *state))
            for name, p in procs.items():
                if name not in ends and p.poll() is not None:
                    ends[name] = (round(t, 2), p.returncode)
            consumer_failed = ends.get("consumer", (0, 0))[1] != 0
            enough = mode == "stream" and state[1] >= steps and state[0] >= 2 * steps + 2
            if "producer" not in ends and stopped_at is None and (enough or consumer_failed):
                procs["producer"].terminate()
                stopped_at = round(t, 2)
            if reference_ready_s is None and b"weights ready" in (work / "reference.log").read_bytes():
                reference_ready_s = round(t, 2)
            if t > timeout_s:
                raise TimeoutError(f"producer/consumer still running after {timeout_s:.0f} s")
            time.sleep(POLL_S)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, (t, rc) in ends.items():
        if rc != 0 and not (name == "producer" and stopped_at is not None and rc == -signal.SIGTERM):
            raise RuntimeError(f"{name} exited with {rc} after {t:.0f} s; log tail:\n{_tail(work / f'{name}.log')}")
    return {"points": points, "ends": ends, "producer_stopped_at_s": stopped_at,
            "reference_head_ready_s": reference_ready_s}


def pair_timeline(pair: dict, steps: int, tokens_per_sample: float) -> dict:
    """Producer rate and overlap from the polled (t, refs journaled, steps logged) points."""
    points = pair["points"]
    publish = [(t, n) for i, (t, n, _) in enumerate(points) if n > 0 and (i == 0 or n != points[i - 1][1])]
    step_at = {}
    for t, _, k in points:
        for s in range(len(step_at) + 1, k + 1):
            step_at[s] = t
    (t_first, n_first), (t_last, n_last) = publish[0], publish[-1]
    first_step, last_step = step_at.get(1), step_at.get(min(steps, len(step_at)))
    out = {"producer_first_publish_s": t_first, "producer_last_publish_s": t_last, "samples_published": n_last,
           # None when every ref appeared within one poll: too fast to time this way
           "producer_tokens_per_s": (n_last - n_first) * tokens_per_sample / (t_last - t_first)
           if t_last > t_first else None,
           "consumer_first_step_s": first_step, "consumer_last_step_s": last_step,
           "consumer_steps_while_producer_published": sum(1 for t in step_at.values() if t <= t_last),
           "producer_end": pair["ends"].get("producer"), "consumer_end": pair["ends"].get("consumer"),
           "producer_stopped_at_s": pair["producer_stopped_at_s"],
           "reference_head_ready_s": pair["reference_head_ready_s"]}
    if first_step is not None and last_step > first_step:
        published_at = lambda when: max((n for t, n in publish if t <= when), default=0)
        out["producer_tokens_per_s_while_consumer_trained"] = \
            (published_at(last_step) - published_at(first_step)) * tokens_per_sample / (last_step - first_step)
    stride = max(1, len(points) // 60)
    out["points_t_refs_steps"] = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return out


# ------------------------------------------------------------ reading the results

def summarize_run(run_dir: Path, tokens_of: dict[str, int], warmup: int) -> dict:
    """Step times and data wait from a trainer's metrics.jsonl and samples.rank0.jsonl."""
    trained = {}
    for line in (run_dir / "samples.rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        trained[rec["step"]] = rec["samples"]
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in m]
    tokens = [sum(tokens_of[s] for s in trained[m["step"]]) for m in steps]
    step_s = [n / m["tokens_per_s"] for n, m in zip(tokens, steps)]
    wait_s = [m["data_wait_share"] * s for m, s in zip(steps, step_s)]
    steady = slice(warmup, None)
    if len(steps) <= warmup:
        raise ValueError(f"{run_dir}: {len(steps)} logged steps, need more than the {warmup} warm-up steps")
    median = statistics.median(step_s[steady])
    return {"num_steps": len(steps), "warmup_steps": warmup, "median_step_s": median,
            "mean_step_s": statistics.mean(step_s[steady]), "max_step_s": max(step_s[steady]),
            "tokens_per_s_median": statistics.median(m["tokens_per_s"] for m in steps[steady]),
            "data_wait_share_all": sum(wait_s) / sum(step_s),
            "data_wait_share_steady": sum(wait_s[steady]) / sum(step_s[steady]),
            # all but the first step: the pipeline's fill (a consumer started with its
            # producer waits for the first sample once, however long the run)
            "data_wait_share_after_first": sum(wait_s[1:]) / max(sum(step_s[1:]), 1e-9),
            "first_step_s": step_s[0], "first_step_wait_s": wait_s[0], "max_wait_s_steady": max(wait_s[steady]),
            "final_loss": steps[-1]["loss"]}


def data_report(plan) -> dict:
    """Token counts and how much of the draft vocab the data can fill."""
    train = plan.prepared.train
    ids = torch.cat([torch.as_tensor(s.input_ids) for s in train])
    mask = torch.cat([torch.as_tensor(s.loss_mask) for s in train]).bool()
    seen = set(torch.unique(ids).tolist())
    lengths = [s.num_tokens for s in train]
    return {"num_samples": len(train), "tokens_per_sample_min": min(lengths), "tokens_per_sample_max": max(lengths),
            "loss_token_share": float(mask.float().mean()), "distinct_tokens": len(seen),
            "distinct_assistant_tokens": len(set(torch.unique(ids[mask]).tolist())),
            "draft_vocab_size": len(plan.draft_ids), "draft_vocab_ids_in_data": len(seen & set(plan.draft_ids)),
            "note": "byte tokenizer: 259 ids; build_draft_vocab fills the draft vocab beyond the ids in the data "
                    "with the smallest unused target ids (same head size and FLOPs, rows the data never uses)"}


# ------------------------------------------------------------ the benchmark

def _fit_to_disk(work: Path, num: int, least: int, per_sample: int, small: bool) -> int:
    """`num` samples, or fewer (not under `least`) if their features and the two runs'
    checkpoints and exports (~20 GB for the 8B shape) would not fit in `work`."""
    spare = 0 if small else 20 << 30
    fit = int((shutil.disk_usage(work).free - spare) / (per_sample * 1.1))
    if fit < least:
        raise ValueError(f"--work {work}: {shutil.disk_usage(work).free / 2**30:.0f} GiB free, the run needs "
                         f"about {(least * per_sample * 1.1 + spare) / 2**30:.0f} GiB ({least} samples of "
                         f"{per_sample / 2**20:.0f} MiB + checkpoints)")
    return min(num, fit)


def run(args, result: dict) -> dict:
    small, d = args.small, DEFAULTS[args.small]
    steps, warmup = args.steps or d["steps"], d["warmup"] if args.warmup is None else args.warmup
    num = args.samples or (d["stream_samples"] if args.mode == "stream" else steps)
    least = 2 * steps + 8 if args.mode == "stream" else steps  # stream: the consumer's and the reference's share
    if num < least:
        raise ValueError(f"--samples {num}: {args.mode} mode with {steps} steps needs at least {least}")
    timeout_s = args.timeout_s or d["timeout_s"]
    gpus = [None, None] if small else args.gpus.split(",")
    size = SIZES[small]
    per_sample = sample_bytes(size["max_length"], (TARGET_SMALL if small else TARGET_8B)["hidden_size"])
    work = Path(tempfile.mkdtemp(dir=args.work, prefix="disagg-bench-"))
    result["work"] = str(work)
    reference = None
    try:
        num = _fit_to_disk(work, num, least, per_sample, small)
        cfg_path, cfg = bench_config(
            work, small, num,
            # back-pressure out of the way: the limit is above any feature set this run writes
            features={"release": "consume_once" if args.mode == "stream" else "retain", "wait_timeout_s": timeout_s,
                      "max_inflight_bytes": 1 << 40},
            train={"max_steps": steps, "batch_size": 1, "log_every": 1, "save_every": 0,
                   "output_dir": str(work / "consumer-run"), "device": size["device"],
                   "compile": compile_option(args.compile)})
        plan = plan_data(cfg, cfg.target.random["vocab_size"])
        tokens_of = {s.sample_id: s.num_tokens for s in plan.prepared.train}
        result.update(steps=steps, warmup=warmup, samples=num, compile=args.compile, data=data_report(plan),
                      disk=disk_rates(work, per_sample, 8 if not small else 3))
        env = {**os.environ, "DRAFTFLOW_SECRET": secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
        if small and "OMP_NUM_THREADS" not in env:  # CPU: producer and consumer split the cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
        reference = _launch([sys.executable, __file__, "--reference-config", str(cfg_path),
                             f"train.output_dir={work / 'reference-run'}"],
                            work / "reference.log", env, gpus[1], stdin=subprocess.PIPE)
        pair = run_pair(cfg, cfg_path, work, env, gpus, args.mode, steps, timeout_s)
        result["pair"] = pair_timeline(pair, steps, statistics.mean(tokens_of.values()))
        result["consumer"] = summarize_run(work / "consumer-run", tokens_of, warmup)
        start = time.monotonic()
        reference.communicate(b"go\n", timeout=timeout_s)
        if reference.returncode != 0:
            raise RuntimeError(f"reference exited with {reference.returncode}; log tail:\n"
                               f"{_tail(work / 'reference.log')}")
        result["reference"] = {**summarize_run(work / "reference-run", tokens_of, warmup),
                               "wall_after_go_s": time.monotonic() - start}
        result["comparison"] = compare(result["consumer"], result["reference"])
    finally:
        if reference is not None and reference.poll() is None:
            reference.kill()
            reference.wait()
        result["log_tails"] = {name: _tail(work / f"{name}.log", 6) for name in ("producer", "consumer", "reference")}
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def compare(consumer: dict, reference: dict) -> dict:
    ratio = consumer["median_step_s"] / reference["median_step_s"]
    wait, after_first = consumer["data_wait_share_all"], consumer["data_wait_share_after_first"]
    limit = TARGETS["data_wait_share"]
    return {"step_ratio": ratio, "data_wait_share": wait, "data_wait_share_after_first": after_first,
            "targets": {f"consumer step <= {TARGETS['step_ratio']:.2f}x reference": ratio <= TARGETS["step_ratio"],
                        f"data wait (all steps) < {limit:.0%}": wait < limit,
                        f"data wait (after the first step's {consumer['first_step_wait_s']:.2f} s) < {limit:.0%}":
                            after_first < limit}}


def print_table(r: dict) -> None:
    print(f"\ndisaggregated benchmark ({r['mode']}): {r['machine']['gpus'] or 'cpu'}, {r['machine']['date']}")
    if "data" in r:
        d = r["data"]
        print(f"data: {d['num_samples']} samples x {d['tokens_per_sample_max']} tokens; draft vocab "
              f"{d['draft_vocab_size']}, of which {d['draft_vocab_ids_in_data']} ids occur in the data")
    if "disk" in r:
        print(disk_line(r["disk"]))
    if "pair" in r:
        p = r["pair"]
        rate = p["producer_tokens_per_s"]
        print(f"producer: {p['samples_published']} samples published, {rate or float('nan'):.0f} tokens/s "
              f"(first at {p['producer_first_publish_s']:.0f} s, last at {p['producer_last_publish_s']:.0f} s); "
              f"consumer steps {p['consumer_first_step_s']}..{p['consumer_last_step_s']} s, "
              f"{p['consumer_steps_while_producer_published']} while the producer published")
    rows = [(k, r[k]) for k in ("consumer", "reference") if k in r]
    if rows:
        print(f"{'run':<11}{'median step s':>14}{'tokens/s':>10}{'wait all':>10}{'wait steady':>12}"
              f"{'first step s':>13}")
        for name, s in rows:
            print(f"{name:<11}{s['median_step_s']:>14.4f}{s['tokens_per_s_median']:>10.0f}"
                  f"{s['data_wait_share_all']:>10.2%}{s['data_wait_share_steady']:>12.2%}{s['first_step_s']:>13.3f}")
    if "comparison" in r:
        c = r["comparison"]
        print(f"consumer / reference median step: {c['step_ratio']:.3f}; "
              + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in c["targets"].items()))
    if "error" in r:
        print("error:", r["error"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny target on CPU: a smoke test of this script")
    ap.add_argument("--mode", choices=("stream", "retain"), default="stream")
    ap.add_argument("--steps", type=int, default=None, help="training steps of consumer and reference (80; small 6)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (5; small 2)")
    ap.add_argument("--samples", type=int, default=None,
                    help="conversations the producer may capture (stream 640, small 400; retain: --steps)")
    ap.add_argument("--gpus", default="0,1", help="producer GPU, consumer (and reference) GPU")
    ap.add_argument("--compile", default="false", choices=COMPILE_CHOICES,
                    help="train.compile of consumer and reference (default false: a compiling consumer's "
                         "first step outlasts the whole capture of a data set this size, so nothing overlaps)")
    ap.add_argument("--timeout-s", type=float, default=None, help="limit for the pair, and for the reference")
    ap.add_argument("--work", default=tempfile.gettempdir(), help="folder for the shared store and the runs")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (features, runs, logs)")
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--reference-config", help=argparse.SUPPRESS)  # internal: the reference process
    args, overrides = ap.parse_known_args(argv)
    if args.reference_config:
        reference_main(args.reference_config, overrides)
        return {}
    if overrides or not args.out:
        ap.error(f"--out is required; unknown arguments {overrides}")
    return run_and_save(Path(args.out), {"benchmark": "disagg_gpu", "mode": args.mode, "machine": machine_info()},
                        lambda r: run(args, r), print_table)


if __name__ == "__main__":
    main()
