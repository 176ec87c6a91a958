"""Mooncake Store backend against a real mooncake_master and segment holder on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("mooncake.store", reason="Mooncake is not installed: "
                    "apt-get install libibverbs1 && pip install mooncake-transfer-engine-non-cuda")

from draftflow.config import FeaturesConfig, MooncakeConfig, load_config  # noqa: E402
from draftflow.control.binding import RunKeys  # noqa: E402
from draftflow.records import SampleRef  # noqa: E402
from draftflow.stores.base import ChecksumError, StoreError, make_spec  # noqa: E402
from draftflow.stores.mooncake import (LeaseHeldError, MooncakeError, MooncakeStore, SampleMissingError,  # noqa: E402
                                       StoreFullError, _chunks, error_for, open_mooncake_store)
from draftflow.stores.mooncake_service import MooncakeService  # noqa: E402

SEGMENT_BYTES = 48 << 20
KEYS = RunKeys(b"mooncake-test-secret", "test-store")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def service():
    with MooncakeService(segment_bytes=SEGMENT_BYTES) as svc:
        yield svc


def features_cfg(service, tmp_path, **mooncake) -> FeaturesConfig:
    release = mooncake.pop("release", "retain")
    mc = MooncakeConfig(master=service.master, metadata_server=service.metadata_server,
                        buffer_bytes=mooncake.pop("buffer_bytes", 16 << 20), **mooncake)
    return FeaturesConfig(backend="mooncake", root=str(tmp_path), release=release, mooncake=mc)


@pytest.fixture
def open_store(service, tmp_path, request):
    """Open stores on the module's service; each test's run is cleaned up afterwards."""
    stores = []

    def _open(run_id=None, **mooncake):
        store = MooncakeStore(features_cfg(service, tmp_path, **mooncake), KEYS,
                              run_id=run_id or request.node.name[:60].replace("[", "_").replace("]", ""))
        stores.append(store)
        return store

    yield _open
    for store in stores:
        if store._client is not None:
            store.cleanup_run()
        store.close()


def sample(num_tokens=32, hidden=16, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 1000, (num_tokens,), generator=g),
            "loss_mask": (torch.rand(num_tokens, generator=g) > 0.5).to(torch.uint8),
            "aux_hidden": torch.randn(num_tokens, 3 * hidden, generator=g).to(torch.bfloat16),
            "last_hidden": torch.randn(num_tokens, hidden, generator=g).to(torch.bfloat16)}


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def overwrite_object(store, key: str, data: torch.Tensor) -> None:
    """Put `data` (uint8) under `key` with the raw client, replacing what is there."""
    base = store._pool.alloc(data.numel(), 1.0)
    store._pool.view(base, data.numel()).copy_(data)
    assert store._client.upsert_from(key, store._pool.ptr + base, data.numel(), store._pin) == 0
    store._pool.free(base, data.numel())


def test_put_get_round_trip_is_bit_exact(open_store):
    store = open_store()
    x = sample()
    ref = store.put("s0", 0, x)
    assert ref.uri.startswith(f"mooncake://{store.master}/{store.namespace}/s0/g")
    assert ref.features == tuple(make_spec(k, v) for k, v in x.items())  # same checksums as other stores
    lease = store.get(ref)
    for name, t in x.items():
        assert lease.tensors[name].dtype == t.dtype and raw_bytes(lease.tensors[name]) == raw_bytes(t)
    store.release(lease)
    with pytest.raises(StoreError, match="released twice"):
        store.release(lease)


def test_empty_sample_round_trips(open_store):
    store = open_store()  # Mooncake refuses 0-byte objects; empty features are not stored
    x = sample(num_tokens=0)
    lease = store.get(store.put("empty", 0, x))
    assert {k: tuple(v.shape) for k, v in lease.tensors.items()} == {k: tuple(v.shape) for k, v in x.items()}


def test_lookup_returns_the_latest_published_ref(open_store):
    store = open_store()
    assert store.lookup("s1", 1) is None
    first = store.put("s1", 1, sample(seed=1))
    assert store.lookup("s1", 1) == first
    second = store.put("s1", 1, sample(seed=2))  # a re-put draws a new generation, never rewrites keys
    assert second.uri != first.uri and store.lookup("s1", 1) == second
    with pytest.raises(StoreError, match="holds sample index 1, expected 7"):
        store.lookup("s1", 7)


def test_lookup_drops_a_sample_whose_features_are_gone(open_store):
    store = open_store()
    ref = store.put("s2", 2, sample())
    store._client.remove(store.feature_keys(ref)[0], True)
    assert store.lookup("s2", 2) is None
    assert store._client.is_exist(f"{store.namespace}/s2/ref") == 0


def test_data_survives_the_producer_process_exit(service, open_store, tmp_path):
    script = textwrap.dedent(f"""
        import json, torch
        from draftflow.config import FeaturesConfig, MooncakeConfig
        from draftflow.control.binding import RunKeys
        from draftflow.stores.mooncake import MooncakeStore
        cfg = FeaturesConfig(backend="mooncake", root={str(tmp_path)!r}, mooncake=MooncakeConfig(
            master={service.master!r}, metadata_server={service.metadata_server!r}, buffer_bytes=4 << 20))
        store = MooncakeStore(cfg, RunKeys(b"mooncake-test-secret", "test-store"), run_id="exit-test")
        x = {{"input_ids": torch.arange(8), "loss_mask": torch.ones(8, dtype=torch.uint8),
             "aux_hidden": torch.full((8, 6), 1.5, dtype=torch.bfloat16),
             "last_hidden": torch.full((8, 2), -2.0, dtype=torch.bfloat16)}}
        print(json.dumps(store.put("p0", 0, x).to_dict()))
        store.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    ref = SampleRef.from_dict(json.loads(out.strip().splitlines()[-1]))
    consumer = open_store(run_id="exit-test")
    lease = consumer.get(ref)
    assert torch.equal(lease.tensors["aux_hidden"], torch.full((8, 6), 1.5, dtype=torch.bfloat16))
    assert consumer.lookup("p0", 0) == ref


