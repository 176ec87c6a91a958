"""Nothing unsigned is ever trained on: planted samples, foreign stores, forged done
markers, a second producer, a tampered seal and another run's checkpoint, each with
real `draftflow` processes (and a real Mooncake master), each refused or recaptured."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from draftflow.config import load_config
from draftflow.control.binding import RunKeys, StoreFill, open_store_record, root_secret
from draftflow.control.claims import ClaimBook, ForgedMarkerError
from draftflow.control.lease import LeaseError, ProducerLease
from draftflow.control.manifest import ManifestError, WrongSecretError
from draftflow.records import Provenance
from draftflow.roles import plan_data
from draftflow.stores.base import UnsignedSampleError
from draftflow.stores.local import LocalStore
from test_disagg import (COMMON, MOONCAKE_SIZES, SECRET, TINY, assert_same, colocated, draftflow,  # noqa: F401
                         finish, kill_after_refs, mooncake_role, mooncake_yaml, train, trained_by, weights)

ONCE = ["features.release=consume_once", "train.max_steps=1000", "train.batch_size=2"]
ATTACKER = RunKeys(b"the attacker's own key", "attacker-store")


def poisoned_samples():
    """The tiny run's samples as an attacker without the secret would plant them: the
    real token ids and masks (so token counts match), poisoned hidden states."""
    plan = plan_data(load_config([TINY], ["data.max_samples=24"]), 259)
    for s in plan.prepared.train:
        n = s.num_tokens
        yield s, {"input_ids": s.input_ids, "loss_mask": s.loss_mask,
                  "aux_hidden": torch.full((n, 192), 7.0, dtype=torch.bfloat16),
                  "last_hidden": torch.full((n, 64), -7.0, dtype=torch.bfloat16)}


def plant_files(root: Path) -> list[Path]:
    """Self-consistent sample files under `root/samples/`: embedded ref, checksums and
    a MAC all recomputed, under the attacker's key."""
    store = LocalStore(root, ATTACKER)
    for s, tensors in poisoned_samples():
        store.put(s.sample_id, s.index, tensors)
    return sorted((root / "samples").glob("*.safetensors"))


def store_cmd(tmp: Path, action: str, *extra: str, root: Path | None = None):
    return finish(draftflow("store", action, "-c", TINY, "features.backend=shared_dir",
                            f"features.root={root or tmp / 'feat'}", *extra))


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> Path:
    """A sealed retain run of 24 samples (tests copy it before changing anything)."""
    tmp = tmp_path_factory.mktemp("sealed")
    code, _, err = finish(train(tmp, "producer"))
    assert code == 0, err[-2000:]
    return tmp / "feat"


def copy_of(sealed: Path, tmp: Path) -> Path:
    shutil.copytree(sealed, tmp / "feat")
    return tmp / "feat"


# ------------------------------------------------------------------ planted samples (finding 1)

def test_planted_sample_files_are_recaptured_never_trained(tmp_path, colocated):
    planted = plant_files(tmp_path / "feat")
    assert len(planted) == 24
    code, _, err = finish(train(tmp_path, "producer"))
    assert code == 0, err[-2000:]
    assert str(planted[0]) in err and "capturing it again" in err
    code, out, _ = store_cmd(tmp_path, "verify")
    assert code == 0 and "OK" in out
    code, _, err = finish(train(tmp_path, "consumer"))
    assert code == 0, err[-2000:]
    assert_same(weights(tmp_path / "consumer"), colocated)  # bit-identical: no poisoned byte was trained on


def test_sample_planted_over_a_published_one_is_refused_by_the_consumer(tmp_path, sealed):
    root = copy_of(sealed, tmp_path)
    victim = root / "samples" / "s000005.safetensors"
    victim.unlink()
    plant_files(tmp_path / "attacker")
    shutil.copy(tmp_path / "attacker" / "samples" / victim.name, victim)
    code, _, err = finish(train(tmp_path, "consumer"))
    assert code == 2 and "s000005" in err and "corrupt" in err
    assert not (tmp_path / "consumer" / "final").exists()
    code, out, _ = store_cmd(tmp_path, "verify")
    assert code == 1 and "s000005" in out


