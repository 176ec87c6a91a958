"""Shared directory store: atomic publish, checksums, consume-once claims, back-pressure, admin."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from draftflow.config import FeaturesConfig
from draftflow.control.binding import RunKeys, StoreFill, open_store_record
from draftflow.control.claims import ClaimBook
from draftflow.control.manifest import ManifestHeader, ManifestWriter
from draftflow.records import Provenance
from draftflow.stores.admin import gc_store, list_store, verify_store
from draftflow.stores.base import ChecksumError, StoreError
from draftflow.stores.sample_file import read_header
from draftflow.stores.shared_dir import SharedDirStore

REPO = Path(__file__).resolve().parents[1]
SECRET = b"store-secret"


PROV = Provenance(target="random:x", target_config_hash="h", tokenizer_hash="t", hidden_size=4, vocab_size=100,
                  aux_layer_ids=(0, 1, 2), feature_dtype="bfloat16", data_hash="d", producer_version="0.1.0")
FILL = StoreFill(provenance=PROV, capture=(("batch_tokens", 64), ("dtype", "float32")))
KEYS = RunKeys(SECRET, "no-store")  # for claims without a store


def cfg(root: Path, **changes) -> FeaturesConfig:
    return FeaturesConfig(backend="shared_dir", root=str(root), **changes)


def open_dir(root: Path, **changes) -> SharedDirStore:
    """A shared-directory store at `root`, its store record created on first use."""
    keys, _ = open_store_record(root, SECRET, FILL)
    return SharedDirStore(cfg(root, **changes), keys)


def tensors(seed: int, num_tokens: int = 6, hidden: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (num_tokens,), generator=g),
            "loss_mask": torch.ones(num_tokens, dtype=torch.uint8),
            "aux_hidden": torch.randn(num_tokens, 3 * hidden, generator=g).to(torch.bfloat16),
            "last_hidden": torch.randn(num_tokens, hidden, generator=g).to(torch.bfloat16)}


def python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env)


def wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# ------------------------------------------------------------------ publish and read

def test_put_get_round_trip_and_lookup(tmp_path):
    store = open_dir(tmp_path)
    t = tensors(0)
    ref = store.put("s0", 0, t)
    assert store.lookup("s0", 0) == ref
    lease = store.get(ref)
    for name, value in t.items():
        assert torch.equal(lease.tensors[name], value)
    store.release(lease)  # retain: the sample stays for the next epoch
    assert store.get(ref).ref == ref


def test_sample_id_escaping_the_root_is_refused(tmp_path):
    store = open_dir(tmp_path, release="consume_once")
    with pytest.raises(ValueError, match="invalid sample id '../x'"):
        store.put("../x", 0, tensors(0))
    with pytest.raises(ValueError, match="invalid sample id '../x'"):
        ClaimBook(store.control_dir, "me", 60, store.keys).try_claim("../x")


def test_unknown_release_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="features.release: 'sometimes'"):
        open_dir(tmp_path, release="sometimes")


def test_corrupt_feature_file_raises_checksum_error_naming_the_feature(tmp_path):
    store = open_dir(tmp_path)
    ref = store.put("s0", 0, tensors(0))
    path = store.path_of("s0")
    with open(path, "rb") as f:
        header, start = read_header(f, path)
    begin, _ = header["aux_hidden"]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + begin] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(ChecksumError, match="sample 's0': feature 'aux_hidden' is corrupt"):
        store.get(ref)
    assert any("aux_hidden" in p for p in verify_store(tmp_path, SECRET))


_SLOW_WRITER = """
import sys, time, torch
import draftflow.stores.sample_file as sf
from draftflow.config import FeaturesConfig
from draftflow.control.binding import RunKeys
from draftflow.stores.shared_dir import SharedDirStore
calls = []
real = sf.tensor_bytes
def stalling(t):  # stall after the first tensor: the temp file holds a prefix
    calls.append(1)
    if len(calls) == 2:
        open(sys.argv[2], "w").close()
        time.sleep(60)
    return real(t)
sf.tensor_bytes = stalling
store = SharedDirStore(FeaturesConfig(backend="shared_dir", root=sys.argv[1]), RunKeys(b"k", "s"))
store.put("s0", 0, {"input_ids": torch.arange(6), "loss_mask": torch.ones(6, dtype=torch.uint8),
                    "aux_hidden": torch.zeros(6, 12, dtype=torch.bfloat16),
                    "last_hidden": torch.zeros(6, 4, dtype=torch.bfloat16)})
