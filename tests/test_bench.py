"""Benchmarks run end to end at tiny sizes: result structure and input checks, never timings."""

from __future__ import annotations

import json
import math
import os
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


# ---- GPU benchmark scripts (issue #6: 3c, 3d) in their CPU --small mode --------------------------------

def _run_small(script: str, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    """Run benchmarks/<script> --small with its scratch folder and JSON in tmp_path."""
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--small", "--work", str(tmp_path),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # scratch files removed
    return json.loads(out.read_text()), proc.stdout


def test_capture_benchmark_times_plain_forward_capture_and_store_on_the_same_tokens(tmp_path):
    r, text = _run_small("bench_capture_gpu.py", tmp_path)
    sizes = r["sizes"]
    assert sizes["tokens"] == sizes["num_samples"] * sizes["max_length"]  # every sample cut to max_length
    assert _positive(r["plain"]["tokens_per_s"])
    for key in ("capture", "capture_store"):
        assert _positive(r[key]["tokens_per_s"]) and _positive(r[key]["vs_plain"])
    assert r["capture"]["num_puts"] == r["capture_store"]["num_puts"] == sizes["num_samples"]
    assert math.isclose(sum(r["profile"]["shares"].values()), 1.0)
    assert all(_positive(r["disk"][k]) for k in ("write_fsync_gbps", "read_cold_gbps", "read_warm_gbps"))
    assert isinstance(r["targets"]["capture_vs_plain>=0.8"], bool)
    assert "capture + shared_dir store" in text and "vs plain" in text


def test_disagg_benchmark_runs_producer_consumer_and_reference_and_compares_steps(tmp_path):
    r, text = _run_small("bench_disagg_gpu.py", tmp_path)
    steps = r["steps"]
    assert "error" not in r
    assert r["consumer"]["num_steps"] == r["reference"]["num_steps"] == steps
    for run in ("consumer", "reference"):
        assert _positive(r[run]["median_step_s"]) and 0 <= r[run]["data_wait_share_all"] < 1
    assert _positive(r["comparison"]["step_ratio"])
    pair = r["pair"]
    assert pair["consumer_end"][1] == 0 and pair["producer_end"][1] in (0, -15)  # -15: stopped by the benchmark
    assert pair["samples_published"] >= 2 * steps + 2 or pair["producer_end"][1] == 0
    assert 0 <= pair["consumer_steps_while_producer_published"] <= steps
    assert r["data"]["draft_vocab_size"] == 259 and r["data"]["draft_vocab_ids_in_data"] <= 259
    assert "consumer / reference median step" in text


@pytest.fixture
def bench_scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_disagg_gpu
    return bench_disagg_gpu


def test_disagg_summary_derives_step_time_and_data_wait_from_trainer_metrics(tmp_path, bench_scripts):
    # 4 steps of one 100-token sample; step 1 waited 0.5 s of its 1 s, the others 0.01 s of 0.2 s.
    rows = [(1, 100.0, 0.5), (2, 500.0, 0.05), (3, 500.0, 0.05), (4, 250.0, 0.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "tokens_per_s": tps, "data_wait_share": w, "loss": 1.0}) + "\n" for s, tps, w in rows))
    (tmp_path / "samples.rank0.jsonl").write_text("".join(
        json.dumps({"step": s, "samples": [f"s{s}"]}) + "\n" for s, _, _ in rows))
    got = bench_scripts.summarize_run(tmp_path, {f"s{s}": 100 for s in range(1, 5)}, warmup=1)
    assert got["num_steps"] == 4 and math.isclose(got["median_step_s"], 0.2)
    assert math.isclose(got["first_step_wait_s"], 0.5)
    assert math.isclose(got["data_wait_share_all"], (0.5 + 0.01 + 0.01) / (1.0 + 0.2 + 0.2 + 0.4))
    assert math.isclose(got["data_wait_share_steady"], 0.02 / 0.8)
    assert math.isclose(got["data_wait_share_after_first"], 0.02 / 0.8)  # warm-up 1: the same steps here
    verdict = bench_scripts.compare(got, {**got, "median_step_s": 0.2 / 1.02})["targets"]
    assert list(verdict.values()) == [True, False, False]  # 1.02x; 28.9% and 2.5% of wait


