"""FP8 features: encode/decode error bounds, scales covered by checksums, an FP8 run end
to end, and the refusals (another dtype than the store's, a torch without FP8)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from draftflow.config import load_config
from draftflow.control.binding import StoreFill, open_store_record
from draftflow.control.manifest import ManifestError, ManifestHeader, ProvenanceMismatchError, check_provenance
from draftflow.features_codec import FP8_MAX, decode_features, encode_features, storage_dtype
from draftflow.records import Provenance
from draftflow.roles import run_colocated
from draftflow.stores.admin import verify_store
from draftflow.stores.base import ChecksumError
from draftflow.stores.sample_file import read_header
from draftflow.stores.shared_dir import SharedDirStore
from draftflow.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
FP8 = torch.float8_e4m3fn
SECRET = b"fp8-secret"
PROV = Provenance(target="random:x", target_config_hash="h", tokenizer_hash="t", hidden_size=8, vocab_size=100,
                  aux_layer_ids=(0, 1, 2), feature_dtype="float8_e4m3fn", data_hash="d", producer_version="0.1.0")


def tiny_config(tmp: Path, *overrides: str):
    return load_config([TINY], [f"features.root={tmp / 'feat'}", f"train.output_dir={tmp / 'run'}",
                                "train.progress=false", "train.tensorboard=false", "train.log_every=1", *overrides])


def features(num_tokens: int = 40, hidden: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hidden states shaped like a real target's: the three aux layers differ in scale
    by 30x, one channel carries a large outlier, one token is all zeros."""
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(num_tokens, 3 * hidden, generator=g) * torch.tensor([0.1, 3.0, 1.0]).repeat_interleave(hidden)
    aux[:, hidden + 2] *= 40.0
    aux[5] = 0.0
    last = torch.randn(num_tokens, hidden, generator=g) * 5.0
    return {"input_ids": torch.arange(num_tokens), "loss_mask": torch.ones(num_tokens, dtype=torch.uint8),
            "aux_hidden": aux, "last_hidden": last}


def test_round_trip_error_is_within_fp8_rounding_of_each_token_and_layer():
    x = features()
    stored = encode_features(x, FP8)
    assert stored["aux_hidden"].dtype == FP8 and stored["aux_hidden_scale"].shape == (40, 3)
    assert stored["last_hidden"].dtype == FP8 and stored["last_hidden_scale"].shape == (40, 1)
    back = decode_features(stored, torch.float32)
    assert set(back) == set(x)  # the scales are gone, the other features untouched
    assert torch.equal(back["input_ids"], x["input_ids"]) and torch.equal(back["loss_mask"], x["loss_mask"])
    for name, groups in (("aux_hidden", 3), ("last_hidden", 1)):
        orig = x[name].reshape(40, groups, -1)
        err = (back[name].reshape(40, groups, -1) - orig).abs()
        amax = orig.abs().amax(-1, keepdim=True)
        # Half an FP8 ulp: 2^-4 of the value for normal numbers, 2^-10 of the scale below them.
        assert bool((err <= orig.abs() * 2**-4 + amax / FP8_MAX * 2**-10 + 1e-6).all()), name
        # each token and layer is scaled on its own: its largest value is kept exactly
        assert bool((err.amax(-1) <= amax.squeeze(-1) / 28 + 1e-6).all())
    assert torch.equal(back["aux_hidden"][5], torch.zeros(24))  # an all-zero token stays exact
    # The small first layer keeps its own precision (one scale per token would lose it to the outlier).
    first = slice(0, 8)
    rel = (back["aux_hidden"][:, first] - x["aux_hidden"][:, first]).norm() / x["aux_hidden"][:, first].norm()
    assert rel < 0.04


def test_decode_to_bfloat16_and_refusals_of_broken_samples():
    stored = encode_features(features(), FP8)
    assert decode_features(stored, torch.bfloat16)["aux_hidden"].dtype == torch.bfloat16
    plain = encode_features(features(), torch.bfloat16)
    assert set(plain) == set(features()) and plain["aux_hidden"].dtype == torch.bfloat16
    assert decode_features(plain, torch.float32)["aux_hidden"] is plain["aux_hidden"]  # no copy
    without_scale = {k: v for k, v in stored.items() if k != "last_hidden_scale"}
    with pytest.raises(ValueError, match="sample 'x'.*'last_hidden' is torch.float8_e4m3fn with no "
                                         "'last_hidden_scale'"):
        decode_features(without_scale, torch.float32, "sample 'x'")
    with pytest.raises(ValueError, match="'aux_hidden_scale' has shape \\[40, 5\\]"):
        decode_features({**stored, "aux_hidden_scale": torch.ones(40, 5)}, torch.float32)
    bad = features()
    bad["last_hidden"][3, 1] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        encode_features(bad, FP8)


