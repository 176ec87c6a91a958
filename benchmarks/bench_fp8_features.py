"""FP8 against bf16 features: bytes per token, encode/decode cost and shared-directory
store throughput, each store rate beside a raw write+fsync/read of the same bytes on
the same file system in the same run. See draftflow/bench/fp8_features.py for what is
measured and docs/benchmarks.md for results. The defaults (H=4096 and H=576, T=2048,
10 samples per side) take under half a minute on a 2-core VM and write about 2 GB.

    python benchmarks/bench_fp8_features.py --root /mnt/shared/tmp --json fp8_features.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from draftflow.bench.fp8_features import print_table, run_fp8_benchmark  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=tempfile.gettempdir(), help="folder on the file system to benchmark")
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 576], help="target hidden sizes (H)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (T)")
    p.add_argument("--samples", type=int, default=10, help="samples (files) per side")
    p.add_argument("--json", default="bench_fp8_features.json", help="JSON results file")
    a = p.parse_args(argv)
    result = run_fp8_benchmark(a.root, a.hidden, a.seq_len, a.samples, json_out=a.json)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