def test_store_refuses_refs_it_did_not_sign_at_lookup_and_get(tmp_path):
    """In process, what every backend does: a foreign file is not 'already published',
    and a foreign ref (planted, or from another store of the same secret) is not read."""
    mine, other = RunKeys(b"s", "store-a"), RunKeys(b"s", "store-b")
    planted = plant_files(tmp_path)
    store = LocalStore(tmp_path, mine)
    assert store.lookup("s000000", 0) is None  # the caller captures it again
    foreign = LocalStore(tmp_path, ATTACKER).lookup("s000000", 0)
    with pytest.raises(UnsignedSampleError, match=f"{planted[0]}: sample 's000000' is not signed"):
        store.get(foreign)
    _, tensors = next(poisoned_samples())
    ref = store.put("s000000", 0, tensors)
    assert store.lookup("s000000", 0) == ref and store.get(ref).ref == ref
    with pytest.raises(UnsignedSampleError):
        LocalStore(tmp_path, other).get(ref)  # same secret, another store
    shutil.copy(store.path_of("s000000"), store.path_of("s000001"))  # a genuine file under another id
    assert store.lookup("s000001", 1) is None


def test_planted_mooncake_objects_are_recaptured_never_trained(tmp_path, colocated, mooncake_yaml):
    from draftflow.stores.mooncake import MooncakeStore, default_run_id

    cfg = load_config([TINY, mooncake_yaml], [f"features.root={tmp_path / 'control'}", *MOONCAKE_SIZES])
    real_namespace = RunKeys(SECRET.encode(), "any").namespace(default_run_id(cfg.features.root))
    assert default_run_id(cfg.features.root) not in real_namespace  # keys are not derived from the config alone
    planted = []
    for namespace in (default_run_id(cfg.features.root), real_namespace):  # the old guessable one, the real one
        attacker = MooncakeStore(cfg.features, ATTACKER)
        attacker.namespace = namespace  # as if the attacker could name the run's keys
        try:
            planted += [attacker.put(s.sample_id, s.index, t) for s, t in poisoned_samples()]
        finally:
            attacker.close()
    code, _, err = finish(mooncake_role(tmp_path, mooncake_yaml, "producer"))
    assert code == 0, err[-2000:]
    assert f"{real_namespace}/s000000/ref" in err and "capturing it again" in err
    code, _, err = finish(mooncake_role(tmp_path, mooncake_yaml, "consumer"))
    assert code == 0, err[-2000:]
    assert_same(weights(tmp_path / "consumer"), colocated)
    keys, _ = open_store_record(cfg.features.root, SECRET.encode(), None)
    probe = MooncakeStore(cfg.features, keys)  # the run's own store refuses what was planted
    try:
        with pytest.raises(UnsignedSampleError):
            probe.get(planted[-1])
    finally:
        probe.close()


# ------------------------------------------------------------------ another run's folder (finding 2)

def test_colocated_run_refuses_a_root_filled_by_another_target_or_capture(tmp_path):
    def colocated_run(*extra):  # no run secret: the root gets its own key
        return finish(draftflow("train", "-c", TINY, f"features.root={tmp_path / 'feat'}",
                                f"train.output_dir={tmp_path / 'run'}", *COMMON, "train.max_steps=1", *extra,
                                secret=None))

    code, _, err = colocated_run()
    assert code == 0, err[-2000:]
    key = tmp_path / "feat" / "control" / "store.key"
    assert key.stat().st_mode & 0o777 == 0o600  # no secret configured: the root's own key
    for extra, field in ((["target.seed=1"], "target:"), (["capture.batch_tokens=2048"], "capture:"),
                         (["data.max_samples=20"], "data_hash:")):
        code, _, err = colocated_run(*extra, "train.output_dir=" + str(tmp_path / "other"))
        assert code == 2 and "holds features of another run" in err and field in err, err[-2000:]
        assert "store gc --what all" in err
    code, _, err = finish(draftflow("store", "gc", "-c", TINY, f"features.root={tmp_path / 'feat'}", "--what", "all",
                                    secret=None))
    assert code == 0, err
    code, _, err = colocated_run("target.seed=1", "train.output_dir=" + str(tmp_path / "other"))
    assert code == 0, err[-2000:]


def test_root_key_must_be_private(tmp_path):
    root_secret(tmp_path, create=True)
    os.chmod(tmp_path / "control" / "store.key", 0o644)
    with pytest.raises(ValueError, match="must be yours with mode 0600"):
        root_secret(tmp_path, create=True)


