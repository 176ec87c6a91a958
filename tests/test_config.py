"""Config loading: every number is range-checked as the config loads, naming the key."""

import dataclasses
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from draftflow.config import RANGES, Config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")


def numeric_fields(cls=Config, prefix=""):
    """(dotted key, default) of every int or float field, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, key + ".")
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if int in args or float in args:
            yield key, getattr(cls(), f.name)


def test_every_numeric_setting_has_a_range_and_its_default_is_in_it():
    fields = dict(numeric_fields())
    assert sorted(set(fields) - set(RANGES)) == []  # a new number needs its allowed range
    assert sorted(set(RANGES) - set(fields)) == []  # no range for a key that does not exist
    for key, default in fields.items():
        assert default is None or RANGES[key].holds(default), key


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size: 0 is out of range; expected an integer >= 1"),
    ("train.batch_size=-2", "train.batch_size: -2 is out of range; expected an integer >= 1"),
    ("train.grad_accum=0", "train.grad_accum: 0 is out of range; expected an integer >= 1"),
    ("train.max_steps=-5", "train.max_steps: -5 is out of range; expected an integer >= 1"),
    ("draft.ttt_length=0", "draft.ttt_length: 0 is out of range; expected an integer >= 1"),
    ("draft.vocab_size=-1", "draft.vocab_size: -1 is out of range; expected an integer >= 1"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: -1 is out of range; expected an integer >= 0 "
                                  "(0: keep every checkpoint)"),
    ("train.save_every=-3", "train.save_every: -3 is out of range; expected an integer >= 0 (0: only at the end)"),
    ("features.wait_timeout_s=-1", "features.wait_timeout_s: -1.0 is out of range; expected a finite number > 0"),
    ("features.claim_timeout_s=0", "features.claim_timeout_s: 0.0 is out of range; expected a finite number > 0"),
    ("train.lr=-1", "train.lr: -1.0 is out of range; expected a finite number > 0"),
    ("train.lr=.nan", "train.lr: nan is out of range"),
    (f"train.seed={10**400}", "train.seed: 1000"),  # too large for a float: still a ValueError
    ("features.wait_timeout_s=.inf", "features.wait_timeout_s: inf is out of range"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio: 1.5 is out of range; expected a finite number >= 0 and <= 1"),
    ("train.max_grad_norm=0", "train.max_grad_norm: 0.0 is out of range"),
    ("train.weight_decay=-0.1", "train.weight_decay: -0.1 is out of range"),
    ("train.warmup_steps=-1", "train.warmup_steps: -1 is out of range"),
    ("train.log_every=0", "train.log_every: 0 is out of range"),
    ("train.seed=-1", "train.seed: -1 is out of range; expected an integer >= 0 and <= 4294967295"),
    ("draft.loss_decay=0", "draft.loss_decay: 0.0 is out of range; expected a finite number > 0 and <= 1"),
    ("draft.num_attention_heads=0", "draft.num_attention_heads: 0 is out of range"),
    ("data.max_samples=0", "data.max_samples: 0 is out of range"),
    ("data.max_length=0", "data.max_length: 0 is out of range"),
    ("data.num_heldout=-1", "data.num_heldout: -1 is out of range"),
    ("capture.batch_tokens=0", "capture.batch_tokens: 0 is out of range"),
    ("features.max_inflight_bytes=-1", "features.max_inflight_bytes: -1 is out of range"),
    ("features.mooncake.chunk_bytes=0", "features.mooncake.chunk_bytes: 0 is out of range; expected an integer >= 64"),
    ("features.mooncake.buffer_bytes=1024", "features.mooncake.buffer_bytes: 1024 is out of range"),
    ("features.mooncake.full_timeout_s=0", "features.mooncake.full_timeout_s: 0.0 is out of range"),
])
def test_a_number_out_of_range_is_refused_naming_the_key_and_the_range(override, message):
    with pytest.raises(ValueError) as e:
        load_config([TINY], [override])
    assert message in str(e.value)


@pytest.mark.parametrize("override", [
    "train.warmup_steps=0", "train.save_every=0", "train.weight_decay=0", "train.keep_checkpoints=0",
    "train.min_lr_ratio=0", "train.min_lr_ratio=1", "draft.loss_decay=1", "data.num_heldout=0",
    "data.max_samples=null", "draft.hidden_size=null", "features.mooncake.chunk_bytes=null",
    "features.max_inflight_bytes=0", "features.mooncake.global_segment_size=0", "train.lr=1e-3"])
def test_boundary_values_that_mean_something_are_accepted(override):
    load_config([TINY], [override])


def test_a_number_out_of_range_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  grad_accum: 0\n")
    with pytest.raises(ValueError) as e:
        load_config([TINY, bad])
    assert "bad.yaml" in str(e.value) and "train.grad_accum: 0 is out of range" in str(e.value)


@pytest.mark.parametrize("override, message", [
    # these hung for minutes without output, or failed inside torch without the key
    ("train.batch_size=0", "train.batch_size: 0 is out of range; expected an integer >= 1"),
    ("train.grad_accum=0", "train.grad_accum: 0 is out of range; expected an integer >= 1"),
    ("train.lr=-1", "train.lr: -1.0 is out of range; expected a finite number > 0"),
])
def test_the_cli_refuses_a_bad_number_at_once_before_any_work(tmp_path, override, message):
    feat = tmp_path / "feat"
    proc = subprocess.run([sys.executable, "-m", "draftflow", "train", "-c", TINY, f"features.root={feat}",
                           f"train.output_dir={tmp_path / 'run'}", override],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not feat.exists() and not (tmp_path / "run").exists()  # refused at load: nothing captured