def test_a_tampered_scale_is_caught_by_its_checksum(tmp_path):
    keys, _ = open_store_record(tmp_path, SECRET, StoreFill(provenance=PROV, capture=(("batch_tokens", 64),)))
    store = SharedDirStore(dataclasses.replace(load_config().features, backend="shared_dir", root=str(tmp_path)),
                           keys)
    ref = store.put("s0", 0, encode_features(features(), FP8))
    assert ref.spec("aux_hidden").dtype == "float8_e4m3fn" and ref.spec("aux_hidden_scale").shape == (40, 3)
    assert torch.equal(store.get(ref).tensors["aux_hidden"].view(torch.uint8),
                       encode_features(features(), FP8)["aux_hidden"].view(torch.uint8))
    path = store.path_of("s0")
    with safe_open(str(path), "pt") as f:  # a standard safetensors file, FP8 included
        assert f.get_tensor("aux_hidden").dtype == FP8
    with open(path, "rb") as f:
        header, start = read_header(f, path)
    begin, _ = header["aux_hidden_scale"]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + begin + 3] ^= 0x01  # the top byte of the first scale: a 2x bigger token
    path.write_bytes(data)
    with pytest.raises(ChecksumError, match="feature 'aux_hidden_scale' is corrupt"):
        store.get(ref)
    assert any("aux_hidden_scale" in p for p in verify_store(tmp_path, SECRET))


def test_colocated_run_trains_from_fp8_features_end_to_end(tmp_path):
    common = ("train.max_steps=3", "data.max_samples=8", "train.batch_size=2")
    fp8 = run_colocated(tiny_config(tmp_path / "fp8", "features.dtype=float8_e4m3fn", *common))
    assert (fp8.final_dir / "model.safetensors").exists()
    sample = next((tmp_path / "fp8" / "feat" / "samples").glob("*.safetensors"))
    with safe_open(str(sample), "pt") as f:
        assert f.get_tensor("aux_hidden").dtype == FP8 and f.get_tensor("last_hidden_scale").dtype == torch.float32
        assert sorted(f.keys()) == ["aux_hidden", "aux_hidden_scale", "input_ids", "last_hidden",
                                    "last_hidden_scale", "loss_mask"]
    run_colocated(tiny_config(tmp_path / "f32", "features.dtype=float32", *common))
    a = read_metrics(tmp_path / "fp8" / "run" / "metrics.jsonl")
    b = read_metrics(tmp_path / "f32" / "run" / "metrics.jsonl")
    # same samples and order: the first loss differs only by the FP8 rounding of the features
    assert a[0]["loss"] != b[0]["loss"] and a[0]["loss"] == pytest.approx(b[0]["loss"], rel=0.02)


def test_a_store_of_another_feature_dtype_is_refused_naming_the_key(tmp_path):
    run_colocated(tiny_config(tmp_path, "train.max_steps=1", "data.max_samples=4"))
    fp8 = tiny_config(tmp_path, "train.max_steps=1", "data.max_samples=4", "features.dtype=float8_e4m3fn",
                      f"train.output_dir={tmp_path / 'run2'}")
    with pytest.raises(ManifestError, match="feature_dtype \\(features.dtype\\): store has 'bfloat16', "
                                            "this run has 'float8_e4m3fn'"):
        run_colocated(fp8)
    # a consumer: its config against the producer's manifest
    header = ManifestHeader(run_id="r", provenance=PROV, draft_vocab=(0, 1), num_samples=1, release="retain")
    with pytest.raises(ProvenanceMismatchError, match="feature_dtype \\(features.dtype\\): manifest has "
                                                      "'float8_e4m3fn', this config gives 'bfloat16'"):
        check_provenance(header, dataclasses.replace(PROV, feature_dtype="bfloat16"))


def test_fp8_on_a_torch_without_it_names_the_key_and_version(tmp_path, monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match=re.escape(f"features.dtype: float8_e4m3fn needs torch.float8_e4m3fn, "
                                                   f"which torch {torch.__version__} lacks")):
        storage_dtype("float8_e4m3fn")
    with pytest.raises(ValueError, match="features.dtype: float8_e4m3fn needs"):
        run_colocated(tiny_config(tmp_path, "features.dtype=float8_e4m3fn"))
    assert not (tmp_path / "feat" / "control").exists()  # refused before the store was opened
    assert storage_dtype("bfloat16") == torch.bfloat16