def test_disagg_timeline_counts_producer_rate_and_overlapping_steps(bench_scripts):
    # (t, refs journaled, steps logged): 4 refs a second from t=1, steps at t=2, 3, 4; last ref at t=3.
    pair = {"points": [(0.0, 0, 0), (1.0, 4, 0), (2.0, 8, 1), (3.0, 12, 2), (4.0, 12, 3)],
            "ends": {"producer": (3.5, 0), "consumer": (4.5, 0)}, "producer_stopped_at_s": None,
            "reference_head_ready_s": 1.5}
    got = bench_scripts.pair_timeline(pair, steps=3, tokens_per_sample=10)
    assert got["samples_published"] == 12 and math.isclose(got["producer_tokens_per_s"], 8 * 10 / 2.0)
    assert got["consumer_first_step_s"] == 2.0 and got["consumer_last_step_s"] == 4.0
    assert got["consumer_steps_while_producer_published"] == 2
    assert math.isclose(got["producer_tokens_per_s_while_consumer_trained"], 4 * 10 / 2.0)


def test_train_benchmark_small_with_kernel_profile(tmp_path):
    """bench_train_gpu.py --small (CPU, where the trainer keeps a plain DraftLoss):
    --profile adds the time per op of two more steps; each run says what it recomputed."""
    out = tmp_path / "train.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_gpu.py"), "--small", "--seqs", "48",
                           "--steps", "2", "--profile", "--out", str(out)],
                          capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["fsdp2"] is False and r["world_size"] == 1
    run = r["runs"][0]
    assert run["finite"] and _positive(run["tokens_per_s"])
    assert run["head_recomputed"] is False and run["layer_recomputed"] is False  # auto on CPU
    assert _positive(run["predicted_peak_gib"]) and run["predicted_fits_card"] is None  # no card to fit on CPU
    assert run["profile"] and all(_positive(p["ms_per_step"]) for p in run["profile"])
    assert any("mm" in p["name"] for p in run["profile"])
    assert "fsdp2 False" in proc.stdout


def test_side_by_side_benchmark_small_runs_draftflow_and_says_why_specforge_did_not(tmp_path):
    """bench_specforge_gpu.py --small: DraftFlow's side on CPU at every length (the
    lengths both systems train and the ones DraftFlow trains alone), SpecForge's
    recorded as skipped (its loss is a Triton kernel), one comparison row per length."""
    out = tmp_path / "side.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_specforge_gpu.py"), "--small",
                           "--both-seqs", "24,40", "--draftflow-seqs", "56", "--out", str(out)],
                          capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "Triton" in r["specforge"]["skipped"] and r["specforge"]["runs"] == []
    assert [run["seq"] for run in r["draftflow"]["runs"]] == [24, 40, 56]
    assert all(_positive(run["tokens_per_s"]) and run["finite"] for run in r["draftflow"]["runs"])
    assert [row["seq"] for row in r["comparison"]] == [24, 40, 56]
    assert all(row["auto_recomputed"] == "nothing" and _positive(row["predicted_peak_gib"]) and "ratio" not in row
               for row in r["comparison"])
    assert "auto recomputed" in proc.stdout and "specforge: skipped" in proc.stdout


def test_fp8_benchmark_halves_bytes_per_token_and_reports_every_rate(tmp_path, capsys):
    from draftflow.bench.fp8_features import print_table as print_fp8, run_fp8_benchmark

    result = run_fp8_benchmark(tmp_path, hiddens=(64,), seq_len=16, num_samples=2, json_out=tmp_path / "r.json")
    bf16, fp8 = result["rows"]
    assert (bf16["dtype"], fp8["dtype"]) == ("bfloat16", "float8_e4m3fn")
    # 4H values of 2 bytes + 9 bytes of ids and mask, against 4H of 1 byte + 16 of scales + 9
    assert bf16["bytes_per_token"] == 8 * 64 + 9 and fp8["bytes_per_token"] == 4 * 64 + 16 + 9
    assert bf16["encode_ktok_s"] is None and _positive(fp8["encode_ktok_s"]) and _positive(fp8["decode_ktok_s"])
    for row in result["rows"]:
        for side in ("write", "read_cold", "read_warm"):
            assert _positive(row[side]["ratio"]) and _positive(row[side]["store_ktok_s"]), side
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["dtype"] == "float8_e4m3fn"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # its files are removed
    print_fp8(result)
    assert "float8_e4m3fn" in capsys.readouterr().out