def test_store_record_refuses_another_fill_and_another_secret(tmp_path):
    prov = Provenance(target="random:x", target_config_hash="h", tokenizer_hash="t", hidden_size=4, vocab_size=9,
                      aux_layer_ids=(0, 1, 2), feature_dtype="bfloat16", data_hash="d", producer_version="1")
    fill = StoreFill(provenance=prov, capture=(("batch_tokens", 8),))
    keys, got = open_store_record(tmp_path, b"k", fill)
    assert got == fill and open_store_record(tmp_path, b"k", None)[0].store_id == keys.store_id
    other = StoreFill(provenance=prov, capture=(("batch_tokens", 16),))
    with pytest.raises(ManifestError, match="(?s)holds features of another run.*capture: store has"):
        open_store_record(tmp_path, b"k", other)
    with pytest.raises(WrongSecretError, match="different secret"):
        open_store_record(tmp_path, b"other", fill)


# ------------------------------------------------------------------ done markers (finding 3)

def forge_done(root: Path, sample_id: str) -> Path:
    marker = root / "control" / "done" / sample_id
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"done": {"sample_id": sample_id, "gen": 0, "owner": "x", "store": "y"},
                                  "mac": "0" * 64}))
    return marker


def test_forged_done_marker_is_refused_verified_and_never_collected(tmp_path):
    code, _, err = finish(train(tmp_path, "producer", *ONCE))
    assert code == 0, err[-2000:]
    marker = forge_done(tmp_path / "feat", "s000003")
    code, _, err = finish(train(tmp_path, "consumer", *ONCE))
    assert code == 2 and str(marker) in err and "not signed" in err, err[-2000:]
    code, out, _ = store_cmd(tmp_path, "verify")
    assert code == 1 and str(marker) in out and "forged" in out
    code, out, err = store_cmd(tmp_path, "gc", "--what", "consumed")
    assert code == 0, err
    assert (tmp_path / "feat" / "samples" / "s000003.safetensors").exists()  # its marker did not verify


def test_gc_consumed_keeps_samples_of_a_retain_run(tmp_path, sealed):
    root = copy_of(sealed, tmp_path)
    keys, _ = open_store_record(root, SECRET.encode(), None)
    (root / "control" / "done").mkdir()
    (root / "control" / "done" / "s000001").write_bytes(keys.done_marker("s000001", 0, "someone"))
    code, _, err = store_cmd(tmp_path, "gc", "--what", "consumed")
    assert code == 2 and "retain run" in err
    assert (root / "samples" / "s000001.safetensors").exists()
    code, out, _ = store_cmd(tmp_path, "verify")
    assert code == 1 and "done marker in a retain run" in out


def test_claim_book_refuses_a_forged_marker(tmp_path):
    book = ClaimBook(tmp_path / "control", "me", 60, RunKeys(b"s", "store"))
    forge_done(tmp_path, "s1")
    with pytest.raises(ForgedMarkerError, match="done/s1: done marker not signed"):
        book.try_claim("s1")
    assert book.try_claim("s2")
    book.done("s2")
    marker = (tmp_path / "control" / "done" / "s2").read_bytes()
    assert book.is_done("s2") and not RunKeys(b"s", "another-store").done_marker_ok("s2", marker)


# ------------------------------------------------------------------ consume-once rerun (finding 4)

def test_consume_once_producer_rerun_never_republishes_trained_samples(tmp_path):
    bounded = [*ONCE, "features.max_inflight_bytes=400000", "features.wait_timeout_s=60"]
    consumer = train(tmp_path, "consumer", *bounded)
    journal = tmp_path / "feat" / "control" / "refs.jsonl"
    kill_after_refs(train(tmp_path, "producer", *bounded), journal, 8)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "feat" / "control" / "done").glob("s*"))) < 4:  # the consumer trained some
        assert time.monotonic() < deadline and consumer.poll() is None
        time.sleep(0.1)
    start = time.monotonic()
    code, _, err = finish(train(tmp_path, "producer", *bounded), timeout=120)  # the documented recovery
    assert code == 0, err[-2000:]
    assert time.monotonic() - start < 55  # no back-pressure wait on samples nobody will take
    code, _, err = finish(consumer)
    assert code == 0, err[-2000:]
    (got,) = trained_by([tmp_path / "consumer"])
    assert sorted(got) == [f"s{i:06d}" for i in range(24)]  # each exactly once
    assert not list((tmp_path / "feat" / "samples").glob("*.safetensors"))  # no orphans


# ------------------------------------------------------------------ one producer per run (finding 5)

