"""Shared-directory store throughput and loader data wait, each beside its same-run limit.

In one run, on the file system of `root`, with realistic samples (input_ids int64
[T], loss_mask uint8 [T], aux_hidden bf16 [T, 3H], last_hidden bf16 [T, H]):

- write: `SharedDirStore.put` (checksums, temp file, fsync, rename, folder fsync)
  against a raw write + fsync + close of one file per sample of the same size;
- read: `SharedDirStore.get` (one readinto, checksum verification) against a raw
  `readinto` of the same-size files into one preallocated buffer, cold (pages
  dropped with posix_fadvise DONTNEED, which needs no root) and warm (page cache);
- profile: checksum speed alone and a cold get split into file read and
  verification, to show where a missed ratio goes;
- loader: `FeatureLoader` (batch size 1) over the store feeding a simulated
  trainer step, and the data wait as a share of step time at steady state.

Raw and store operations alternate sample by sample (and which goes first
alternates too), so drift in a virtual disk's speed hits both sides alike.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from draftflow.config import FeaturesConfig
from draftflow.control.binding import RunKeys
from draftflow.stores.base import make_spec, verify_tensors
from draftflow.stores.sample_file import read_sample_file
from draftflow.stores.shared_dir import SharedDirStore
from draftflow.train.batches import FeatureLoader, ListRefSource, SampleOrder

TARGETS = {"write_vs_raw": 0.8, "read_vs_raw": 0.9, "data_wait_share": 0.02}
STEADY_FROM_STEP = 2  # steps 0 and 1 include the loader's start-up; skipped
AUTO_STEP_FACTOR = 3.0  # auto step time = this x the median cold get: the store outpaces the trainer


def sample_bytes(seq_len: int, hidden: int) -> int:
    """Feature bytes of one sample: int64 ids, uint8 mask, bf16 [T, 3H] and [T, H]."""
    return seq_len * (8 + 1) + seq_len * 4 * hidden * 2


def make_sample(seq_len: int, hidden: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 128_000, (seq_len,), generator=g),
            "loss_mask": torch.ones(seq_len, dtype=torch.uint8),
            "aux_hidden": torch.randn(seq_len, 3 * hidden, generator=g).to(torch.bfloat16),
            "last_hidden": torch.randn(seq_len, hidden, generator=g).to(torch.bfloat16)}


def _check_args(root: Path, num_samples: int, seq_len: int, hidden: int, step_s: float | None) -> None:
    if not root.is_dir():
        raise ValueError(f"root: {root} is not an existing directory (the file system to benchmark)")
    if num_samples < STEADY_FROM_STEP + 1:
        raise ValueError(f"num_samples: {num_samples}, expected at least {STEADY_FROM_STEP + 1} "
                         f"(the loader's first {STEADY_FROM_STEP} steps are skipped as start-up)")
    if seq_len < 1 or hidden < 1:
        raise ValueError(f"seq_len and hidden: {seq_len} and {hidden}, expected positive integers")
    if step_s is not None and not step_s > 0:
        raise ValueError(f"step_s: {step_s}, expected a positive number of seconds")
    # Raw and store copies of every sample, plus a warm-up file and 10% slack.
    need = int((2 * num_samples + 1) * sample_bytes(seq_len, hidden) * 1.1)
    free = shutil.disk_usage(root).free
    if need > free:
        raise ValueError(f"root: {root} has {free / 2**30:.1f} GiB free, the benchmark needs "
                         f"{need / 2**30:.1f} GiB (2 x num_samples x sample size); use fewer or smaller samples")


# ------------------------------------------------------------ raw file operations

def drop_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache, so the next read goes to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write(path: Path, data: memoryview) -> float:
    """Write `data` to a new file, fsync, close; return seconds."""
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        if f.write(data) != len(data):
            raise OSError(f"{path}: short write")
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(path: Path, out: memoryview) -> float:
    """Read a whole file into the front of the preallocated `out`; return seconds."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if f.readinto(out[:size]) != size:
            raise OSError(f"{path}: short read")
    return time.perf_counter() - start


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ------------------------------------------------------------ phases

