"""Disaggregated training with real processes: producer and consumer as separate
`draftflow` processes sharing only a feature store and a control directory."""

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

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
# 24 samples, 4 per step, 8 steps: the run crosses an epoch, so retain mode is exercised.
COMMON = ["data.max_samples=24", "train.max_steps=8", "train.batch_size=4", "train.log_every=1",
          "train.progress=false", "train.tensorboard=false", "features.wait_timeout_s=120"]
SECRET = "test-secret-1"


def draftflow(*args, secret=SECRET, **kw) -> subprocess.Popen:
    env = {**os.environ, "DRAFTFLOW_SECRET": secret} if secret else {
        k: v for k, v in os.environ.items() if k != "DRAFTFLOW_SECRET"}
    return subprocess.Popen([sys.executable, "-m", "draftflow", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def finish(proc: subprocess.Popen, timeout=300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def train(tmp: Path, role: str, *extra: str, secret=SECRET) -> subprocess.Popen:
    return draftflow("train", "-c", TINY, "--role", role, "features.backend=shared_dir",
                     f"features.root={tmp / 'feat'}", f"train.output_dir={tmp / role}", *COMMON, *extra,
                     secret=secret)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def colocated(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("colocated")
    code, _, err = finish(draftflow("train", "-c", TINY, f"features.root={tmp / 'feat'}",
                                    f"train.output_dir={tmp / 'run'}", *COMMON))
    assert code == 0, err[-2000:]
    return weights(tmp / "run")


def trained_by(run_dirs: list[Path]) -> list[list[str]]:
    """The sample ids each consumer trained, from its samples.rank0.jsonl audit log."""
    out = []
    for d in run_dirs:
        lines = (d / "samples.rank0.jsonl").read_text().splitlines()
        out.append([s for line in lines for s in json.loads(line)["samples"]])
    return out


def assert_once_each(trained: list[list[str]], num: int) -> None:
    assert sorted(trained[0] + trained[1]) == [f"s{i:06d}" for i in range(num)]  # all, each exactly once
    assert not set(trained[0]) & set(trained[1])


def kill_after_refs(producer: subprocess.Popen, journal: Path, num_refs: int) -> None:
    """SIGKILL the producer once it has journaled `num_refs` refs, mid-publish."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and producer.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= num_refs:
            break
        time.sleep(0.01)
    producer.send_signal(signal.SIGKILL)
    producer.wait()
    assert not (journal.parent / "state.json").exists(), "the producer finished before it could be killed"


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_consumer_started_before_producer_ends_bit_identical_to_colocated(tmp_path, colocated):
    consumer = train(tmp_path, "consumer")
    time.sleep(2)  # the consumer is up and waiting for a manifest
    code, _, err = finish(train(tmp_path, "producer"))
    assert code == 0, err[-2000:]
    code, out, err = finish(consumer)
    assert code == 0, err[-2000:]
    assert_same(weights(tmp_path / "consumer"), colocated)


def test_tampered_manifest_and_wrong_secret_are_refused(tmp_path):
    code, _, err = finish(train(tmp_path, "producer"))
    assert code == 0, err[-2000:]
    journal = tmp_path / "feat" / "control" / "refs.jsonl"
    original = journal.read_text()

    code, _, err = finish(train(tmp_path, "consumer", secret="another-secret"))
    assert code == 2 and "different secret" in err

    first = json.loads(original.splitlines()[0])
    edited = original.replace(f'"num_tokens":{first["ref"]["num_tokens"]}',
                              f'"num_tokens":{first["ref"]["num_tokens"] + 1}', 1)
    assert edited != original
    journal.write_text(edited)
    code, _, err = finish(train(tmp_path, "consumer"))
    assert code == 2 and "tamper" in err.lower() and "refs.jsonl" in err

    journal.write_text(original)
    code, _, err = finish(train(tmp_path, "consumer", secret=None))
    assert code == 2 and "DRAFTFLOW_SECRET" in err


def test_consumer_refuses_features_from_another_hidden_size(tmp_path):
    code, _, err = finish(train(tmp_path, "producer"))
    assert code == 0, err[-2000:]
    code, _, err = finish(train(tmp_path, "consumer", "target.random.hidden_size=96"))
    assert code == 2 and "hidden_size" in err


def test_producer_failure_reaches_a_waiting_consumer(tmp_path):
    consumer = train(tmp_path, "consumer")
    time.sleep(1)
    code, _, err = finish(train(tmp_path, "producer", "capture.device=cuda:7"))
    assert code != 0
    code, _, err = finish(consumer)
    assert code == 2 and "failed" in err and "capture.device" in err


def test_producer_killed_mid_publish_leaves_nothing_partial_and_rerun_completes(tmp_path, colocated):
    journal = tmp_path / "feat" / "control" / "refs.jsonl"
    producer = train(tmp_path, "producer")
    kill_after_refs(producer, journal, 3)
    # every visible sample file is complete and verifies; partial writes stay hidden temp files
    from draftflow.stores.sample_file import read_sample_file

    for path in (tmp_path / "feat" / "samples").glob("*.safetensors"):
        read_sample_file(path)
    code, _, err = finish(train(tmp_path, "producer"))  # rerun: resumes, seals
    assert code == 0, err[-2000:]
    code, _, err = finish(train(tmp_path, "consumer"))
    assert code == 0, err[-2000:]
    assert_same(weights(tmp_path / "consumer"), colocated)


def test_two_consumers_in_consume_once_mode_train_every_sample_exactly_once(tmp_path):
    once = ["features.release=consume_once", "train.max_steps=1000", "train.batch_size=2"]
    consumers = [draftflow("train", "-c", TINY, "--role", "consumer", "features.backend=shared_dir",
                           f"features.root={tmp_path / 'feat'}", f"train.output_dir={tmp_path / f'c{i}'}",
                           *COMMON, *once) for i in range(2)]
    code, _, err = finish(train(tmp_path, "producer", *once))
    assert code == 0, err[-2000:]
    for proc in consumers:
        code, _, err = finish(proc)
        assert code == 0, err[-2000:]
    assert_once_each(trained_by([tmp_path / "c0", tmp_path / "c1"]), 24)
    assert not list((tmp_path / "feat" / "samples").glob("*.safetensors"))  # freed once trained


def test_consumer_after_a_consume_once_stream_is_used_up_says_so_and_exports_nothing(tmp_path):
    once = ["features.release=consume_once", "train.max_steps=1000", "data.max_samples=8"]
    code, _, err = finish(train(tmp_path, "producer", *once))
    assert code == 0, err[-2000:]
    code, _, err = finish(train(tmp_path, "consumer", *once))  # trains all 8 samples
    assert code == 0, err[-2000:]
    late = tmp_path / "late"
    code, out, err = finish(train(tmp_path, "consumer", *once, f"train.output_dir={late}"))
    assert code == 2, err[-2000:]
    assert "nothing left to train" in err and "already trained by other consumers" in err
    assert "fresh features.root" in err and "Traceback" not in err
    assert not (late / "final").exists() and not (late / "checkpoints").exists()  # no untrained draft


MOONCAKE_SIZES = ["features.mooncake.segment_bytes=134217728", "features.mooncake.buffer_bytes=16777216"]


@pytest.fixture(scope="module")
def mooncake_yaml(tmp_path_factory):
    """`draftflow store serve` in the background for the module: a real master and
    segment holder on loopback; yields the client config snippet it wrote."""
    pytest.importorskip("mooncake.store", reason="mooncake-transfer-engine-non-cuda is not installed")
    store_yaml = tmp_path_factory.mktemp("mooncake") / "store.yaml"
    server = draftflow("store", "serve", "--backend", "mooncake", "--config-out", str(store_yaml), *MOONCAKE_SIZES)
    try:
        deadline = time.monotonic() + 60
        while not store_yaml.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-2000:]
            time.sleep(0.2)
        yield store_yaml
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def mooncake_role(tmp: Path, store_yaml: Path, role: str, *extra: str) -> subprocess.Popen:
    return draftflow("train", "--role", role, "-c", TINY, "-c", str(store_yaml), f"features.root={tmp / 'control'}",
                     f"train.output_dir={tmp / role}", *MOONCAKE_SIZES, *COMMON, *extra)


def test_mooncake_producer_then_consumer_bit_identical_to_colocated(tmp_path, colocated, mooncake_yaml):
    """A producer that exits before its consumer starts (the holder keeps the data);
    the consumer ends bit-identical to the colocated run."""
    code, _, err = finish(mooncake_role(tmp_path, mooncake_yaml, "producer"))
    assert code == 0, err[-2000:]
    code, _, err = finish(mooncake_role(tmp_path, mooncake_yaml, "consumer"))
    assert code == 0, err[-2000:]
    assert_same(weights(tmp_path / "consumer"), colocated)


def test_mooncake_two_consumers_consume_once_train_every_sample_exactly_once(tmp_path, mooncake_yaml):
    once = ["features.release=consume_once", "train.max_steps=1000", "train.batch_size=2"]
    consumers = [mooncake_role(tmp_path, mooncake_yaml, "consumer", *once, f"train.output_dir={tmp_path / f'c{i}'}")
                 for i in range(2)]
    code, _, err = finish(mooncake_role(tmp_path, mooncake_yaml, "producer", *once))
    assert code == 0, err[-2000:]
    for proc in consumers:
        code, _, err = finish(proc)
        assert code == 0, err[-2000:]
    assert_once_each(trained_by([tmp_path / "c0", tmp_path / "c1"]), 24)


def test_mooncake_killed_producer_rerun_keeps_parity(tmp_path, colocated, mooncake_yaml):
    journal = tmp_path / "control" / "control" / "refs.jsonl"
    producer = mooncake_role(tmp_path, mooncake_yaml, "producer")
    kill_after_refs(producer, journal, 3)
    code, _, err = finish(mooncake_role(tmp_path, mooncake_yaml, "producer"))
    assert code == 0, err[-2000:]
    code, _, err = finish(mooncake_role(tmp_path, mooncake_yaml, "consumer"))
    assert code == 0, err[-2000:]
    assert_same(weights(tmp_path / "consumer"), colocated)
