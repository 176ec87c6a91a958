"""Online training (features.backend memory): the target runs in the training job and
its features never touch disk. Real `draftflow` processes and real tiny targets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from draftflow.capture.capture import resolve_device_dtype
from draftflow.capture.online import CapturingSource, check_online_fits, online_memory_need
from draftflow.capture.parallel import plan_capture
from draftflow.capture.target import load_target, resolve_aux_layer_ids
from draftflow.config import load_config
from draftflow.control.binding import RunKeys
from draftflow.roles import plan_data, run_colocated, target_hf_config
from draftflow.stores.memory import MemoryStore
from draftflow.train.batches import FeatureLoader, SampleOrder
from draftflow.train.model import DraftModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
# 21 samples, 4 per step: the runs cross epochs mid-step, and step 6 trains one sample
# twice (the end of epoch 1 and the start of epoch 2), so it is captured and put twice.
COMMON = ["data.max_samples=21", "train.batch_size=4", "train.log_every=1", "train.progress=false",
          "train.tensorboard=false"]


def draftflow(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "draftflow", *args], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def train(tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    return draftflow("train", "-c", TINY, f"features.root={tmp / 'feat'}", f"train.output_dir={tmp / name}",
                     *COMMON, *extra)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def step_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "data_wait_share")} for r in rows]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> Path:
    """The offline colocated run (features captured into a local store first)."""
    tmp = tmp_path_factory.mktemp("offline")
    finish(train(tmp, "run", "train.max_steps=16", "train.save_every=2"))
    return tmp / "run"


def test_online_run_trains_the_offline_draft_bit_for_bit_and_writes_no_features(tmp_path, offline):
    # capture.batch_tokens 4096 packs several samples per forward offline; online
    # captures each step's samples, padded to the same lengths (capture.padded_lengths)
    finish(train(tmp_path, "online", "features.backend=memory", "train.max_steps=16", "train.save_every=2"))
    assert_same_weights(weights(tmp_path / "online"), weights(offline))
    assert step_metrics(tmp_path / "online") == step_metrics(offline)
    assert not (tmp_path / "feat").exists()  # no feature file, no store record


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*")
            if (p / "meta.json").exists()]


def test_killed_online_run_resumes_to_the_uninterrupted_weights(tmp_path, offline):
    run = tmp_path / "online"
    extra = ("features.backend=memory", "train.max_steps=16", "train.save_every=2", "train.keep_checkpoints=0")
    proc = train(tmp_path, "online", *extra)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(s >= 4 for s in _checkpoint_steps(run)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (run / "final").exists(), "the run finished before it could be killed"
    killed_at = max(_checkpoint_steps(run))
    assert 4 <= killed_at < 16
    finish(train(tmp_path, "online", *extra))  # resumes from the newest checkpoint
    assert_same_weights(weights(run), weights(offline))
    # the resumed run logged every step once more from its checkpoint on, with the same numbers
    assert step_metrics(run)[-1] == step_metrics(offline)[-1]


def _tiny_online(tmp_path: Path, max_bytes: int):
    cfg = load_config([TINY], [f"train.output_dir={tmp_path}", "data.max_samples=22"])
    hf_config = target_hf_config(cfg)
    plan = plan_data(cfg, hf_config.vocab_size)
    aux = resolve_aux_layer_ids(cfg.target, hf_config.num_hidden_layers)
    device, dtype = resolve_device_dtype(cfg.capture)
    target = load_target(cfg.target, device, dtype, plan_capture(cfg.capture, hf_config, 1, 0, device))
    store = MemoryStore(RunKeys(b"k" * 32, "memory"), max_bytes)
    return store, CapturingSource(target, aux, plan.prepared.train, store, cfg.capture, torch.bfloat16)


@pytest.mark.parametrize("max_bytes", [1, 1 << 30])
def test_online_features_stay_in_a_bounded_ring(tmp_path, max_bytes):
    """The capture thread runs at most two steps ahead of the loader, the store holds
    at most the bound (or the one micro-batch the loader waits for), and every sample
    is freed once batched; the batches follow the seeded order."""
    store, source = _tiny_online(tmp_path, max_bytes)
    order = SampleOrder(num_samples=source.num_samples, seed=0, batch_size=4, grad_accum=2)
    steps = 9  # 72 sample reads over 22 samples; steps 6 and 9 hold a sample twice
    assert [s for s in range(steps) if len(set(sum(order.micro_batches(s), []))) < 8] == [5, 8]
    source.start(order, 0, steps)
    loader = FeatureLoader(store, source, order, 0, steps)
    most_ahead = 0
    try:
        for step in range(steps):
            time.sleep(0.2)  # a slow trainer: the capture thread runs as far ahead as it may
            most_ahead = max(most_ahead, source._unresolved)
            batches = loader.next(step)
            expected = [[f"s{i:06d}" for i in micro] for micro in order.micro_batches(step)]
            assert [list(b.sample_ids) for b in batches] == expected
    finally:
        loader.close()
        source.close()
    assert most_ahead <= 2 * 8 and source.most_unresolved <= 2 * 8  # two steps of 2 x 4 samples
    assert store.held_bytes == 0  # every sample freed
    # at most 384 tokens per sample (data.max_length); a token's features: int64 id,
    # uint8 mask, 3 + 1 hidden states of 64 bfloat16
    micro_batch = 4 * 384 * (8 + 1 + 4 * 64 * 2)
    if max_bytes == 1:  # while the loader waits, the rest of its step comes in; else one at a time
        assert store.peak_bytes <= 3 * micro_batch
    else:
        assert 0 < store.peak_bytes <= 3 * 2 * micro_batch  # the two steps ahead and the one being batched


def test_memory_store_checks_room_and_puts_in_one_step():
    """A second put of a held sample takes no bytes and does not wait; a new sample
    waits for room and goes in once a release makes it; a closed store takes nothing.
    Check and put are one step, so a release between them cannot let a sample in past
    the bound (before, the capture thread looked the sample up, then put it)."""
    import threading

    store = MemoryStore(RunKeys(b"k" * 32, "memory"), max_bytes=64)
    a = {"input_ids": torch.zeros(16, dtype=torch.int32)}  # 64 bytes: the whole bound
    ref_a = store.put_when_room("a", 0, a)
    assert store.put_when_room("a", 0, a) == ref_a and store.held_bytes == 64  # shared, no wait
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.put_when_room("b", 1, a)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and store.held_bytes == 64  # no room for b
    store.release(store.get(ref_a))
    waiter.join(0.2)
    assert waiter.is_alive()  # a is still held once (put twice)
    store.release(store.get(ref_a))
    waiter.join(5)
    assert not waiter.is_alive() and got[0].sample_id == "b" and store.held_bytes == 64 == store.peak_bytes
    store.close()
    assert store.put_when_room("c", 2, a) is None and store.held_bytes == 0


def test_online_capture_failure_reaches_the_trainer(tmp_path):
    store, source = _tiny_online(tmp_path, 1 << 30)
    source.pad_to = {}  # every lookup of a padded length fails inside the capture thread
    order = SampleOrder(num_samples=source.num_samples, seed=0, batch_size=4, grad_accum=1)
    source.start(order, 0, 2)
    with pytest.raises(Exception, match="online capture failed: KeyError"):
        source.resolve(order.micro_batches(0)[0][0])
    source.close()


def test_memory_backend_is_refused_for_disaggregated_roles_commands_that_keep_features_and_tp(tmp_path):
    base = [f"train.output_dir={tmp_path / 'run'}", "features.backend=memory", "train.max_steps=1"]
    for role in ("producer", "consumer"):
        proc = draftflow("train", "-c", TINY, "--role", role, *base)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "lives inside one job" in err and "--role colocated" in err
    for command in (["capture"], ["store", "ls"], ["ingest", "--from", str(tmp_path)]):
        proc = draftflow(*command, "-c", TINY, *base[:2])
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "features.backend memory holds them only inside an online" in err, err
    with pytest.raises(ValueError, match="capture.parallel: tp is not available online"):
        run_colocated(load_config([TINY], [*base, "capture.parallel=tp"]))


def test_online_run_that_does_not_fit_the_card_names_its_need_and_the_modes_to_use():
    llama8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256)
    draft = DraftModelConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, vocab_size=128256, draft_vocab_size=32000, target_hidden_size=4096,
                             rms_norm_eps=1e-5, max_position_embeddings=8192, aux_layer_ids=(1, 15, 28))
    need = online_memory_need(llama8b, torch.bfloat16, draft)
    assert 15.5e9 < need.target_bytes < 16.5e9  # 8.03B parameters in bfloat16
    check_online_fits(need, torch.device("cuda:0"), card_bytes=141 << 30)  # an H200 holds both
    with pytest.raises(ValueError, match=r"(?s)target's weights take 15\.0 GiB.*of cuda:0's 24\.0 GiB.*"
                                         r"features\.backend local.*disaggregated"):
        check_online_fits(need, torch.device("cuda:0"), card_bytes=24 << 30)


def test_online_fp8_features_train_the_offline_fp8_draft_bit_for_bit(tmp_path):
    """features.dtype float8_e4m3fn: online scales each sample as offline capture stores it."""
    extra = ("features.dtype=float8_e4m3fn", "data.max_samples=12", "train.max_steps=4")
    finish(train(tmp_path, "offline", *extra))
    finish(train(tmp_path, "online", *extra, "features.backend=memory"))
    assert_same_weights(weights(tmp_path / "online"), weights(tmp_path / "offline"))


def test_two_rank_online_run_trains_the_two_rank_offline_draft_bit_for_bit(tmp_path):
    """Under torchrun each rank captures the samples of its own shard of every step."""
    def torchrun(name: str, *extra: str, port: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "draftflow", "train", "-c", TINY, f"features.root={tmp_path / 'feat'}",
               f"train.output_dir={tmp_path / name}", "data.max_samples=16", "train.max_steps=6",
               "train.batch_size=2", "train.progress=false", "train.tensorboard=false", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun("offline", port=29561)
    torchrun("online", "features.backend=memory", port=29562)
    assert_same_weights(weights(tmp_path / "online"), weights(tmp_path / "offline"))
    for rank in range(2):  # each rank trained the same samples at the same steps
        assert ((tmp_path / "online" / f"samples.rank{rank}.jsonl").read_text()
                == (tmp_path / "offline" / f"samples.rank{rank}.jsonl").read_text())