def measure_writes(store, raw_dir: Path, sample: dict, raw_buf: memoryview, num_samples: int):
    """Put and raw-write every sample, alternating; returns refs and per-sample seconds."""
    refs, put_s, raw_s = [], [], []
    for i in range(num_samples):
        def put():
            t, ref = _timed(lambda: store.put(f"s{i:05d}", i, sample))
            refs.append(ref)
            put_s.append(t)
        def write():
            raw_s.append(raw_write(raw_dir / f"r{i:05d}", raw_buf))
        for op in ((put, write) if i % 2 else (write, put)):
            op()
    for i, ref in enumerate(refs):  # after fsync the pages are clean, so they can be dropped
        drop_cache(store.path_of(ref.sample_id))
        drop_cache(raw_dir / f"r{i:05d}")
    return refs, put_s, raw_s


def measure_reads(store, refs, raw_paths: list[Path], out: memoryview):
    """Get and raw-read every sample, alternating; returns per-sample seconds of each."""
    get_s, raw_s = [], []
    for i, ref in enumerate(refs):
        def get():
            t, lease = _timed(lambda: store.get(ref))
            store.release(lease)
            get_s.append(t)
        def read():
            raw_s.append(raw_read(raw_paths[i], out))
        for op in ((get, read) if i % 2 else (read, get)):
            op()
    return get_s, raw_s


def _split_get(store, refs, cold: bool) -> tuple[float, float]:
    """Median seconds of a get's two halves: reading the file, verifying checksums."""
    read_s, verify_s = [], []
    for ref in refs:
        path = store.path_of(ref.sample_id)
        if cold:
            drop_cache(path)
        t, (tensors, _) = _timed(lambda: read_sample_file(path))
        read_s.append(t)
        verify_s.append(_timed(lambda: verify_tensors(ref, tensors))[0])
        del tensors
    return statistics.median(read_s), statistics.median(verify_s)


def _profile(store, refs, sample: dict, raw_path: Path, file_bytes: int) -> dict:
    """Where a put and a get spend their time: checksums, fresh memory, file I/O."""
    def best_of(fn, k=5):
        return min(_timed(fn)[0] for _ in range(k))

    num_bytes = refs[0].num_bytes
    checksum_s = best_of(lambda: [make_spec(k, v) for k, v in sample.items()])
    warm_read, warm_verify = _split_get(store, refs, cold=False)
    cold_read, cold_verify = _split_get(store, refs, cold=True)
    # read_sample_file reads into a fresh bytearray (zero-filled new pages); these two
    # separate that cost from the copy out of the page cache (raw_path is warm).
    alloc_s = best_of(lambda: bytearray(file_bytes))
    fresh_read_s = best_of(lambda: raw_read(raw_path, memoryview(torch.empty(file_bytes, dtype=torch.uint8).numpy())))
    return {"checksum_gbps": num_bytes / checksum_s / 1e9, "checksum_s": checksum_s,
            "warm_get_read_file_s": warm_read, "warm_get_verify_s": warm_verify,
            "cold_get_read_file_s": cold_read, "cold_get_verify_s": cold_verify,
            "bytearray_alloc_s": alloc_s, "warm_raw_read_fresh_buffer_s": fresh_read_s}


class _TimedGets:
    """The store as the loader sees it, with each get timed (in the loader's thread)."""

    def __init__(self, store):
        self.store = store
        self.get_s: list[float] = []

    def get(self, ref):
        t, lease = _timed(lambda: self.store.get(ref))
        self.get_s.append(t)
        return lease

    def release(self, lease):
        self.store.release(lease)