def test_prefix_sharing_counts_the_tokens_a_prefix_trie_keeps():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from prefix_sharing import prefix_sharing

    r = prefix_sharing([[1, 2, 3, 4], [1, 2, 9], [1, 2, 3, 4], [7]])
    # trie: 1-2-3-4, 2-9 branch (1 more), the duplicate adds nothing, 7: 6 tokens of 12
    assert (r["tokens"], r["tokens_kept_with_sharing"], r["longest_shared_prefix"]) == (12, 6, 4)
    assert r["share_saved"] == 0.5


def _eval_json(path: Path, taus: dict[str, float], lossless: bool = True) -> None:
    """A `draftflow evaluate --json` (version 2) file with these taus at depth 5."""
    sets = {s: {"depths": {"5": {"tau": tau, "lossless": lossless}}} for s, tau in taus.items()}
    path.write_text(json.dumps({"version": 2, "draft": str(path), "depths": [5], "prompt_sets": sets}))


def test_side_by_side_table_puts_each_variant_against_both_recipes_and_its_prediction(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import side_by_side_table as sbs

    ev = tmp_path / "eval"
    ev.mkdir()
    _eval_json(ev / "draftflow.heldout.json", {"heldout": 2.0})
    _eval_json(ev / "draftflow.humaneval.json", {"humaneval": 1.5})
    _eval_json(ev / "specforge.heldout.json", {"heldout": 1.25})
    _eval_json(ev / "specforge.humaneval.json", {"humaneval": 1.2})
    _eval_json(ev / "eagle31.heldout.json", {"heldout": 2.2}, lossless=False)
    _eval_json(ev / "batch16.heldout.json", {"heldout": 2.1})
    assert sbs.main(["table", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "side_by_side.json").read_text())
    rows = {r["draft"]: r for r in table["rows"]}
    assert list(rows) == ["draftflow", "specforge", "eagle31", "batch16"]
    assert table["prompt_sets"] == ["heldout", "humaneval"]
    assert rows["draftflow"]["vs_specforge"] == {"heldout": 1.6, "humaneval": 1.25}
    assert rows["eagle31"]["vs_draftflow"]["heldout"] == pytest.approx(1.1)
    assert rows["eagle31"]["tau"]["humaneval"] is None and rows["eagle31"]["predicted"] == 1.10
    lines = {line.split(" | ")[0]: line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    assert lines["draftflow"][3] == "1.60x" and lines["draftflow"][-1] == "yes"
    assert lines["eagle31"][-1] == "NO"  # its held-out run was not lossless
    assert lines["batch16"][-1] == "yes" and lines["batch16"][2] == "-" and lines["batch16"][4] == "-"
    assert sbs.main(["table", str(tmp_path), "--depth", "3"]) == 0  # no result at depth 3: every tau "-"
    assert all(r["tau"] == {"heldout": None, "humaneval": None} for r in
               json.loads((tmp_path / "side_by_side.json").read_text())["rows"])
    capsys.readouterr()

    (ev / "batch16.heldout.json").write_text('{"version": 2, "prompt_sets": [1]}')
    with pytest.raises(ValueError, match="batch16.heldout.json: field 'prompt_sets'"):
        sbs.build_table(tmp_path)
    (ev / "batch16.heldout.json").write_text("{not json")
    with pytest.raises(ValueError, match="batch16.heldout.json: not readable"):
        sbs.build_table(tmp_path)
    (ev / "batch16.heldout.json").unlink()

    for path in ev.glob("specforge.*.json"):  # a DraftFlow-only run: no SpecForge row, no ratio to it
        path.unlink()
    rows = {r["draft"]: r for r in sbs.build_table(tmp_path)["rows"]}
    assert list(rows) == ["draftflow", "eagle31"] and rows["draftflow"]["vs_specforge"]["heldout"] is None
    for path in ev.glob("*.json"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no evaluation"):
        sbs.build_table(tmp_path)
    assert sbs.main(["overrides", "batch16", "--steps", "10"]) == 0
    assert capsys.readouterr().out.split() == ["train.batch_size=4", "train.max_steps=20"]
    assert sbs.main(["overrides", "sf_hparams", "--steps", "200"]) == 0  # warm-up: 1.5% of the steps
    assert capsys.readouterr().out.split() == ["train.lr=1e-4", "train.warmup_steps=3", "train.min_lr_ratio=0"]
    with pytest.raises(SystemExit):
        sbs.main(["overrides", "eagle3.1", "--steps", "10"])  # unknown name: the shell script stops on it


def test_sharegpt_subset_keeps_the_first_conversations_up_to_their_kth_reply(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sharegpt_subset

    def turn(role, text):
        return {"role": role, "content": text}

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [
        [turn("user", "a"), turn("assistant", "b"), turn("user", "c"), turn("assistant", "d")],
        [turn("system", "s"), turn("user", "e"), turn("assistant", "f")],
        [turn("user", "g"), turn("assistant", "h")],
    ]))
    out = tmp_path / "out.jsonl"
    assert sharegpt_subset.main(["--source", str(src), "--first", "2", "--turns", "1", "--out", str(out)]) == 0
    got = [[m["content"] for m in json.loads(line)["messages"]] for line in out.read_text().splitlines()]
    assert got == [["a", "b"], ["s", "e", "f"]]
    assert sharegpt_subset.main(["--source", str(src), "--first", "9", "--turns", "2", "--out", str(out)]) == 0
    assert [len(json.loads(line)["messages"]) for line in out.read_text().splitlines()] == [4, 3, 2]
    with pytest.raises(SystemExit):
        sharegpt_subset.main(["--source", str(src), "--first", "0", "--out", str(out)])


def test_side_by_side_script_refuses_unknown_phases_and_variants_and_missing_features(tmp_path):
    """benchmarks/side_by_side_smollm2.sh stops before any work, naming what is wrong."""
    def run(**env):
        return subprocess.run(["bash", str(REPO / "benchmarks" / "side_by_side_smollm2.sh")], cwd=REPO,
                              env={**os.environ, "GGUF": "x", "DATA": "x", "OUTDIR": str(tmp_path), **env},
                              capture_output=True, text=True, timeout=60)

    proc = run(PHASES="draftflow evaluation")
    assert proc.returncode == 2 and "unknown phase 'evaluation'" in proc.stdout
    proc = run(PHASES="variants")
    assert proc.returncode == 1 and "no features in" in proc.stdout and "draftflow phase first" in proc.stdout
    (tmp_path / "features" / "samples").mkdir(parents=True)
    proc = run(PHASES="variants", VARIANTS="eagle3.1")
    assert proc.returncode != 0 and "invalid choice: 'eagle3.1'" in proc.stderr
    assert not (tmp_path / "variants").exists()  # nothing was trained


def test_tp_equivalence_compares_features_and_steps_with_a_float32_reference(tmp_path):
    """The TP-against-single-device script on CPU: bf16 runs add the float32 single-device
    run for scale; the reported differences are real (nonzero, as sharded sums differ)."""
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tp_equivalence.py"), "--samples", "4",
                           "--steps", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dtype"] == "bfloat16" and r["features"]["num_samples"] == 4 and r["metrics"]["steps"] == 2
    for part in (r["features"], r["single_float32_vs_single"]["features"]):
        assert all(0 < part[name]["rms_rel"] < 1 for name in ("aux_hidden", "last_hidden"))
    assert r["metrics"]["loss"]["sig_figs"] > 1.5 and "for scale" in proc.stdout
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tp_equivalence.py"), "--device", "cuda",
                              "--tp", "64", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--tp 64: this host has" in refused.stderr
