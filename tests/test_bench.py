"""Benchmarks run end to end at tiny sizes: result structure and input checks, never timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from draftflow.bench.store_shared_dir import print_table, run_store_benchmark

REPO = Path(__file__).resolve().parent.parent
TINY = dict(num_samples=3, seq_len=16, hidden=8, step_s=0.005)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_root")
    out = tmp_path_factory.mktemp("bench_out") / "r.json"
    return root, out, run_store_benchmark(root, **TINY, json_out=out)


def test_store_benchmark_reports_positive_ratios_for_write_and_both_reads(tiny_result):
    _, _, r = tiny_result
    for side in ("write", "read_cold", "read_warm"):
        for key in ("store_gbps", "raw_gbps", "ratio"):
            assert _positive(r[side][key]), (side, key, r[side][key])
        assert isinstance(r[side]["met"], bool)
    assert r["write"]["target"] == 0.8 and r["read_cold"]["target"] == 0.9


def test_store_benchmark_reports_sizes_machine_profile_and_loader(tiny_result):
    _, _, r = tiny_result
    assert r["sizes"]["sample_bytes"] == 16 * 9 + 16 * 4 * 8 * 2
    assert r["sizes"]["file_bytes"] > r["sizes"]["sample_bytes"]  # plus the safetensors header
    assert r["machine"]["cpus"] >= 1 and r["machine"]["file_system"]["type"] != "?"
    assert all(_positive(v) for k, v in r["profile"].items() if k.endswith("_s"))
    loader = r["loader"]
    assert loader["num_steps"] == 3 and loader["steady_from_step"] == 2 and loader["step_s"] == 0.005
    assert 0 <= loader["data_wait_share"] < 1 and _positive(loader["get_s_median"])


def test_store_benchmark_writes_its_result_as_json_and_removes_its_files(tiny_result):
    root, out, r = tiny_result
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert list(root.iterdir()) == []


def test_print_table_shows_every_ratio_and_the_data_wait(tiny_result, capsys):
    print_table(tiny_result[2])
    text = capsys.readouterr().out
    for label in ("put / write+fsync", "get / read, cold", "get / read, warm", "data wait"):
        assert label in text


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_samples=2), "num_samples"),
    (dict(seq_len=0), "seq_len"),
    (dict(hidden=-1), "hidden"),
    (dict(step_s=0.0), "step_s"),
    (dict(seq_len=10**6, hidden=10**6), "GiB free"),  # ~8 TB: beyond any test disk
])
def test_store_benchmark_refuses_bad_arguments_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        run_store_benchmark(tmp_path, **{**TINY, **kwargs})
    assert list(tmp_path.iterdir()) == []  # refused before writing anything


def test_store_benchmark_refuses_a_root_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match="not an existing directory"):
        run_store_benchmark(tmp_path / "missing", **TINY)


def test_benchmark_script_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_store_shared_dir.py"),
                           "--root", str(tmp_path), "--samples", "3", "--seq-len", "8", "--hidden", "4",
                           "--step-s", "0.002", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "put / write+fsync" in proc.stdout
    assert json.loads(out.read_text())["benchmark"] == "store_shared_dir"