def _measure_loader(store, refs, step_s: float) -> dict:
    """Train one epoch at batch size 1 with a sleep as the step; cold files.

    A sleep stands for a GPU step: while the GPU computes, the host CPU is idle,
    which is what the loader's background thread runs on.
    """
    for ref in refs:
        drop_cache(store.path_of(ref.sample_id))
    timed = _TimedGets(store)
    order = SampleOrder(num_samples=len(refs), seed=0, batch_size=1, grad_accum=1)
    loader = FeatureLoader(timed, ListRefSource(refs), order, 0, len(refs))
    wait_s, step_total_s = [], []
    try:
        for step in range(len(refs)):
            start, waited = time.perf_counter(), loader.wait_s
            batches = loader.next(step)
            wait_s.append(loader.wait_s - waited)
            time.sleep(step_s)  # the simulated trainer step
            del batches
            step_total_s.append(time.perf_counter() - start)
    finally:
        loader.close()
    steady_wait, steady_total = sum(wait_s[STEADY_FROM_STEP:]), sum(step_total_s[STEADY_FROM_STEP:])
    return {"batch_size": 1, "num_steps": len(refs), "steady_from_step": STEADY_FROM_STEP, "step_s": step_s,
            "steady_wait_s": steady_wait, "steady_step_total_s": steady_total,
            "data_wait_share": steady_wait / steady_total,
            "first_steps_wait_s": wait_s[:STEADY_FROM_STEP],
            "get_s_median": statistics.median(timed.get_s), "get_s_max": max(timed.get_s),
            "get_vs_step": statistics.median(timed.get_s) / step_s}


# ------------------------------------------------------------ the benchmark

def _fs_of(path: Path) -> dict:
    """Mount point, device and file system type of `path`, from /proc/mounts."""
    real, best = os.path.realpath(path), {"mount": "?", "device": "?", "type": "?"}
    with open("/proc/mounts") as f:
        for line in f:  # the longest mount point containing the path wins
            device, mount, fstype = (s.replace("\\040", " ") for s in line.split()[:3])
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and (best["mount"] == "?" or len(mount) >= len(best["mount"])):
                best = {"mount": mount, "device": device, "type": fstype}
    return best


def machine_info(root: Path) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "?")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "cpu_model": model, "uname": " ".join(os.uname()),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "root": str(root.resolve()), "file_system": _fs_of(root),
            "torch": torch.__version__, "python": platform.python_version()}


def compare_to_raw(store_s: list[float], raw_s: list[float], store_bytes: int, raw_bytes: int, target: float) -> dict:
    store_gbps, raw_gbps = store_bytes / sum(store_s) / 1e9, raw_bytes / sum(raw_s) / 1e9
    return {"store_gbps": store_gbps, "raw_gbps": raw_gbps, "ratio": store_gbps / raw_gbps,
            "target": target, "met": store_gbps / raw_gbps >= target,
            "store_s_median": statistics.median(store_s), "raw_s_median": statistics.median(raw_s)}