"""


def test_writer_killed_mid_write_leaves_no_visible_sample_only_a_temp_gc_removes(tmp_path):
    root, marker = tmp_path / "store", tmp_path / "stalled"
    proc = python(_SLOW_WRITER, str(root), str(marker))
    wait_for(marker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = open_dir(root)
    assert store.lookup("s0", 0) is None
    assert not store.path_of("s0").exists()
    summary = list_store(root)
    assert summary.num_samples == 0 and summary.num_temp_files == 1
    assert gc_store(root, ["temp"], min_temp_age_s=3600) == {"temp": 0}  # could be a live writer
    assert gc_store(root, ["temp"], min_temp_age_s=0) == {"temp": 1}
    assert list_store(root).num_temp_files == 0


# ------------------------------------------------------------------ consume-once claims

_CONSUMER = """
import json, sys
from draftflow.config import FeaturesConfig
from draftflow.control.manifest import ManifestReader
from draftflow.control.binding import open_store_record
from draftflow.control.claims import ClaimBook, default_owner
from draftflow.stores.shared_dir import SharedDirStore
root, out = sys.argv[1], sys.argv[2]
keys, _ = open_store_record(root, b"store-secret", None)
store = SharedDirStore(FeaturesConfig(backend="shared_dir", root=root, release="consume_once"), keys)
claims = ClaimBook(store.control_dir, default_owner(), 60, keys)
got = []
open(out + ".ready", "w").close()  # imports done: both consumers race from here
for ref in ManifestReader(store.control_dir, b"store-secret").follow(timeout_s=30, poll_s=0.01):
    if claims.try_claim(ref.sample_id):
        lease = store.get(ref)
        got.append(ref.sample_id)
        store.release(lease)
        claims.done(ref.sample_id)
        store.delete(ref)
json.dump(got, open(out, "w"))
"""


def make_header(num_samples: int) -> ManifestHeader:
    return ManifestHeader(run_id="r", provenance=PROV, draft_vocab=(1, 2, 3), num_samples=num_samples,
                          release="consume_once")


def test_two_consumer_processes_train_each_sample_exactly_once(tmp_path):
    n = 24
    store = open_dir(tmp_path, release="consume_once")
    writer = ManifestWriter(store.control_dir, SECRET, make_header(n))
    procs = [python(_CONSUMER, str(tmp_path), str(tmp_path / f"got{i}.json")) for i in range(2)]
    for i in range(2):
        wait_for(tmp_path / f"got{i}.json.ready")
    for i in range(n):  # publish while the consumers already follow
        writer.publish(store.put(f"s{i:03d}", i, tensors(i)))
    writer.seal()
    assert [p.wait(60) for p in procs] == [0, 0]
    got = [set(json.loads((tmp_path / f"got{i}.json").read_text())) for i in range(2)]
    assert got[0] | got[1] == {f"s{i:03d}" for i in range(n)}
    assert got[0] & got[1] == set()
    assert store.inflight_bytes() == 0
    summary = list_store(tmp_path)
    assert summary.num_samples == 0 and summary.num_done == n and summary.num_claims == 0
    assert verify_store(tmp_path, SECRET) == []  # consumed samples are not missing


_DYING_CONSUMER = """
import sys, os
from draftflow.control.binding import RunKeys
from draftflow.control.claims import ClaimBook
book = ClaimBook(sys.argv[1], "deadhost:1:dead", claim_timeout_s=0.5, keys=RunKeys(b"store-secret", "no-store"))
assert book.try_claim("s0")
os._exit(0)  # no done(): the claim is left behind
"""


def test_stale_claim_of_dead_consumer_is_reclaimed(tmp_path):
    assert python(_DYING_CONSUMER, str(tmp_path)).wait(30) == 0
    book = ClaimBook(tmp_path, "live:2:abc", claim_timeout_s=0.5, keys=KEYS)
    assert not book.try_claim("s0")  # still fresh
    time.sleep(0.6)
    assert book.try_claim("s0")
    book.done("s0")
    assert book.is_done("s0") and not ClaimBook(tmp_path, "x", 0.5, KEYS).try_claim("s0")


_STEALER = """
import json, sys, time
from draftflow.control.binding import RunKeys
from draftflow.control.claims import ClaimBook
book = ClaimBook(sys.argv[1], sys.argv[2], claim_timeout_s=0.2, keys=RunKeys(b"store-secret", "no-store"))
while time.time() < float(sys.argv[3]):
    time.sleep(0.001)
