"""Shared-directory store benchmark: put/get against raw write+fsync/read of the same
bytes on the same file system in the same run, and the loader's data wait.

Point --root at the file system to measure (the shared mount, for a real run); the
files go to a temporary folder under it, removed at the end. The defaults (24
samples of T=2048, H=4096, bf16: 64 MiB each, about 3.3 GB of disk) take about
half a minute on a 2-core VM. See draftflow/bench/store_shared_dir.py for what is
measured and docs/benchmarks.md for results.

    python benchmarks/bench_store_shared_dir.py --root /mnt/shared/tmp --json store_shared_dir.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from draftflow.bench.store_shared_dir import print_table, run_store_benchmark  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=tempfile.gettempdir(), help="folder on the file system to benchmark")
    p.add_argument("--samples", type=int, default=24, help="number of samples (files) per side")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (T)")
    p.add_argument("--hidden", type=int, default=4096, help="target hidden size (H)")
    p.add_argument("--step-s", type=float, default=None,
                   help="simulated trainer step in seconds (default: 3x the median cold get)")
    p.add_argument("--json", default="bench_store_shared_dir.json", help="JSON results file")
    a = p.parse_args(argv)
    result = run_store_benchmark(a.root, a.samples, a.seq_len, a.hidden, step_s=a.step_s, json_out=a.json)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
