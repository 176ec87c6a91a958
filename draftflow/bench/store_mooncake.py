"""Mooncake store throughput: the zero-copy path against its limits, all in one run.

For one realistic sample (T tokens, hidden H, bf16: aux_hidden [T, 3H] + last_hidden
[T, H] + ids and mask) this measures, on a real master and segment holder:

- zero-copy: `MooncakeStore.put` (pool copy, one batch call, checksums) and `get`
  (`get_into_ranges`, checksums; with `chunk_bytes`, chunks each hashed while the
  next is in flight);
- naive: `safetensors.torch.save` -> `put(bytes)` and `get() -> bytes` -> `load`;
- raw: Mooncake's own calls on the same keys and bytes into the same registered
  buffer, each ONE call per sample (the floor of any store built on Mooncake):
  `batch_put_from`; `batch_get_into` of the whole features; `get_into_ranges` of the
  whole features and, with `chunk_bytes`, of the same chunks as the store's get;
- memcpy of the same number of bytes (the host's copy rate, for scale).

Each figure is the median over `repeats` timed rounds after one warm-up round; the
reads of a round take turns at going first.
Targets: zero-copy put and get >= 2.5x the naive path, and get >= 0.8x the fastest
of the raw reads.

    draftflow bench store --backend mooncake --seq-len 2048 --hidden 4096
    python benchmarks/bench_store_mooncake.py --tokens 2048 --hidden 4096
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from importlib.metadata import version

import safetensors.torch
import torch

from draftflow.config import FeaturesConfig, MooncakeConfig
from draftflow.control.binding import RunKeys
from draftflow.stores.mooncake import MooncakeStore, _chunks, _layout, ranges_args
from draftflow.stores.mooncake_service import MooncakeService


def make_sample(num_tokens: int, hidden: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 128000, (num_tokens,)),
            "loss_mask": torch.ones(num_tokens, dtype=torch.uint8),
            "aux_hidden": torch.randn(num_tokens, 3 * hidden).to(torch.bfloat16),
            "last_hidden": torch.randn(num_tokens, hidden).to(torch.bfloat16)}


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _raw_layout(store: MooncakeStore, ref) -> tuple[list[str], list[int], list[int], int]:
    """Keys, sizes and offsets of `ref`'s stored features in a buffer range, placed as the
    store places them, and the bytes they span."""
    sizes = [f.num_bytes for f in ref.features if f.num_bytes]
    offsets, total = _layout(sizes)
    return store.feature_keys(ref), sizes, offsets, total


def _raw_reads(store: MooncakeStore, layout, base: int) -> dict:
    """Mooncake's own reads of a sample's objects (`_raw_layout`) into the registered
    buffer at `base`, with nothing around them, each ONE call: name -> a function that
    does it."""
    keys, sizes, offsets, _ = layout
    offsets = [base + o for o in offsets]
    ptrs = [store._pool.ptr + o for o in offsets]

    def batch_get_into():
        codes = store._client.batch_get_into(keys, ptrs, sizes)
        assert codes == sizes, codes

    def get_into_ranges(chunk_bytes: int):
        pieces = [p for chunk in _chunks(sizes, chunk_bytes) for p in chunk]
        args = ranges_args(store._pool.ptr, keys, offsets, pieces)

        def read():
            codes = store._client.get_into_ranges(*args)
            assert codes == args[4], codes
        return read

    reads = {"raw_get_into": batch_get_into, "raw_get_into_ranges": get_into_ranges(sum(sizes))}
    if store.chunk_bytes:
        reads["raw_get_into_ranges_chunked"] = get_into_ranges(store.chunk_bytes)  # the store's chunks
    return reads


def _round(store: MooncakeStore, naive, x: dict, i: int, num_bytes: int) -> dict[str, float]:
    """One round of every path; returns seconds per path."""
    t = {}
    t["zero_copy_put"], ref = _timed(lambda: store.put(f"b{i}", i, x))
    layout = _raw_layout(store, ref)
    keys, sizes, offsets, span = layout
    base = store._pool.alloc(span, 1.0)
    reads = {"zero_copy_get": lambda: store.release(store.get(ref)), **_raw_reads(store, layout, base)}
    # The first reads of a fresh object are slower than later ones, so each round starts
    # the rotation of the read paths at another one.
    names = list(reads)
    seconds = {name: _timed(reads[name])[0] for name in names[i % len(names):] + names[:i % len(names)]}
    t.update((name, seconds[name]) for name in names)
    ptrs = [store._pool.ptr + base + o for o in offsets]
    raw_keys = [k + "-raw" for k in keys]
    t["raw_put_from"], codes = _timed(lambda: store._client.batch_put_from(raw_keys, ptrs, sizes, store._pin))
    assert all(c == 0 for c in codes), codes
    store._client.batch_remove(raw_keys, True)
    store._pool.free(base, span)
    store.delete(ref)

    # Naive: serialize, put bytes, get bytes, deserialize.
    key = f"{store.namespace}/naive/{i}"
    def naive_put():
        rc = naive.put(key, safetensors.torch.save(x), store._pin)
        assert rc == 0, rc
    t["naive_put"], _ = _timed(naive_put)
    t["naive_get"], back = _timed(lambda: safetensors.torch.load(naive.get(key)))
    assert torch.equal(back["aux_hidden"], x["aux_hidden"])
    naive.remove(key, True)

    src = torch.empty(num_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(num_bytes, dtype=torch.uint8).fill_(0)
    t["memcpy"], _ = _timed(lambda: dst.copy_(src))
    return t


def run_benchmark(num_tokens: int = 2048, hidden: int = 4096, repeats: int = 5,
                  chunk_bytes: int | None = MooncakeConfig().chunk_bytes) -> dict:
    """Start a service, time every path `repeats` times; return GB/s figures and ratios."""
    from mooncake.store import MooncakeDistributedStore

    x = make_sample(num_tokens, hidden)
    num_bytes = sum(t.numel() * t.element_size() for t in x.values())
    segment = max(16 << 20, 4 * num_bytes + (16 << 20))
    with MooncakeService(segment_bytes=segment) as service, tempfile.TemporaryDirectory() as root:
        mc = MooncakeConfig(master=service.master, metadata_server=service.metadata_server,
                            buffer_bytes=3 * num_bytes + (4 << 20), chunk_bytes=chunk_bytes,
                            full_timeout_s=10.0)
        keys = RunKeys(os.urandom(32), "bench")  # a throwaway store: nothing outlives the run
        store = MooncakeStore(FeaturesConfig(backend="mooncake", root=root, mooncake=mc), keys, run_id="bench")
        naive = MooncakeDistributedStore()  # put/get of bytes go through a client-local buffer
        rc = naive.setup("127.0.0.1", service.metadata_server, 0, 2 * num_bytes + (16 << 20), "tcp", "",
                         service.master)
        assert rc == 0, rc
        try:
            _round(store, naive, x, 0, num_bytes)  # warm-up: connections, page faults
            rounds = [_round(store, naive, x, i, num_bytes) for i in range(1, repeats + 1)]
        finally:
            naive.close()
            store.close()
    seconds = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    gbps = {k: num_bytes / s / 1e9 for k, s in seconds.items()}
    fastest_raw_get = max((k for k in gbps if k.startswith("raw_get")), key=gbps.get)
    ratios = {
        "get_vs_naive_get": gbps["zero_copy_get"] / gbps["naive_get"],
        "put_vs_naive_put": gbps["zero_copy_put"] / gbps["naive_put"],
        "roundtrip_vs_naive_roundtrip": (seconds["naive_put"] + seconds["naive_get"])
        / (seconds["zero_copy_put"] + seconds["zero_copy_get"]),
        "get_vs_raw_get_into": gbps["zero_copy_get"] / gbps["raw_get_into"],
        "get_vs_raw_get_into_ranges": gbps["zero_copy_get"] / gbps["raw_get_into_ranges"],
        "get_vs_fastest_raw_get": gbps["zero_copy_get"] / gbps[fastest_raw_get],
        "put_vs_raw_put_from": gbps["zero_copy_put"] / gbps["raw_put_from"],
        "get_vs_memcpy": gbps["zero_copy_get"] / gbps["memcpy"],
    }
    return {"sample_bytes": num_bytes, "num_tokens": num_tokens, "hidden": hidden, "repeats": repeats,
            "chunk_bytes": chunk_bytes, "fastest_raw_get": fastest_raw_get,
            "gbps": gbps, "seconds": seconds, "ratios": ratios,
            "targets_met": {"get_vs_naive_get>=2.5": ratios["get_vs_naive_get"] >= 2.5,
                            "put_vs_naive_put>=2.5": ratios["put_vs_naive_put"] >= 2.5,
                            "get_vs_fastest_raw_get>=0.8": ratios["get_vs_fastest_raw_get"] >= 0.8},
            "machine": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "cpus": os.cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__,
                        "mooncake": version("mooncake-transfer-engine-non-cuda"),
                        "transport": "tcp over loopback"}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-bytes", type=int, default=MooncakeConfig().chunk_bytes,
                   help="features.mooncake.chunk_bytes of the store's get")
    p.add_argument("--out", default="bench_store_mooncake.json", help="JSON results file")
    a = p.parse_args(argv)
    r = run_benchmark(a.tokens, a.hidden, a.repeats, a.chunk_bytes)
    print_table(r)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)


def print_table(r: dict) -> None:
    chunk = f", get chunks of {r['chunk_bytes'] / 2**20:g} MiB" if r.get("chunk_bytes") else ""
    print(f"sample: T={r.get('num_tokens', '?')} H={r.get('hidden', '?')} ({r['sample_bytes'] / 2**20:.1f} MiB)"
          f"{chunk}, {r['machine']['cpus']} CPUs, {r['machine']['date']}")
    print(f"{'path':<28}{'GB/s':>8}{'ms':>9}")
    for k, g in r["gbps"].items():
        print(f"{k:<28}{g:>8.2f}{r['seconds'][k] * 1e3:>9.1f}")
    for k, v in r["ratios"].items():
        print(f"{k:<30}{v:>6.2f}x")
    print("targets:", ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in r["targets_met"].items()))


if __name__ == "__main__":
    main()