def run_store_benchmark(root, num_samples: int = 24, seq_len: int = 2048, hidden: int = 4096,
                        step_s: float | None = None, json_out=None) -> dict:
    """Benchmark SharedDirStore on `root`'s file system against raw I/O of the same bytes.

    `step_s` is the simulated trainer step; None picks 3x the measured median cold
    get, so that the store outpaces the trainer. Files go to a temporary folder
    under `root`, removed at the end. Returns a JSON-ready dict (also written to
    `json_out` if given): sizes, machine, write, read_cold, read_warm, profile, loader.
    """
    root = Path(root)
    _check_args(root, num_samples, seq_len, hidden, step_s)
    work = Path(tempfile.mkdtemp(prefix="draftflow-bench-", dir=root))
    try:
        result = _run(work, num_samples, seq_len, hidden, step_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"] = machine_info(root)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _run(work: Path, num_samples: int, seq_len: int, hidden: int, step_s: float | None) -> dict:
    store = SharedDirStore(FeaturesConfig(backend="shared_dir", root=str(work / "store")),
                           RunKeys(os.urandom(32), "bench"))  # a throwaway store: nothing outlives the run
    raw_dir = work / "raw"
    raw_dir.mkdir()
    sample = make_sample(seq_len, hidden)
    # A warm-up put gives the file size for the raw side and pays first-use costs untimed.
    warm_ref = store.put("warmup", 0, sample)
    file_bytes = store.path_of("warmup").stat().st_size
    store.delete(warm_ref)
    raw_buf = memoryview(torch.randint(0, 256, (file_bytes,), dtype=torch.uint8).numpy())
    raw_write(raw_dir / "warmup", raw_buf)
    out = memoryview(torch.zeros(file_bytes, dtype=torch.uint8).numpy())  # preallocated, pages touched

    refs, put_s, raw_w_s = measure_writes(store, raw_dir, sample, raw_buf, num_samples)
    raw_paths = [raw_dir / f"r{i:05d}" for i in range(num_samples)]
    store_bytes = sum(store.path_of(r.sample_id).stat().st_size for r in refs)
    raw_bytes = sum(p.stat().st_size for p in raw_paths)
    write = compare_to_raw(put_s, raw_w_s, store_bytes, raw_bytes, TARGETS["write_vs_raw"])

    cold_get_s, cold_raw_s = measure_reads(store, refs, raw_paths, out)
    read_cold = compare_to_raw(cold_get_s, cold_raw_s, store_bytes, raw_bytes, TARGETS["read_vs_raw"])
    measure_reads(store, refs, raw_paths, out)  # untimed pass: every file is in the page cache
    warm_get_s, warm_raw_s = measure_reads(store, refs, raw_paths, out)
    read_warm = compare_to_raw(warm_get_s, warm_raw_s, store_bytes, raw_bytes, TARGETS["read_vs_raw"])

    profile = _profile(store, refs, sample, raw_paths[0], file_bytes)
    if step_s is None:
        step_s = round(AUTO_STEP_FACTOR * statistics.median(cold_get_s), 3) or 0.001
    loader = _measure_loader(store, refs, step_s)
    loader["target"] = TARGETS["data_wait_share"]
    loader["met"] = loader["data_wait_share"] < TARGETS["data_wait_share"]
    store.close()
    return {"benchmark": "store_shared_dir",
            "sizes": {"num_samples": num_samples, "seq_len": seq_len, "hidden": hidden,
                      "sample_bytes": refs[0].num_bytes, "file_bytes": file_bytes,
                      "total_bytes_per_side": store_bytes},
            "write": write, "read_cold": read_cold, "read_warm": read_warm, "profile": profile,
            "loader": loader}


def print_table(result: dict) -> None:
    """Print a result of `run_store_benchmark` as a short table."""
    s, m, fs = result["sizes"], result["machine"], result["machine"]["file_system"]
    print(f"shared_dir store: {s['num_samples']} samples, T={s['seq_len']} H={s['hidden']} bf16, "
          f"{s['file_bytes'] / 2**20:.1f} MiB/file; {m['cpus']} CPUs, {fs['type']} on {fs['device']} "
          f"({m['root']}), {m['date']}")
    print(f"{'operation':<22}{'store GB/s':>11}{'raw GB/s':>10}{'ratio':>8}{'target':>8}  result")
    for key, name in (("write", "put / write+fsync"), ("read_cold", "get / read, cold"),
                      ("read_warm", "get / read, warm")):
        r = result[key]
        print(f"{name:<22}{r['store_gbps']:>11.2f}{r['raw_gbps']:>10.2f}{r['ratio']:>8.2f}"
              f"{'>=' + format(r['target'], 'g'):>8}  {'met' if r['met'] else 'MISSED'}")
    p, ld = result["profile"], result["loader"]
    ms = {k: v * 1e3 for k, v in p.items() if k.endswith("_s")}
    print(f"profile (ms per sample): put checksums {ms['checksum_s']:.1f} ({p['checksum_gbps']:.2f} GB/s); "
          f"get warm = read file {ms['warm_get_read_file_s']:.1f} + verify {ms['warm_get_verify_s']:.1f}, "
          f"cold = {ms['cold_get_read_file_s']:.1f} + {ms['cold_get_verify_s']:.1f}; "
          f"bytearray alloc alone {ms['bytearray_alloc_s']:.1f}; warm raw read into fresh "
          f"torch.empty {ms['warm_raw_read_fresh_buffer_s']:.1f}")
    print(f"loader (batch 1, step {ld['step_s'] * 1e3:.0f} ms, steps {ld['steady_from_step']}+): data wait "
          f"{100 * ld['data_wait_share']:.2f}% of step time (target <{100 * ld['target']:g}%: "
          f"{'met' if ld['met'] else 'MISSED'}); get {ld['get_s_median'] * 1e3:.1f} ms median, "
          f"{ld['get_s_max'] * 1e3:.1f} ms max = {ld['get_vs_step']:.2f}x the step")