def test_second_producer_of_a_run_is_refused_at_start(tmp_path, colocated):
    first = train(tmp_path, "producer")
    lease = tmp_path / "feat" / "control" / "lease" / "claims" / "producer@0"
    deadline = time.monotonic() + 120
    while not lease.exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # holds the lease, alive
    try:
        code, _, err = finish(train(tmp_path, "producer"))
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2 and "another producer holds this run" in err and socket.gethostname() in err
    code, _, err = finish(first)
    assert code == 0, err[-2000:]
    code, _, err = finish(train(tmp_path, "consumer"))
    assert code == 0, err[-2000:]
    assert_same(weights(tmp_path / "consumer"), colocated)


def test_lease_is_taken_over_when_stale_and_the_loser_learns_it(tmp_path):
    keys = RunKeys(b"s", "store")
    a = ProducerLease(tmp_path, keys, timeout_s=0.4).acquire()
    with pytest.raises(LeaseError, match="another producer holds this run"):
        ProducerLease(tmp_path, keys, timeout_s=0.4).acquire()
    a._stop.set()  # a stalls: no heartbeat
    a._thread.join()
    time.sleep(0.5)
    b = ProducerLease(tmp_path, keys, timeout_s=0.4).acquire()
    assert a._book.renew_all() == ["producer"]
    b.release()


def test_lease_of_a_dead_pid_is_taken_at_once_only_within_this_host_identity(tmp_path):
    """A killed producer of this host (same hostname, boot and pid namespace) is taken
    over at once; one recorded under the same hostname but another namespace (another
    container) is not, since its pid says nothing here: it waits for the heartbeat timeout."""
    import subprocess
    import sys

    from draftflow.control.claims import ClaimBook
    from draftflow.control.lease import LEASE_DIR, host_identity

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    keys = RunKeys(b"s", "store")
    # ours; another container under the same hostname; the bare hostname (earlier versions
    # recorded only that, which let a live producer elsewhere be taken for a dead one here)
    cases = ((host_identity(), True), (socket.gethostname() + "@0123456789ab", False), (socket.gethostname(), False))
    for n, (identity, taken) in enumerate(cases):
        root = tmp_path / str(n)
        holder = ClaimBook(root / LEASE_DIR, f"{identity}:{dead.pid}:deadbeef", 3600, keys)
        assert holder.try_claim("producer")  # as the killed producer left it: fresh heartbeat, dead pid
        if taken:
            ProducerLease(root, keys, timeout_s=3600).acquire().release()
        else:
            with pytest.raises(LeaseError, match="another producer holds this run"):
                ProducerLease(root, keys, timeout_s=3600).acquire()


# ------------------------------------------------------------------ the seal, retain mode (finding 6)

@pytest.mark.parametrize("tamper, message", [
    ("replay", "refs.jsonl line 25: signature does not match"),
    ("append", "seal in state.json covers 24 refs"),
    ("num_refs", "state record signature does not match"),
    ("other_run", "state record belongs to a different run"),
])
def test_retain_consumer_checks_the_seal_even_when_it_needs_few_refs(tmp_path, sealed, tamper, message):
    root = copy_of(sealed, tmp_path)
    control = root / "control"
    if tamper in ("replay", "append"):  # after the seal: a replayed line, a line being appended
        line = (control / "refs.jsonl").read_bytes().splitlines(keepends=True)[0]
        with open(control / "refs.jsonl", "ab") as f:
            f.write(line if tamper == "replay" else line[:-1])
    elif tamper == "num_refs":
        doc = json.loads((control / "state.json").read_text())
        doc["state"]["num_refs"] = 4
        (control / "state.json").write_text(json.dumps(doc))
    else:
        other = tmp_path / "other"
        code, _, err = finish(train(other, "producer", "data.max_samples=20"))
        assert code == 0, err[-2000:]
        shutil.copy(other / "feat" / "control" / "state.json", control / "state.json")
    code, _, err = finish(train(tmp_path, "consumer", "train.max_steps=1"))
    assert code == 2 and message in err, err[-2000:]
    assert not (tmp_path / "consumer" / "final").exists()


def test_consumer_refuses_a_checkpoint_of_another_run(tmp_path, sealed):
    copy_of(sealed, tmp_path)
    code, _, err = finish(draftflow("train", "-c", TINY, f"features.root={tmp_path / 'colocated-feat'}",
                                    f"train.output_dir={tmp_path / 'consumer'}", *COMMON, "train.max_steps=2"))
    assert code == 0, err[-2000:]
    code, _, err = finish(train(tmp_path, "consumer"))
    assert code == 2 and "checkpoint of another run" in err and "run_id: checkpoint has None, this run has 'run-" \
        in err, err[-2000:]
