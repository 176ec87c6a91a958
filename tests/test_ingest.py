"""`draftflow ingest`: existing features (SpecForge .ckpt, DraftFlow files) into a store."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from draftflow.cli import main
from draftflow.config import load_config
from draftflow.features_codec import decode_features
from draftflow.ingest import read_feature_file
from draftflow.roles import run_ingest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
ENV = {"DRAFTFLOW_SECRET": "ingest-secret"}
FP8 = torch.float8_e4m3fn


def specforge_files(folder: Path, n: int = 6, hidden: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        t = 20 + i
        torch.save({"input_ids": torch.randint(0, 259, (1, t), generator=g),
                    "loss_mask": torch.cat([torch.zeros(1, 5), torch.ones(1, t - 5)], 1).long(),
                    "hidden_state": torch.randn(1, t, hidden, generator=g),
                    "aux_hidden_state": torch.randn(1, t, 3 * hidden, generator=g)}, folder / f"data_{i}.ckpt")


def cfg_for(tmp: Path, *extra: str):
    return load_config([TINY], ["features.backend=shared_dir", f"features.root={tmp / 'store'}",
                                f"train.output_dir={tmp / 'run'}", "train.max_steps=3", "train.progress=false",
                                "train.tensorboard=false", *extra])


def test_specforge_features_are_ingested_and_trained_on(tmp_path):
    specforge_files(tmp_path / "sf")
    result = run_ingest(cfg_for(tmp_path), tmp_path / "sf", environ=ENV)
    assert result.num_samples == 6
    env = {**os.environ, **ENV}
    proc = subprocess.run([sys.executable, "-m", "draftflow", "train", "--role", "consumer", "-c", TINY,
                           "features.backend=shared_dir", f"features.root={tmp_path / 'store'}",
                           f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.progress=false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    # a second ingest of the same files resumes the same sealed run: idempotent
    assert run_ingest(cfg_for(tmp_path), tmp_path / "sf", environ=ENV).num_samples == 6


def test_draftflow_sample_files_round_trip_through_ingest(tmp_path):
    specforge_files(tmp_path / "sf", n=3)
    run_ingest(cfg_for(tmp_path), tmp_path / "sf", environ=ENV)
    second = cfg_for(tmp_path / "b")
    run_ingest(second, tmp_path / "store" / "samples", environ=ENV)
    a = read_feature_file(tmp_path / "store" / "samples" / "s000001.safetensors", torch.bfloat16)
    b = read_feature_file(tmp_path / "b" / "store" / "samples" / "s000001.safetensors", torch.bfloat16)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_stores_ingest_from_and_into_other_dtypes(tmp_path):
    """SpecForge float32 -> an FP8 store (scaled on the way in) -> a bf16 store (decoded)."""
    specforge_files(tmp_path / "sf", n=2)
    run_ingest(cfg_for(tmp_path / "fp8", "features.dtype=float8_e4m3fn"), tmp_path / "sf", environ=ENV)
    stored = read_feature_file(tmp_path / "fp8" / "store" / "samples" / "s000001.safetensors", FP8)
    assert stored["aux_hidden"].dtype == FP8 and stored["aux_hidden_scale"].shape == (21, 3)
    run_ingest(cfg_for(tmp_path / "bf16"), tmp_path / "fp8" / "store" / "samples", environ=ENV)
    back = read_feature_file(tmp_path / "bf16" / "store" / "samples" / "s000001.safetensors", torch.bfloat16)
    assert sorted(back) == ["aux_hidden", "input_ids", "last_hidden", "loss_mask"]
    expected = decode_features(stored, torch.float32)
    assert torch.equal(back["aux_hidden"], expected["aux_hidden"].to(torch.bfloat16))
    original = torch.load(tmp_path / "sf" / "data_1.ckpt")["aux_hidden_state"][0]
    assert (back["aux_hidden"].float() - original).norm() / original.norm() < 0.04


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_ckpt_with_arbitrary_objects_is_refused_without_unpickling(tmp_path):
    (tmp_path / "sf").mkdir()
    torch.save({"input_ids": torch.zeros(3), "payload": Evil()}, tmp_path / "sf" / "bad.ckpt")
    with pytest.raises(ValueError, match="bad.ckpt.*refused"):
        run_ingest(cfg_for(tmp_path), tmp_path / "sf", environ=ENV)


def test_ckpt_with_missing_keys_or_wrong_hidden_size_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "sf").mkdir()
    torch.save({"input_ids": torch.zeros(1, 4)}, tmp_path / "sf" / "a.ckpt")
    with pytest.raises(ValueError, match="a.ckpt.*missing key"):
        run_ingest(cfg_for(tmp_path), tmp_path / "sf", environ=ENV)
    specforge_files(tmp_path / "sf2", n=1, hidden=32)
    with pytest.raises(ValueError, match="hidden size 32.*hidden_size 64"):
        run_ingest(cfg_for(tmp_path), tmp_path / "sf2", environ=ENV)
    monkeypatch.setenv("DRAFTFLOW_SECRET", ENV["DRAFTFLOW_SECRET"])
    code = main(["ingest", "-c", TINY, "--from", str(tmp_path / "nothing-here")])
    assert code == 2 and "no such folder" in capsys.readouterr().err


def test_store_ls_verify_and_gc_through_the_cli(tmp_path, capsys, monkeypatch):
    specforge_files(tmp_path / "sf", n=2)
    run_ingest(cfg_for(tmp_path), tmp_path / "sf", environ=ENV)
    args = ["-c", TINY, "features.backend=shared_dir", f"features.root={tmp_path / 'store'}"]
    assert main(["store", "ls", *args]) == 0
    assert "sealed (2 refs)" in capsys.readouterr().out
    monkeypatch.setenv("DRAFTFLOW_SECRET", ENV["DRAFTFLOW_SECRET"])
    assert main(["store", "verify", *args]) == 0
    sample = tmp_path / "store" / "samples" / "s000000.safetensors"
    data = bytearray(sample.read_bytes())
    data[-3] ^= 0xFF
    sample.write_bytes(bytes(data))
    assert main(["store", "verify", *args]) == 1
    assert "s000000" in capsys.readouterr().out
    assert main(["store", "gc", *args, "--what", "all"]) == 0
    assert not (tmp_path / "store" / "samples").exists() or not list((tmp_path / "store" / "samples").iterdir())