json.dump(book.try_claim("s0"), open(sys.argv[4], "w"))
"""


def test_only_one_of_racing_stealers_wins_a_stale_claim(tmp_path):
    assert ClaimBook(tmp_path, "dead", 0.2, KEYS).try_claim("s0")
    time.sleep(0.3)
    start_at = time.time() + 1.0
    procs = [python(_STEALER, str(tmp_path), f"stealer{i}", str(start_at), str(tmp_path / f"won{i}"))
             for i in range(4)]
    assert [p.wait(30) for p in procs] == [0] * 4
    wins = [json.loads((tmp_path / f"won{i}").read_text()) for i in range(4)]
    assert wins.count(True) == 1


def test_stalled_owner_learns_its_claim_was_stolen(tmp_path):
    slow = ClaimBook(tmp_path, "slow", claim_timeout_s=0.1, keys=KEYS)
    assert slow.try_claim("s0") and slow.try_claim("s1")
    time.sleep(0.2)
    slow.renew_all()  # fresh heartbeat for both, then s0 goes stale again
    os.utime(tmp_path / "claims" / "s0@0", (0, 0))
    thief = ClaimBook(tmp_path, "thief", claim_timeout_s=0.1, keys=KEYS)
    assert thief.try_claim("s0") and not thief.try_claim("s1")
    assert slow.renew_all() == ["s0"]
    assert slow.held() == {"s1"}


def test_done_requires_a_held_claim_and_delete_frees_the_sample(tmp_path):
    store = open_dir(tmp_path, release="consume_once")
    claims = ClaimBook(store.control_dir, "me", 60, store.keys)
    ref = store.put("s0", 0, tensors(0))
    with pytest.raises(ValueError, match="not claimed by"):
        claims.done("s0")
    assert claims.try_claim("s0")
    store.release(store.get(ref))
    assert store.path_of("s0").exists()  # a release alone frees nothing
    claims.done("s0")
    store.delete(ref)
    assert not store.path_of("s0").exists() and claims.is_done("s0")
    assert not claims.try_claim("s0")


# ------------------------------------------------------------------ back-pressure

def test_back_pressure_blocks_producer_until_a_consumer_releases(tmp_path):
    sample_bytes = sum(t.numel() * t.element_size() for t in tensors(0).values())
    producer = open_dir(tmp_path, release="consume_once", max_inflight_bytes=2 * sample_bytes)
    refs = [producer.put(f"s{i}", i, tensors(i)) for i in range(2)]
    producer.wait_for_room(0)  # at the limit, but not over it: no wait

    def consume_one_later():
        time.sleep(0.4)
        consumer = SharedDirStore(cfg(tmp_path, release="consume_once"), producer.keys)
        consumer.release(consumer.get(refs[0]))
        consumer.delete(refs[0])

    thread = threading.Thread(target=consume_one_later)
    thread.start()
    start = time.monotonic()
    producer.wait_for_room(sample_bytes, poll_s=0.01)
    waited = time.monotonic() - start
    thread.join()
    assert 0.3 < waited < 10
    assert producer.inflight_bytes() == sample_bytes


def test_back_pressure_times_out_clearly_without_consumers(tmp_path):
    store = open_dir(tmp_path, release="consume_once", max_inflight_bytes=10, wait_timeout_s=0.2)
    store.put("s0", 0, tensors(0))
    with pytest.raises(StoreError, match="max_inflight_bytes=10.*no consumer progress for 0.2 s"):
        store.wait_for_room(100, poll_s=0.01)
    open_dir(tmp_path, max_inflight_bytes=10).wait_for_room(100)  # retain: never blocks


# ------------------------------------------------------------------ admin

def test_verify_store_reports_missing_sample_and_tampered_manifest(tmp_path):
    store = open_dir(tmp_path)
    with ManifestWriter(store.control_dir, SECRET, dataclasses.replace(make_header(2), release="retain")) as w:
        for i in range(2):
            w.publish(store.put(f"s{i}", i, tensors(i)))
        w.seal()
    assert verify_store(tmp_path, SECRET) == []
    store.path_of("s1").unlink()
    assert any("'s1'" in p and "does not exist" in p for p in verify_store(tmp_path, SECRET))
    assert any("different secret" in p for p in verify_store(tmp_path, b"wrong"))
    summary = list_store(tmp_path)
    assert (summary.manifest_state, summary.num_refs, summary.num_samples) == ("sealed", 2, 1)


def test_gc_removes_stale_claims_consumed_samples_and_whole_store(tmp_path):
    store = open_dir(tmp_path, release="consume_once")
    with ManifestWriter(store.control_dir, SECRET, make_header(3)) as w:
        for i in range(3):
            w.publish(store.put(f"s{i}", i, tensors(i)))
        w.seal()
    assert ClaimBook(store.control_dir, "dead", 0.1, store.keys).try_claim("s1")
    mine = ClaimBook(store.control_dir, "me", 60, store.keys)
    assert mine.try_claim("s2")
    mine.done("s2")  # trained, but its file not yet freed
    assert gc_store(tmp_path, ["claims"], claim_timeout_s=3600) == {"claims": 0}
    time.sleep(0.15)
    with pytest.raises(ValueError, match="needs the run secret"):
        gc_store(tmp_path, ["consumed"])
    assert gc_store(tmp_path, ["claims", "consumed"], claim_timeout_s=0.1, secret=SECRET) == {"claims": 1,
                                                                                                "consumed": 1}
    assert list_store(tmp_path).num_samples == 2
    with pytest.raises(ValueError, match="unknown target"):
        gc_store(tmp_path, ["everything"])
    assert gc_store(tmp_path, ["all"]) == {"all": 1}
    assert not (tmp_path / "samples").exists() and not (tmp_path / "control").exists()
    with pytest.raises(StoreError, match="not a DraftFlow store"):
        gc_store(tmp_path, ["all"])


def test_gc_of_claims_clears_a_live_claim_only_for_a_marker_that_verifies(tmp_path):
    """A done marker ends its sample's claims; with the run secret, a forged marker does
    not (the live claim stays, so no second consumer takes the sample); a genuine one does."""
    store = open_dir(tmp_path, release="consume_once")
    with ManifestWriter(store.control_dir, SECRET, make_header(2)) as w:
        for i in range(2):
            w.publish(store.put(f"s{i}", i, tensors(i)))
        w.seal()
    live = ClaimBook(store.control_dir, "live", 3600, store.keys)
    assert live.try_claim("s0") and live.try_claim("s1")
    done_dir = store.control_dir / "done"
    done_dir.mkdir(exist_ok=True)
    (done_dir / "s0").write_bytes(b'{"done": {"sample_id": "s0"}, "mac": "forged"}')
    (done_dir / "s1").write_bytes(store.keys.done_marker("s1", 0, "live"))
    assert gc_store(tmp_path, ["claims"], claim_timeout_s=3600, secret=SECRET) == {"claims": 1}
    claims = sorted(p.name for p in (store.control_dir / "claims").iterdir())
    assert len(claims) == 1 and claims[0].startswith("s0")  # the forged marker left s0's live claim
    assert gc_store(tmp_path, ["claims"], claim_timeout_s=3600) == {"claims": 1}  # no secret: markers as they are
    with pytest.raises(StoreError, match="cannot check the done markers"):
        gc_store(tmp_path, ["claims"], secret=b"wrong secret")


def test_gc_of_claims_says_when_no_secret_lets_it_verify_markers(tmp_path, monkeypatch, capsys):
    from draftflow.cli import main

    monkeypatch.delenv("DRAFTFLOW_SECRET", raising=False)
    (tmp_path / "samples").mkdir()
    tiny = Path(__file__).resolve().parent.parent / "examples" / "tiny.yaml"
    assert main(["store", "gc", "-c", str(tiny), f"features.root={tmp_path}", "--what", "claims"]) == 0
    assert "no run secret: done markers are taken as they are, not verified" in capsys.readouterr().out


def test_chunked_checksums_verify_landing_order_and_the_earlier_whole_format():
    """Feature checksums hash 8 MiB chunks on several threads: computed while bytes land
    in any order of cuts, they equal the one-shot value; a flipped byte in a later chunk
    is caught; refs from earlier versions (one xxh3_64 over all bytes) still verify."""
    import random

    from draftflow.records import SampleRef
    from draftflow.stores.base import (CHECKSUM_CHUNK, CHUNKED, WHOLE, LandingChecksum, checksum, make_spec,
                                       verify_tensor)

    t = torch.randint(0, 255, (2 * CHECKSUM_CHUNK + 777,), dtype=torch.uint8)
    spec = make_spec("aux_hidden", t)
    assert spec.checksum.startswith(CHUNKED + ":")
    rng = random.Random(0)
    data = memoryview(t.numpy())
    for algorithm in (CHUNKED, WHOLE):
        want = checksum(data, algorithm)
        landing = LandingChecksum(data, algorithm)
        for cut in sorted(rng.sample(range(1, len(data)), 6)) + [len(data)]:
            landing.landed(cut)
        assert landing.value() == want
    legacy = SampleRef(sample_id="s0", index=0, uri="file:///x", num_tokens=1,
                       features=(dataclasses.replace(spec, checksum=checksum(data, WHOLE)),))
    verify_tensor(legacy, "aux_hidden", t)
    bad = t.clone()
    bad[CHECKSUM_CHUNK + 5] ^= 1
    for ref in (legacy, dataclasses.replace(legacy, features=(spec,))):
        with pytest.raises(ChecksumError, match="feature 'aux_hidden' is corrupt"):
            verify_tensor(ref, "aux_hidden", bad)
    odd = dataclasses.replace(legacy, features=(dataclasses.replace(spec, checksum="md5:abc"),))
    with pytest.raises(StoreError, match="unknown checksum algorithm 'md5'"):
        verify_tensor(odd, "aux_hidden", t)
