"""Config loading: every number is range-checked and every enum-like string checked
against its choices as the config loads, naming the key; settings the chosen backend
ignores are named too."""

import dataclasses
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from draftflow.config import CHOICES, RANGES, Config, config_warnings, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")


def settings(cls=Config, prefix=""):
    """(dotted key, types it takes, default) of every setting, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from settings(tp, key + ".")
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        yield key, args, getattr(cls(), f.name)


def test_every_numeric_setting_has_a_range_and_its_default_is_in_it():
    fields = {key: default for key, args, default in settings() if int in args or float in args}
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


# ---- enum-like strings ----------------------------------------------------------------

# str settings whose value is a path, address or name, not one of a fixed set.
FREE_TEXT = {"target.path", "target.tokenizer", "target.chat_template", "target.cache_dir", "features.root",
             "features.secret_file",
             "features.mooncake.master", "features.mooncake.metadata_server", "features.mooncake.local_hostname",
             "features.mooncake.device_name", "features.mooncake.run_id", "train.output_dir"}


def test_every_string_setting_has_choices_or_is_free_text_and_its_default_is_a_choice():
    fields = {key: default for key, args, default in settings() if str in args}
    assert sorted(set(fields) - set(CHOICES) - FREE_TEXT) == []  # a new enum-like key needs its choices
    assert sorted(set(CHOICES) - set(fields)) == []
    for key in CHOICES:
        assert fields[key] in CHOICES[key], key


def test_every_backend_choice_is_a_store():
    from draftflow.stores import BACKENDS

    assert sorted(CHOICES["features.backend"]) == sorted(BACKENDS)


@pytest.mark.parametrize("override, message", [
    ("features.backend=s3", "features.backend: 's3', expected one of local, shared_dir, mooncake"),
    ("features.release=consume-once", "features.release: 'consume-once', expected one of auto, retain, consume_once"),
    ("features.dtype=fp16", "features.dtype: 'fp16', expected one of bfloat16, float16, float32, float8_e4m3fn"),
    ("features.dtype=auto", "features.dtype: 'auto', expected one of bfloat16, float16, float32, float8_e4m3fn"),
    ("features.mooncake.protocol=udp", "features.mooncake.protocol: 'udp', expected one of tcp, rdma"),
    ("capture.device=gpu", "capture.device: 'gpu', expected one of auto, cpu, cuda, cuda:N"),
    ("capture.device=cuda:x", "capture.device: 'cuda:x', expected one of auto, cpu, cuda, cuda:N"),
    ("capture.dtype=bf16", "capture.dtype: 'bf16', expected one of auto, bfloat16, float16, float32"),
    ("train.device=mps", "train.device: 'mps', expected one of auto, cpu, cuda, cuda:N"),
    ("train.recompute=sometimes", "train.recompute: 'sometimes', expected one of auto, always, never"),
    ("train.compile=maybe", "train.compile: 'maybe', expected one of auto, true, false"),
    ("train.compile=1", "train.compile: '1', expected one of auto, true, false"),
])
def test_a_value_outside_its_choices_is_refused_naming_the_key_and_the_choices(override, message):
    with pytest.raises(ValueError) as e:
        load_config([TINY], [override])
    assert message in str(e.value)


@pytest.mark.parametrize("override", [
    "features.backend=shared_dir", "features.backend=mooncake", "features.release=retain",
    "features.dtype=float32", "features.dtype=float8_e4m3fn", "features.mooncake.protocol=rdma", "capture.device=cpu",
    "capture.device=cuda:3",
    "capture.dtype=float16", "train.device=cuda", "train.recompute=never", "train.compile=false"])
def test_every_choice_is_accepted(override):
    load_config([TINY], [override])


def test_a_value_outside_its_choices_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("features:\n  release: consume-once\n")
    with pytest.raises(ValueError) as e:
        load_config([TINY, bad])
    assert str(e.value).startswith(f"config file {bad}: features.release: 'consume-once', expected one of")


# ---- settings the chosen backend ignores ---------------------------------------------

def test_consume_once_on_a_local_store_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^features.release: 'consume_once' needs features.backend shared_dir "
                                         r"or mooncake \(a local store is private to one job\)"):
        load_config([TINY], ["features.release=consume_once"])  # tiny.yaml: backend local


def test_consume_once_is_checked_on_the_merged_config(tmp_path):
    """A base file may set the policy for a backend that a later file or override picks."""
    base = tmp_path / "base.yaml"
    base.write_text("features:\n  release: consume_once\n")
    cfg = load_config([TINY, base], ["features.backend=shared_dir"])
    assert cfg.features.release == "consume_once"


def test_the_example_configs_set_nothing_their_backend_ignores():
    assert config_warnings(load_config([TINY])) == []
    assert config_warnings(load_config([str(ROOT / "examples" / "smollm2-sharegpt.yaml")])) == []


@pytest.mark.parametrize("overrides, warnings", [
    (["features.mooncake.protocol=rdma", "features.mooncake.segment_bytes=33554432"],
     ["features.mooncake.protocol: ignored by features.backend local (read by mooncake only)",
      "features.mooncake.segment_bytes: ignored by features.backend local (read by mooncake only)"]),
    (["features.backend=shared_dir", "features.mooncake.master=h:1"],
     ["features.mooncake.master: ignored by features.backend shared_dir (read by mooncake only)"]),
    (["features.backend=mooncake", "features.max_inflight_bytes=0"],
     ["features.max_inflight_bytes: ignored by features.backend mooncake (read by shared_dir and memory only)"]),
    (["features.backend=memory", "features.max_inflight_bytes=1024"],  # tiny.yaml sets features.root
     ["features.root: ignored by features.backend memory (read by local and shared_dir and mooncake only)"]),
    (["features.backend=shared_dir", "features.max_inflight_bytes=1024"],
     ["features.max_inflight_bytes: ignored with features.release auto (only a consume_once producer waits "
      "for consumers to free room)"]),
    (["features.wait_timeout_s=5", "features.claim_timeout_s=5"],
     ["features.wait_timeout_s: ignored by features.backend local (read by shared_dir and mooncake only)",
      "features.claim_timeout_s: ignored by features.backend local (read by shared_dir and mooncake only)"]),
    (["train.device=cuda:1"],
     ["train.device: the index of cuda:1 is ignored; each training process uses cuda:<LOCAL_RANK> "
      "(0 without torchrun): choose GPUs with CUDA_VISIBLE_DEVICES"]),
    # read where they are set: nothing to say
    (["features.backend=mooncake", "features.mooncake.protocol=rdma", "features.wait_timeout_s=5"], []),
    (["features.backend=shared_dir", "features.release=consume_once", "features.max_inflight_bytes=0"], []),
])
def test_a_setting_the_backend_ignores_is_named_in_a_warning(overrides, warnings):
    assert config_warnings(load_config([TINY], overrides)) == warnings