def test_get_detects_corrupted_bytes(open_store):
    store = open_store()
    ref = store.put("bad", 0, sample())
    key = next(k for k in store.feature_keys(ref) if k.endswith("/aux_hidden"))
    corrupt = torch.zeros(ref.spec("aux_hidden").num_bytes, dtype=torch.uint8)
    corrupt[0] = 1  # same size, wrong bytes, written raw under the feature's key
    overwrite_object(store, key, corrupt)
    with pytest.raises(ChecksumError, match="aux_hidden"):
        store.get(ref)
    assert store._pool._free == [(0, store._pool.num_bytes)]  # the failed get gave its range back


class CountingClient:
    """The Mooncake client, with its ranged reads recorded."""

    def __init__(self, client):
        self._client, self.reads = client, []

    def get_into_ranges(self, *args):
        self.reads.append(args)
        return self._client.get_into_ranges(*args)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_chunks_cut_the_byte_stream_in_order():
    assert _chunks([5, 0, 7], 4) == [[(0, 0, 4)], [(0, 4, 1), (2, 0, 3)], [(2, 3, 4)]]
    assert _chunks([8], 8) == [[(0, 0, 8)]] and _chunks([], 8) == [] and _chunks([0], 8) == []


def test_get_in_chunks_is_bit_exact_and_delete_removes_every_object(open_store):
    store = open_store(chunk_bytes=4096)
    x = sample(num_tokens=64, hidden=64)  # aux_hidden alone spans 6 chunks
    ref = store.put("ch0", 0, x)
    store._client = client = CountingClient(store._client)
    lease = store.get(ref)
    for name, t in x.items():
        assert raw_bytes(lease.tensors[name]) == raw_bytes(t)
    store.release(lease)
    total = sum(f.num_bytes for f in ref.features)
    read = [n for args in client.reads for n in [s for sizes in args[4][0] for s in sizes]]
    assert len(client.reads) == -(-total // 4096) and sum(read) == total  # one read per chunk, all bytes once
    keys = store.feature_keys(ref) + [f"{store.namespace}/ch0/ref"]
    store.delete(ref)
    assert store._client.batch_is_exist(keys) == [0] * len(keys)


def test_get_detects_a_corrupted_chunk(open_store):
    store = open_store(chunk_bytes=4096)
    x = sample(num_tokens=64, hidden=64)
    ref = store.put("bad1", 0, x)
    key = next(k for k in store.feature_keys(ref) if k.endswith("/aux_hidden"))
    data = torch.frombuffer(bytearray(raw_bytes(x["aux_hidden"])), dtype=torch.uint8)
    data[2 * 4096 + 5] ^= 1  # one bit in the third of its chunks
    overwrite_object(store, key, data)
    with pytest.raises(ChecksumError, match="sample 'bad1': feature 'aux_hidden' is corrupt"):
        store.get(ref)
    assert store._pool._free == [(0, store._pool.num_bytes)]


@pytest.mark.parametrize("feature", ["input_ids", "last_hidden"])  # first chunk fails / last chunk fails
def test_get_of_a_missing_object_fails_clearly_and_frees_its_range(open_store, feature):
    store = open_store(chunk_bytes=4096)
    ref = store.put("m0", 0, sample(num_tokens=64, hidden=64))
    assert store._client.remove(next(k for k in store.feature_keys(ref) if k.endswith(f"/{feature}")), True) == 0
    with pytest.raises(SampleMissingError, match=f"sample 'm0': get .*/{feature}: .*OBJECT_NOT_FOUND"):
        store.get(ref)
    assert store._pool._free == [(0, store._pool.num_bytes)]  # no chunk still being read into it
    x = sample(seed=3)
    assert raw_bytes(store.get(store.put("m1", 1, x)).tensors["aux_hidden"]) == raw_bytes(x["aux_hidden"])


def test_get_refuses_an_object_shorter_than_its_ref(open_store):
    store = open_store(chunk_bytes=4096)
    ref = store.put("short", 0, sample(num_tokens=64, hidden=64))
    key = next(k for k in store.feature_keys(ref) if k.endswith("/aux_hidden"))
    overwrite_object(store, key, torch.zeros(4096, dtype=torch.uint8))
    with pytest.raises(MooncakeError, match="sample 'short': get .*/aux_hidden: .*INVALID_PARAMS"):
        store.get(ref)


def test_consume_once_delete_after_training_removes_the_sample(open_store):
    store = open_store(release="consume_once")
    ref = store.put("c0", 0, sample())
    store.release(store.get(ref))
    assert store.lookup("c0", 0) == ref  # released but not yet trained: still there
    store.delete(ref)  # what the consume-once ref source does after the step
    assert store.lookup("c0", 0) is None
    with pytest.raises(SampleMissingError, match="'c0'.*OBJECT_NOT_FOUND"):
        store.get(ref)


def test_retain_mode_keeps_samples_for_more_epochs(open_store):
    store = open_store(release="auto")
    ref = store.put("r0", 0, sample())
    for _ in range(3):
        store.release(store.get(ref))
    assert store.lookup("r0", 0) == ref


def test_full_store_blocks_then_errors_instead_of_evicting(open_store):
    producer = open_store(run_id="full", full_timeout_s=0.3)
    consumer = open_store(run_id="full", release="consume_once")
    big = sample(num_tokens=1024, hidden=512)  # 4 MiB per sample
    refs = []
    with pytest.raises(StoreFullError, match="store full: no room for sample"):
        for i in range(2 * SEGMENT_BYTES // (4 << 20)):
            refs.append(producer.put(f"f{i}", i, big))
    assert len(refs) >= 4
    assert all(producer.lookup(r.sample_id, r.index) == r for r in refs)  # nothing was evicted

    # A consumer that frees room unblocks a waiting producer.
    producer.full_timeout_s = 20.0
    def consume_first():
        consumer.release(consumer.get(refs[0]))
        consumer.delete(refs[0])

    timer = threading.Timer(0.5, consume_first)
    start = time.monotonic()
    timer.start()
    late = producer.put("late", 999, big)
    timer.join()
    assert time.monotonic() - start >= 0.4
    assert torch.equal(consumer.get(late).tensors["aux_hidden"], big["aux_hidden"])


def test_cleanup_run_removes_only_that_run(open_store):
    mine, other = open_store(run_id="r.a"), open_store(run_id="rxa")  # '.' must not act as a wildcard
    ref = mine.put("k0", 0, sample())
    mine.put("k1", 1, sample())
    theirs = other.put("k0", 0, sample())
    assert mine.cleanup_run() == 10  # 2 samples x (4 features + ref)
    assert mine.lookup("k0", 0) is None and mine.lookup("k1", 1) is None
    with pytest.raises(SampleMissingError):
        mine.get(ref)
    assert other.lookup("k0", 0) == theirs


def test_errors_map_mooncake_codes_to_clear_classes(open_store):
    assert isinstance(error_for(-200, "x"), StoreFullError)
    assert isinstance(error_for(-704, "x"), SampleMissingError)
    assert "TRANSFER_FAIL" in str(error_for(-800, "x")) and "holder" in str(error_for(-800, "x"))
    err = error_for(-12345, "doing y")
    assert type(err) is MooncakeError and err.code == -12345 and "doing y" in str(err)

    store = open_store()
    ref = store.put("l0", 0, sample())
    store.get(ref)  # a read leaves a lease on the objects
    code = store._client.remove(store.feature_keys(ref)[0], False)
    assert isinstance(error_for(code, "remove"), LeaseHeldError)
    store.delete(ref)  # the store forces removal through its own read lease
    assert store.lookup("l0", 0) is None


def test_bad_config_is_refused_with_the_key_named(service, tmp_path):
    def make(**kw):
        return MooncakeStore(features_cfg(service, tmp_path, **kw), KEYS, run_id="bad-config")

    with pytest.raises(ValueError, match="features.mooncake.master"):
        MooncakeStore(FeaturesConfig(backend="mooncake", root=str(tmp_path)), KEYS)
    dead = MooncakeConfig(master="127.0.0.1:1", metadata_server=service.metadata_server)
    with pytest.raises(StoreError, match="no Mooncake master answers at '127.0.0.1:1'"):
        MooncakeStore(FeaturesConfig(backend="mooncake", root=str(tmp_path), mooncake=dead), KEYS)
    with pytest.raises(ValueError, match="features.release"):
        make(release="sometimes")
    with pytest.raises(ValueError, match="features.mooncake.run_id"):
        MooncakeStore(features_cfg(service, tmp_path), KEYS, run_id="a/b")
    with pytest.raises(ValueError, match="features.mooncake.buffer_bytes"):
        make(buffer_bytes=1000)
    with pytest.raises(ValueError, match="features.mooncake.chunk_bytes: expected a positive multiple of 64"):
        make(chunk_bytes=1000)
    with pytest.raises(ValueError, match="features.mooncake.segment_bytes: expected at least 16 MiB"):
        MooncakeService(segment_bytes=8 << 20)


def test_colocated_store_starts_and_stops_its_own_service(tmp_path):
    cfg = FeaturesConfig(backend="mooncake", root=str(tmp_path), mooncake=MooncakeConfig(
        segment_bytes=16 << 20, buffer_bytes=4 << 20))
    store = open_mooncake_store(cfg, KEYS)
    procs = list(store._service._procs.values())
    x = sample()
    assert raw_bytes(store.get(store.put("c", 0, x)).tensors["aux_hidden"]) == raw_bytes(x["aux_hidden"])
    store.close()
    assert all(p.poll() is not None for p in procs)


def test_serve_writes_client_config_and_stops_on_sigterm(tmp_path):
    out = tmp_path / "mooncake.yaml"
    script = ("from draftflow.config import FeaturesConfig, MooncakeConfig\n"
              "from draftflow.stores.mooncake_service import serve\n"
              f"raise SystemExit(serve(FeaturesConfig(mooncake=MooncakeConfig(segment_bytes=16 << 20)), {str(out)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        cfg = load_config([out], [f"features.root={tmp_path}", "features.mooncake.buffer_bytes=4194304"])
        assert cfg.features.backend == "mooncake"
        with MooncakeStore(cfg.features, KEYS, run_id="served") as store:
            x = sample()
            assert torch.equal(store.get(store.put("v", 0, x)).tensors["last_hidden"], x["last_hidden"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
