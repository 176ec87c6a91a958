"""FP8 against bf16 features: bytes per token and store throughput, beside raw I/O.

For each hidden size and each stored dtype, in one run on the file system of
`root`, with samples of T tokens (int64 ids, uint8 mask, aux [T, 3H], last [T, H]):

- bytes per token of a sample as stored (FP8 includes its float32 scales);
- encode: `features_codec.encode_features` of a bf16 sample (what the producer's
  writer thread adds for FP8; nothing for bf16);
- write: `SharedDirStore.put` against a raw write + fsync of a file of the same size;
- read: `SharedDirStore.get`, cold and warm, against a raw read of the same files;
- decode: `decode_features` to bfloat16 (what the loader does for a GPU trainer; a
  CPU trainer decodes to float32).

Rates are GB/s of stored bytes and thousands of tokens per second: at the same file
system rate FP8 moves twice the tokens, unless the CPU's encode or decode is slower.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from draftflow.bench.store_shared_dir import (compare_to_raw, machine_info, make_sample, measure_reads,
                                              measure_writes, raw_write)
from draftflow.config import FeaturesConfig
from draftflow.control.binding import RunKeys
from draftflow.features_codec import decode_features, encode_features
from draftflow.stores.shared_dir import SharedDirStore

DTYPES = ("bfloat16", "float8_e4m3fn")


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _one(work: Path, dtype_name: str, seq_len: int, hidden: int, num_samples: int) -> dict:
    dtype = getattr(torch, dtype_name)
    bf16 = make_sample(seq_len, hidden)
    sample = encode_features(bf16, dtype)
    encode_s = _median_s(lambda: encode_features(bf16, dtype), 3) if dtype_name != "bfloat16" else 0.0
    store = SharedDirStore(FeaturesConfig(backend="shared_dir", root=str(work / "store")),
                           RunKeys(os.urandom(32), "bench"))  # a throwaway store
    raw_dir = work / "raw"
    raw_dir.mkdir()
    warm = store.put("warmup", 0, sample)  # pays first-use costs untimed; gives the file size
    file_bytes = store.path_of("warmup").stat().st_size
    store.delete(warm)
    raw_buf = memoryview(torch.randint(0, 256, (file_bytes,), dtype=torch.uint8).numpy())
    raw_write(raw_dir / "warmup", raw_buf)
    out = memoryview(torch.zeros(file_bytes, dtype=torch.uint8).numpy())
    refs, put_s, raw_w_s = measure_writes(store, raw_dir, sample, raw_buf, num_samples)
    raw_paths = [raw_dir / f"r{i:05d}" for i in range(num_samples)]
    total = file_bytes * num_samples
    write = compare_to_raw(put_s, raw_w_s, total, total, 0.0)
    read_cold = compare_to_raw(*measure_reads(store, refs, raw_paths, out), total, total, 0.0)
    measure_reads(store, refs, raw_paths, out)  # untimed: every file in the page cache
    read_warm = compare_to_raw(*measure_reads(store, refs, raw_paths, out), total, total, 0.0)
    lease = store.get(refs[0])
    decode_s = _median_s(lambda: decode_features(lease.tensors, torch.bfloat16), 3) if encode_s else 0.0
    store.release(lease)
    for ref in refs:
        store.delete(ref)
    store.close()
    shutil.rmtree(raw_dir)
    ktok = seq_len / 1e3
    for side in (write, read_cold, read_warm):  # tokens per second at the measured median
        side["store_ktok_s"] = ktok / side["store_s_median"]
        side.pop("target"), side.pop("met")
    return {"dtype": dtype_name, "hidden": hidden, "seq_len": seq_len, "num_samples": num_samples,
            "bytes_per_token": refs[0].num_bytes / seq_len, "file_bytes": file_bytes,
            "encode_ktok_s": ktok / encode_s if encode_s else None,
            "decode_ktok_s": ktok / decode_s if decode_s else None,
            "write": write, "read_cold": read_cold, "read_warm": read_warm}


def run_fp8_benchmark(root, hiddens=(4096, 576), seq_len: int = 2048, num_samples: int = 6, json_out=None) -> dict:
    """bf16 and FP8 side by side for each hidden size; JSON-ready (written to `json_out`)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root: {root} is not an existing directory (the file system to benchmark)")
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len: {num_samples} and {seq_len}, expected positive integers")
    rows = []
    for hidden in hiddens:
        for dtype_name in DTYPES:
            work = Path(tempfile.mkdtemp(prefix="draftflow-fp8-", dir=root))
            try:
                rows.append(_one(work, dtype_name, seq_len, hidden, num_samples))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "fp8_features", "rows": rows, "machine": machine_info(root),
              "torch_threads": torch.get_num_threads()}
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def print_table(result: dict) -> None:
    m, fs = result["machine"], result["machine"]["file_system"]
    print(f"FP8 vs bf16 features, shared_dir store; {m['cpus']} CPUs ({m['cpu_model']}), {fs['type']} on "
          f"{fs['device']}, torch {m['torch']}, {m['date']}")
    print(f"{'H':>5} {'dtype':<14}{'B/token':>8}{'encode':>8}{'put':>7}{'put/raw':>8}{'get cold':>9}"
          f"{'/raw':>6}{'get warm':>9}{'/raw':>6}{'decode':>8}   (ktok/s, ratios of GB/s)")
    for r in result["rows"]:
        w, c, h = r["write"], r["read_cold"], r["read_warm"]
        print(f"{r['hidden']:>5} {r['dtype']:<14}{r['bytes_per_token']:>8.0f}{_fmt(r['encode_ktok_s']):>8}"
              f"{w['store_ktok_s']:>7.0f}{w['ratio']:>8.2f}{c['store_ktok_s']:>9.0f}{c['ratio']:>6.2f}"
              f"{h['store_ktok_s']:>9.0f}{h['ratio']:>6.2f}{_fmt(r['decode_ktok_s']):>8}")
    print("raw GB/s (same run): " + "; ".join(
        f"H={r['hidden']} {r['dtype']}: write {r['write']['raw_gbps']:.2f}, read cold {r['read_cold']['raw_gbps']:.2f}"
        f", warm {r['read_warm']['raw_gbps']:.2f}" for r in result["rows"]))
