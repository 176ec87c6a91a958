"""The command line as a user runs it: the tiny example end to end, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from draftflow.cli import main
from draftflow.export import EXPORT_NAMES
from draftflow.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")


def test_tiny_example_trains_and_exports_through_the_cli(tmp_path):
    out, feat = tmp_path / "run", tmp_path / "feat"
    proc = subprocess.run([sys.executable, "-m", "draftflow", "train", "-c", TINY, f"train.output_dir={out}",
                           f"features.root={feat}", "train.progress=false"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DraftFlow run summary" in proc.stdout
    metrics = read_metrics(out / "metrics.jsonl")
    assert {"step", "loss", "lr", "acc_0", "acc_in_vocab_0", "ploss_0", "accept_0", "loss_tokens"} <= metrics[0].keys()
    assert all(m["acc_0"] <= m["acc_in_vocab_0"] for m in metrics)
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert last < first * 0.9, (first, last)
    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(EXPORT_NAMES)
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["hidden_size"] == 64
    assert (out / "training_curve.png").stat().st_size > 0
    assert list((out / "tensorboard").iterdir())

    # export of any checkpoint, through the CLI
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "exported")]) == 0
    with safe_open(str(tmp_path / "exported" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(EXPORT_NAMES)

    # the trained draft evaluated with its target, as the evaluation issue checks it
    proc = subprocess.run([sys.executable, "-m", "draftflow", "evaluate", "-c", TINY, f"features.root={feat}",
                           "--draft", str(out / "final"), "--json", str(tmp_path / "tau.json"),
                           "--num-prompts", "4", "--max-new-tokens", "16"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tau.json").read_text())["prompt_sets"]["heldout"]["depths"]["5"]
    assert result["lossless"] is True and result["tau"] >= 1.0
    assert len(result["per_depth"]) == result["depth"] == 5 and result["prompt_set"] == "heldout"

    # the draft card: what it was trained for, and the evaluation just run on it
    card = json.loads((out / "final" / "draftflow.json").read_text())
    assert card["layers"]["trained_outputs"] == [1, 3, 4] and card["layers"]["as_layer_inputs"] == [2, 4, 5]
    assert card["target"]["model_type"] == "llama" and card["training"]["final_metrics"]["step"] == metrics[-1]["step"]
    assert [(e["prompt_set"], e["tau"]) for e in card["evaluations"]] == [("heldout", result["tau"])]
    exported_card = json.loads((tmp_path / "exported" / "draftflow.json").read_text())
    assert exported_card["target"] == card["target"] and exported_card["tokenizer"] == card["tokenizer"]

    # ... which evaluate checks against the target it is given
    proc = subprocess.run([sys.executable, "-m", "draftflow", "evaluate", "-c", TINY, f"features.root={feat}",
                           "target.random.intermediate_size=96", "--draft", str(out / "final"),
                           "--num-prompts", "1", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2 and "draftflow.json: target.config_hash is" in proc.stderr, proc.stderr[-2000:]


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_config_key_is_named(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "-c", TINY, "train.max_stepz=3")
    assert code == 2 and "train.max_stepz" in err


def test_unknown_key_in_a_file_names_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("draft:\n  ttt_lenght: 3\n")
    code, err = run_cli(capsys, "train", "-c", TINY, "-c", str(bad))
    assert code == 2 and "bad.yaml" in err and "draft.ttt_lenght" in err


@pytest.mark.parametrize("override, message", [
    ("train.compile=maybe", "train.compile: 'maybe', expected one of auto, true, false"),
    ("train.recompute=sometimes", "train.recompute: 'sometimes', expected one of auto, always, never")])
def test_a_bad_training_option_is_named_before_any_work(capsys, tmp_path, override, message):
    code, err = run_cli(capsys, "train", "-c", TINY, f"features.root={tmp_path / 'feat'}", override)
    assert code == 2 and message in err
    assert not (tmp_path / "feat").exists()  # refused at load: nothing captured


def test_a_setting_the_backend_ignores_is_logged_once_at_load(capsys, caplog, tmp_path):
    code = main(["store", "ls", "-c", TINY, f"features.root={tmp_path}", "features.mooncake.protocol=rdma"])
    assert code == 0
    ignored = [r for r in caplog.records if r.name == "draftflow" and r.levelname == "WARNING"]
    assert [r.getMessage() for r in ignored] == [
        "features.mooncake.protocol: ignored by features.backend local (read by mooncake only)"]


def test_unknown_role_is_refused(capsys):
    code, err = run_cli(capsys, "train", "-c", TINY, "--role", "trainer")
    assert code == 2 and "unknown role 'trainer'" in err


def test_missing_config_file_is_named(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "-c", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


def test_target_folder_without_config_json(capsys, tmp_path):
    (tmp_path / "model").mkdir()
    code, err = run_cli(capsys, "train", "-c", TINY, "target.random=null", f"target.path={tmp_path / 'model'}")
    assert code == 2 and "config.json" in err and str(tmp_path / "model") in err


def test_malformed_jsonl_in_strict_mode_names_the_line(capsys, tmp_path):
    data = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text(good + "\n{not json\n")
    code, err = run_cli(capsys, "prepare", "-c", TINY, f"data.sources=[{data}]", "data.strict=true",
                        "data.num_heldout=0", f"features.root={tmp_path / 'f'}")
    assert code == 2 and "chats.jsonl:2" in err


def test_export_of_a_folder_without_checkpoint(capsys, tmp_path):
    code, err = run_cli(capsys, "export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "no checkpoint" in err


# ---- store verify and I/O messages, with real producer processes ----------------------

def producer(tmp_path, root, *extra, prefix=()):
    env = {**os.environ, "DRAFTFLOW_SECRET": "cli-test-secret"}
    return subprocess.run([sys.executable, *prefix, "train", "-c", TINY, "--role", "producer",
                           "features.backend=shared_dir", f"features.root={root}", "data.max_samples=4",
                           "train.progress=false", *extra], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


def verify(capsys, monkeypatch, root) -> tuple[int, str]:
    monkeypatch.setenv("DRAFTFLOW_SECRET", "cli-test-secret")
    code = main(["store", "verify", "-c", TINY, "features.backend=shared_dir", f"features.root={root}"])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_store_verify_reports_a_run_its_producer_marked_failed(tmp_path, capsys, monkeypatch):
    proc = producer(tmp_path, tmp_path / "feat", "capture.device=cuda:7", prefix=("-m", "draftflow"))
    assert proc.returncode == 2 and "capture.device" in proc.stderr, proc.stderr[-2000:]
    code, out = verify(capsys, monkeypatch, tmp_path / "feat")
    assert code == 1 and "marked run" in out and "failed after 0 refs" in out and "capture.device" in out
    assert "OK" not in out


def test_a_corrupt_sample_is_named_by_the_file_read_and_the_producers_uri(tmp_path, capsys, monkeypatch):
    proc = producer(tmp_path, tmp_path / "feat", prefix=("-m", "draftflow"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    moved = tmp_path / "mounted-elsewhere"
    (tmp_path / "feat").rename(moved)  # as a consumer host that mounts the store at another path
    sample = moved / "samples" / "s000001.safetensors"
    data = bytearray(sample.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sample.write_bytes(bytes(data))
    code, out = verify(capsys, monkeypatch, moved)
    assert code == 1 and "is corrupt in" in out
    assert f"corrupt in {sample} (published as {(tmp_path / 'feat' / 'samples' / sample.name).as_uri()})" in out


_FILE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (32768, 32768))  # the manifest fits, a sample file does not
from draftflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_feature_write_names_the_file(tmp_path):
    proc = producer(tmp_path, tmp_path / "feat", prefix=("-c", _FILE_LIMIT))
    assert proc.returncode == 2, proc.stderr[-2000:]
    named = f"[Errno 27] File too large: '{tmp_path / 'feat' / 'samples'}"
    assert named in proc.stderr
    assert named in (tmp_path / "feat" / "control" / "state.json").read_text()  # what waiting consumers see
