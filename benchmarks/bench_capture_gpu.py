"""Capture throughput against a plain forward of the same target, on one GPU.

Target: a random Llama-3.1-8B-shaped model (hidden 4096, 32 layers, 32 heads, 8 KV
heads, intermediate 14336, vocab 128256) in bf16, initialised directly on the GPU
(the producer builds its random target on the CPU from `target.seed`, which takes
over a minute for 8B and changes only the values, not the speed). Data: synthetic
conversations (`messages` JSONL) tokenised by `plan_data` with the builtin byte
tokenizer, each cut to exactly `data.max_length` tokens, packed into batches by
`pack_batches` with `capture.batch_tokens` (2048-token samples, 4 per forward).
Every path runs the same batches in the same order:

1. plain: `model.model(input_ids, attention_mask, use_cache=False)`, the base model
   without lm_head. This is the fair baseline: capture never computes the logits
   either, and the right-padded batches and attention mask are the same. No
   device-to-host copy, one synchronisation at the end (the best case a plain
   forward can have).
2. capture: `capture_features` exactly as `roles.produce` calls it (forward hooks on
   the three aux layers and the final norm, concat + cast on the GPU, device-to-host
   copies, per-sample split, the writer thread), with a store that drops the
   features: capture without any store cost.
3. capture + store: the producer's whole path minus loading the target:
   `publishing_run` (signed manifest) + `PublishingStore` over a `shared_dir`
   store in --work, so every sample is checksummed, written, fsync'd, renamed and
   journaled. The raw write+fsync rate of sample-sized files in the same folder is
   measured in the same run, for scale.
4. profile: the same batches once more, split into forward (with hooks), gather +
   cast and the per-sample copies to pinned host memory (as capture does them); for
   comparison, the pageable whole-batch copy + per-sample split capture used before
   and one whole-batch pinned copy (the link's rate).
5. plain again, to see drift (clocks, heat); the faster plain run is the baseline.

Target: capture >= 0.8x the plain forward (tokens/s). On CPU (--small) the ratio
means nothing; the small mode checks only that the script runs end to end.

    PYTHONPATH=$PWD CUDA_VISIBLE_DEVICES=0 python benchmarks/bench_capture_gpu.py --out capture.json
    python benchmarks/bench_capture_gpu.py --small --out smoke.json     # CPU, seconds

Defaults: 96 samples of 2048 tokens (196k tokens, 6 GiB of features written in
path 3); about one minute on an H100 including the model set-up. The helpers
above `main` (target shape, synthetic data, config, raw disk rates) are shared
with bench_disagg_gpu.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench_train_gpu import LLAMA31_8B
from draftflow.bench.store_shared_dir import drop_cache, raw_read, raw_write, sample_bytes
from draftflow.capture.capture import (_FeatureHooks, _to_pinned_samples, capture_features, pack_batches,
                                       pad_batch)
from draftflow.capture.target import LoadedTarget, config_hash, resolve_aux_layer_ids
from draftflow.config import Config, load_config
from draftflow.roles import (build_provenance, capture_fill, feature_dtype, plan_data, produce, publishing_run,
                             target_hf_config)

TARGET_8B = {**{k: LLAMA31_8B[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                            "num_attention_heads", "num_key_value_heads")},
             "num_hidden_layers": 32, "max_position_embeddings": 131072, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
             "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}  # ChatML specials of the byte tokenizer
# Qwen3-30B-A3B's shape (issue 13): 48 layers, 128 experts of which 8 per token, hidden 2048.
TARGET_MOE_30B = {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                  "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                  "norm_topk_prob": True, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
# Llama-3.3-70B's shape (issue 13): 80 layers, hidden 8192, 64 heads, 8 KV heads; 70.6B
# parameters, 131.4 GiB in bf16, which fits one H200 (140.4 GiB) with 9 GiB to spare.
TARGET_70B = {**TARGET_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}
TARGETS = {"llama-8b": TARGET_8B, "qwen3-30b-a3b": TARGET_MOE_30B, "llama-70b": TARGET_70B}
TARGET_SMALL = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
# GPU / --small sizes shared by both benchmarks.
SIZES = {False: {"max_length": 2048, "batch_tokens": 8192, "device": "cuda", "dtype": "bfloat16"},
         True: {"max_length": 64, "batch_tokens": 256, "device": "cpu", "dtype": "float32"}}
TARGET_RATIO = 0.8
_TEXT = string.ascii_letters + string.digits + string.punctuation + " " * 12


# ------------------------------------------------------------ shared with bench_disagg_gpu.py

def write_conversations(path: Path, num: int, num_tokens: int, seed: int = 0) -> Path:
    """`num` JSONL conversations (one user and one assistant turn) that render to more
    than `num_tokens` bytes, so with the byte tokenizer (1 token per ASCII byte) each
    is cut to exactly `num_tokens` tokens, the tail of the assistant turn trained on."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(num):
            user = f"Request {i}: " + "".join(rng.choices(_TEXT, k=min(200, num_tokens // 4)))
            answer = "".join(rng.choices(_TEXT, k=num_tokens))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def bench_config(work: Path, small: bool, num_samples: int, target: dict | None = None,
                 **sections) -> tuple[Path, Config]:
    """Write the benchmark's config file under `work` (data included); return it and
    its parsed form. `target`: the random target's config (default the 8B Llama shape);
    `sections` update the given config sections (e.g. train={...})."""
    size = SIZES[small]
    data = write_conversations(work / "conversations.jsonl", num_samples, size["max_length"])
    tree = {"target": {"tokenizer": "builtin:bytes-chatml", "seed": 0,
                       "random": TARGET_SMALL if small else (target or TARGET_8B)},
            "data": {"sources": [str(data)], "max_length": size["max_length"]},
            "capture": {"batch_tokens": size["batch_tokens"], "device": size["device"], "dtype": size["dtype"]},
            "features": {"backend": "shared_dir", "root": str(work / "features")},
            "draft": {"vocab_size": 32000},
            "train": {"progress": False, "tensorboard": False}}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path, load_config([path])


def disk_rates(folder: Path, file_bytes: int, num_files: int) -> dict:
    """dd-like raw rates in `folder`: write + fsync of `num_files` files of `file_bytes`,
    then read them back cold (pages dropped) and warm (page cache)."""
    d = Path(tempfile.mkdtemp(dir=folder, prefix="raw-io-"))
    try:
        data = memoryview(torch.full((file_bytes,), 7, dtype=torch.uint8).numpy())
        out = memoryview(torch.empty(file_bytes, dtype=torch.uint8).numpy())
        paths = [d / f"r{i:03d}" for i in range(num_files)]
        write_s = sum(raw_write(p, data) for p in paths)
        for p in paths:
            drop_cache(p)
        cold_s = sum(raw_read(p, out) for p in paths)
        warm_s = sum(raw_read(p, out) for p in paths)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    total = file_bytes * num_files
    return {"folder": str(folder), "file_bytes": file_bytes, "num_files": num_files,
            "write_fsync_gbps": total / write_s / 1e9, "read_cold_gbps": total / cold_s / 1e9,
            "read_warm_gbps": total / warm_s / 1e9}


def disk_line(d: dict) -> str:
    return (f"raw disk ({d['num_files']} x {d['file_bytes'] / 2**20:.0f} MiB files): write+fsync "
            f"{d['write_fsync_gbps']:.2f} GB/s, read cold {d['read_cold_gbps']:.2f}, "
            f"warm {d['read_warm_gbps']:.2f} GB/s")


def machine_info() -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}


def run_and_save(out: Path, result: dict, body, print_table) -> dict:
    """`body(result)`, then write `result` to `out` and print it, also when the body
    fails or a time limit's SIGTERM stops it: the parts measured so far are kept."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit runs the clean-ups below
    try:
        body(result)
    except (Exception, SystemExit) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        out.write_text(json.dumps(result, indent=1))
        print_table(result)
    return result


# ------------------------------------------------------------ the capture paths

class _TimedStore:
    """The store as capture sees it, with each put timed (in capture's writer thread).
    With `store=None` every put is dropped: capture without any store cost."""

    def __init__(self, store=None):
        self.store = store
        self.put_s: list[float] = []
        self.created = time.perf_counter()
        self.first_put_done_s: float | None = None  # since creation: time to the first published sample

    def lookup(self, sample_id: str, index: int):
        return None if self.store is None else self.store.lookup(sample_id, index)

    def put(self, sample_id: str, index: int, tensors):
        start = time.perf_counter()
        ref = None if self.store is None else self.store.put(sample_id, index, tensors)
        now = time.perf_counter()
        self.put_s.append(now - start)
        if self.first_put_done_s is None:
            self.first_put_done_s = now - self.created
        return ref


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plain(model, batches, device: torch.device) -> float:
    """Seconds for the base model's forward over every batch (no lm_head, no copies back)."""
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            ids, mask = pad_batch(batch)
            model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - start


def time_capture(target, aux_ids, samples, cfg: Config, store) -> dict:
    """`capture_features` as the producer calls it, into `store` (a _TimedStore)."""
    start = time.perf_counter()
    capture_features(target, aux_ids, samples, store, cfg.capture, feature_dtype=feature_dtype(cfg), progress=False)
    wall = time.perf_counter() - start
    return {"seconds": wall, "put_s_total": sum(store.put_s), "num_puts": len(store.put_s),
            "writer_busy_share": sum(store.put_s) / wall}


def time_capture_store(target, aux_ids, plan, cfg: Config) -> dict:
    """The producer's path minus loading the target: signed manifest, shared_dir store,
    back-pressure check, put, journal; the run is sealed at the end (timed too)."""
    hf_config = target_hf_config(cfg)
    provenance = build_provenance(cfg, hf_config, aux_ids, plan.tokenizer_hash, plan.data_hash)
    num = len(plan.prepared.train)
    start = time.perf_counter()
    with publishing_run(cfg, secrets.token_bytes(32), capture_fill(cfg, provenance), plan.draft_ids,
                        num) as publishing:
        timed = _TimedStore(publishing)
        produce(cfg, plan, timed, target, aux_ids)
    wall = time.perf_counter() - start
    shutil.rmtree(cfg.features.root, ignore_errors=True)
    return {"seconds": wall, "put_s_total": sum(timed.put_s), "put_s_median": statistics.median(timed.put_s),
            "num_puts": len(timed.put_s), "writer_busy_share": sum(timed.put_s) / wall,
            "first_published_s": timed.first_put_done_s}


def _pinned_like(cache: dict, x: torch.Tensor) -> torch.Tensor:
    """A page-locked host buffer of x's shape, allocated once per shape (allocation is slow)."""
    if tuple(x.shape) not in cache:
        cache[tuple(x.shape)] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return cache[tuple(x.shape)]


def profile_capture(model, aux_ids, batches, device: torch.device) -> dict:
    """Capture's per-batch work split into timed parts (a sync after each part): the
    forward with hooks, gather + cast, and the per-sample copies to the host as capture
    makes them (pinned, straight from the GPU; on CPU the split). For comparison, not
    in the total: the pageable whole-batch `.cpu()` + per-sample clone that capture
    used before, and one whole-batch copy into a pinned buffer (the link's rate)."""
    parts = dict.fromkeys(("forward_with_hooks_s", "gather_cast_s", "to_host_samples_s"), 0.0)
    compare = dict.fromkeys(("pageable_and_split_s", "d2h_pinned_s"), 0.0)
    d2h_bytes, pinned = 0, {}
    with _FeatureHooks(model, aux_ids) as hooks, torch.inference_mode():
        for batch in batches:
            ids, mask = pad_batch(batch)
            t0 = time.perf_counter()
            model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            _sync(device)
            t1 = time.perf_counter()
            aux, last = hooks.take()
            aux, last = aux.to(torch.bfloat16), last.to(torch.bfloat16)
            _sync(device)
            t2 = time.perf_counter()
            if device.type == "cuda":
                samples = _to_pinned_samples(batch, aux, last)
            else:
                samples = [(aux[r, :s.num_tokens].clone(), last[r, :s.num_tokens].clone())
                           for r, s in enumerate(batch)]
            t3 = time.perf_counter()
            del samples
            if device.type == "cuda":
                aux_cpu, last_cpu = aux.cpu(), last.cpu()
                split = [(aux_cpu[r, :s.num_tokens].clone(), last_cpu[r, :s.num_tokens].clone())
                         for r, s in enumerate(batch)]
                t4 = time.perf_counter()
                compare["pageable_and_split_s"] += t4 - t3
                del split, aux_cpu, last_cpu
                dsts = [_pinned_like(pinned, x) for x in (aux, last)]
                t5 = time.perf_counter()
                for dst, src in zip(dsts, (aux, last)):
                    dst.copy_(src, non_blocking=True)
                _sync(device)
                compare["d2h_pinned_s"] += time.perf_counter() - t5
            d2h_bytes += (aux.numel() + last.numel()) * 2
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[key] += dt
    total = sum(parts.values())
    cuda = device.type == "cuda"
    out = {**parts, **compare, "total_s": total, "d2h_bytes": d2h_bytes,
           "to_host_samples_gbps": d2h_bytes / parts["to_host_samples_s"] / 1e9 if cuda else None,
           "d2h_pageable_gbps": d2h_bytes / compare["pageable_and_split_s"] / 1e9 if cuda else None,
           "d2h_pinned_gbps": d2h_bytes / compare["d2h_pinned_s"] / 1e9 if cuda else None}
    out["shares"] = {k: v / total for k, v in parts.items()}
    return out


def random_target(cfg: Config, device: torch.device, dtype: torch.dtype) -> LoadedTarget:
    """The configured random target, initialised in place on `device` (fast on a GPU)."""
    from transformers import AutoModelForCausalLM

    hf_config = target_hf_config(cfg)
    torch.manual_seed(cfg.target.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model = model.eval().requires_grad_(False)
    return LoadedTarget(model=model, config=model.config, identity="bench", config_hash=config_hash(model.config))


# ------------------------------------------------------------ the benchmark

def run(small: bool, num_samples: int, work_parent: Path, r: dict, target: str = "llama-8b") -> dict:
    """Fill `r` part by part (a part that fails leaves the earlier ones in place)."""
    size = SIZES[small]
    device, dtype = torch.device(size["device"]), getattr(torch, size["dtype"])
    work = Path(tempfile.mkdtemp(dir=work_parent, prefix="capture-bench-"))
    r["target"] = "small" if small else target
    try:
        _, cfg = bench_config(work, small, num_samples, TARGETS[target])
        plan = plan_data(cfg, cfg.target.random["vocab_size"])
        samples = plan.prepared.train
        start = time.perf_counter()
        target = random_target(cfg, device, dtype)
        r["target_setup_s"] = time.perf_counter() - start
        r["attn_implementation"] = getattr(target.config, "_attn_implementation", None)
        aux_ids = resolve_aux_layer_ids(cfg.target, target.config.num_hidden_layers)
        batches = pack_batches(samples, cfg.capture.batch_tokens)
        hidden = target.config.hidden_size
        r["sizes"] = {"num_samples": len(samples), "tokens": sum(s.num_tokens for s in samples),
                      "max_length": size["max_length"], "batch_tokens": cfg.capture.batch_tokens,
                      "num_batches": len(batches), "hidden": hidden, "aux_layer_ids": aux_ids,
                      "target_dtype": size["dtype"], "feature_dtype": cfg.features.dtype,
                      "sample_bytes": sample_bytes(size["max_length"], hidden)}
        # Warm-up: kernels, cuBLAS handles, allocator, hooks; one batch each way.
        time_plain(target.model, batches[:1], device)
        time_capture(target, aux_ids, batches[0], cfg, _TimedStore())
        r["plain"] = {"what": "model.model(input_ids, attention_mask, use_cache=False): base model, no lm_head",
                      "seconds": time_plain(target.model, batches, device)}
        _rates(r)
        r["capture"] = time_capture(target, aux_ids, samples, cfg, _TimedStore())
        _rates(r)
        r["capture_store"] = time_capture_store(target, aux_ids, plan, cfg)
        _rates(r)
        r["profile"] = profile_capture(target.model, aux_ids, batches, device)
        r["plain"]["seconds_again"] = time_plain(target.model, batches, device)
        r["plain"]["drift"] = r["plain"]["seconds_again"] / r["plain"]["seconds"] - 1
        _rates(r)
        if device.type == "cuda":
            r["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        r["disk"] = disk_rates(work, r["sizes"]["sample_bytes"], min(8, len(samples)))
        r["disk"]["write_fsync_tokens_per_s"] = r["disk"]["write_fsync_gbps"] * 1e9 / r["sizes"]["sample_bytes"] \
            * size["max_length"]
        r["targets"] = {f"capture_vs_plain>={TARGET_RATIO}": r["capture"]["vs_plain"] >= TARGET_RATIO}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return r


def _rates(r: dict) -> None:
    """tokens/s of every timed path so far; the faster plain run is the baseline."""
    tokens, plain = r["sizes"]["tokens"], r["plain"]
    plain["tokens_per_s"] = tokens / min(plain["seconds"], plain.get("seconds_again", plain["seconds"]))
    for key in ("capture", "capture_store"):
        if key in r:
            r[key]["tokens_per_s"] = tokens / r[key]["seconds"]
            r[key]["vs_plain"] = r[key]["tokens_per_s"] / plain["tokens_per_s"]


def print_table(r: dict) -> None:
    if "sizes" in r:
        s = r["sizes"]
        print(f"\ncapture benchmark ({r.get('target')}): {r['machine']['gpus'] or 'cpu'}, torch "
              f"{r['machine']['torch']}, {r['machine']['date']}; {s['num_samples']} samples x {s['max_length']} "
              "tokens, "
              f"{s['num_batches']} batches of <= {s['batch_tokens']} tokens, attention {r['attn_implementation']}")
    if "plain" in r:
        print(f"{'path':<34}{'tokens/s':>11}{'vs plain':>10}{'writer busy':>13}")
        print(f"{'plain forward (no lm_head)':<34}{r['plain']['tokens_per_s']:>11.0f}{1:>10.2f}"
              f"   (drift between the two plain runs {r['plain'].get('drift', float('nan')):+.1%})")
    for key, label in (("capture", "capture, no store"), ("capture_store", "capture + shared_dir store")):
        if key in r:
            c = r[key]
            print(f"{label:<34}{c['tokens_per_s']:>11.0f}{c['vs_plain']:>10.2f}{c['writer_busy_share']:>13.0%}")
    if "capture_store" in r and r["capture_store"].get("first_published_s") is not None:
        print(f"target set-up {r['target_setup_s']:.1f} s; first sample published "
              f"{r['capture_store']['first_published_s']:.2f} s after capture started; peak GPU memory "
              f"{r.get('peak_gib', float('nan')):.1f} GiB")
    if "disk" in r:
        print(disk_line(r["disk"]) + f" (write = {r['disk']['write_fsync_tokens_per_s']:.0f} tokens/s of features)")
    if "profile" in r:
        p = r["profile"]
        print("profile: " + ", ".join(f"{k.removesuffix('_s')} {v:.0%}" for k, v in p["shares"].items())
              + (f"; to host per sample (pinned) {p['to_host_samples_gbps']:.1f} GB/s; for comparison: pageable "
                 f"+ split {p['d2h_pageable_gbps']:.1f} GB/s, one pinned copy {p['d2h_pinned_gbps']:.1f} GB/s"
                 if p["d2h_pageable_gbps"] else ""))
    if "targets" in r:
        print("target:", ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in r["targets"].items()))
    if "error" in r:
        print("error:", r["error"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny target on CPU: a smoke test of this script")
    ap.add_argument("--samples", type=int, default=None, help="samples of max_length tokens (default 96, small 8)")
    ap.add_argument("--work", default=tempfile.gettempdir(), help="folder for the store and raw disk files")
    ap.add_argument("--target", choices=sorted(TARGETS), default="llama-8b", help="random target shape (GPU)")
    ap.add_argument("--out", required=True, help="JSON results file")
    args = ap.parse_args(argv)
    num = args.samples or (8 if args.small else 96)
    return run_and_save(Path(args.out), {"benchmark": "capture_gpu", "machine": machine_info()},
                        lambda r: run(args.small, num, Path(args.work), r, args.target), print_table)


if __name__ == "__main__":
    main()
