"""Signed run manifest: signing, journal chain, seal/fail states, follow, resume, refusals."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from draftflow.config import FeaturesConfig
from draftflow.control.manifest import (
    HEADER_FILE, JOURNAL_FILE, STATE_FILE, ManifestError, ManifestHeader, ManifestReader,
    ManifestWriter, ProducerFailedError, ProducerTimeoutError, ProvenanceMismatchError,
    TamperedManifestError, UnsignedManifestError, WrongSecretError, check_provenance, wait_for_header)
from draftflow.control.signing import key_id, load_secret, sign, verify
from draftflow.records import FeatureSpec, Provenance, SampleRef

REPO = Path(__file__).resolve().parents[1]
SECRET = b"test-secret"


def provenance(**changes) -> Provenance:
    base = Provenance(target="random:abc", target_config_hash="c0ffee", tokenizer_hash="t0k",
                      hidden_size=64, vocab_size=256, aux_layer_ids=(1, 3, 5), feature_dtype="bfloat16",
                      data_hash="d4t4", producer_version="0.1.0")
    return dataclasses.replace(base, **changes)


def header(num_samples: int = 3, run_id: str = "run-1", **changes) -> ManifestHeader:
    return ManifestHeader(run_id=run_id, provenance=provenance(), draft_vocab=(5, 17, 42, 99),
                          num_samples=num_samples, release="retain", **changes)


def ref(i: int) -> SampleRef:
    spec = FeatureSpec(name="input_ids", dtype="int64", shape=(7 + i,), num_bytes=8 * (7 + i),
                       checksum=f"xxh3_64:{i:016x}")
    return SampleRef(sample_id=f"s{i:04d}", index=i, uri=f"file:///feat/samples/s{i:04d}.safetensors",
                     num_tokens=7 + i, features=(spec,))


def write_run(d: Path, n: int = 3, seal: bool = True, **hdr) -> None:
    with ManifestWriter(d, SECRET, header(num_samples=n, **hdr)) as w:
        for i in range(n):
            w.publish(ref(i))
        if seal:
            w.seal()


def read_all(d: Path, secret: bytes = SECRET) -> list[SampleRef]:
    reader = ManifestReader(d, secret)
    reader.state()
    return reader.refs_so_far()


# ------------------------------------------------------------------ signing

def test_signature_ignores_key_order_and_detects_changes():
    sig = sign({"a": 1, "b": [1, 2]}, SECRET)
    assert verify({"b": [1, 2], "a": 1}, sig, SECRET)
    assert not verify({"a": 2, "b": [1, 2]}, sig, SECRET)
    assert not verify({"a": 1, "b": [1, 2]}, sig, b"other")


def test_load_secret_prefers_file_then_environment(tmp_path):
    f = tmp_path / "secret"
    f.write_text("from-file\n")
    f.chmod(0o600)
    assert load_secret(FeaturesConfig(secret_file=str(f)), {"DRAFTFLOW_SECRET": "env"}) == b"from-file"
    assert load_secret(FeaturesConfig(), {"DRAFTFLOW_SECRET": "env"}) == b"env"


@pytest.mark.parametrize("setup, message", [
    ("none", "no run secret: set features.secret_file or the DRAFTFLOW_SECRET"),
    ("empty", "is empty"),
    ("missing", "features.secret_file: no such file"),
])
def test_load_secret_refuses_absent_or_empty_secret(tmp_path, setup, message):
    f = tmp_path / "secret"
    if setup == "empty":
        f.write_text("  \n")
        f.chmod(0o600)
    cfg = FeaturesConfig() if setup == "none" else FeaturesConfig(secret_file=str(f))
    with pytest.raises(ValueError, match=message):
        load_secret(cfg, {})


@pytest.mark.parametrize("mode, message", [
    (0o602, "is writable by others"), (0o620, "is writable by its group"), (0o666, "is writable by others"),
    (0o604, "is readable by every user of this host"), (0o644, "is readable by every user of this host")])
def test_secret_file_others_can_change_or_read_is_refused_with_the_fix(tmp_path, mode, message):
    f = tmp_path / "run.secret"
    f.write_text("s3cr3t-value\n")
    f.chmod(mode)
    with pytest.raises(ValueError) as e:
        load_secret(FeaturesConfig(secret_file=str(f)), {})
    assert message in str(e.value) and f"chmod 600 {f}" in str(e.value)
    assert "s3cr3t-value" not in str(e.value)


def test_secret_file_readable_by_its_group_only_is_accepted(tmp_path):
    f = tmp_path / "run.secret"
    f.write_text("team-secret\n")
    f.chmod(0o640)
    assert load_secret(FeaturesConfig(secret_file=str(f)), {}) == b"team-secret"


@pytest.mark.parametrize("command, value", [
    ("train --role consumer", "0f9a8b7c6d5e4f3a2b1c"), ("store verify", "0f9a8b7c6d5e4f3a2b1c"),
    ("store verify", "top secret: with [yaml"), ("store verify", "[a, 0f9a8b7c]")])
def test_a_secret_given_as_secret_file_never_appears_in_a_message(tmp_path, command, value):
    """People paste the secret itself into features.secret_file: no error may repeat it."""
    env = {k: v for k, v in os.environ.items() if k != "DRAFTFLOW_SECRET"}
    proc = subprocess.run([sys.executable, "-m", "draftflow", *command.split(), "-c",
                           str(REPO / "examples" / "tiny.yaml"), "features.backend=shared_dir",
                           f"features.root={tmp_path / 'feat'}", f"features.secret_file={value}"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "features.secret_file" in proc.stderr, proc.stderr[-2000:]
    assert "0f9a8b7c" not in proc.stdout + proc.stderr and "top secret" not in proc.stdout + proc.stderr


def test_a_wrong_secret_is_named_by_key_ids_never_by_value(tmp_path):
    write_run(tmp_path)
    secret = load_secret(FeaturesConfig(), {"DRAFTFLOW_SECRET": "my-own-secret-value\n"})
    with pytest.raises(WrongSecretError) as e:
        ManifestReader(tmp_path, secret)
    assert key_id(secret) in str(e.value) and key_id(SECRET) in str(e.value)
    assert "my-own-secret-value" not in str(e.value) and SECRET.decode() not in str(e.value)


# ------------------------------------------------------------------ round trip

def test_sealed_manifest_round_trips_refs_and_header(tmp_path):
    write_run(tmp_path)
    reader = ManifestReader(tmp_path, SECRET)
    assert reader.header.draft_vocab == (5, 17, 42, 99)
    assert reader.header.provenance == provenance()
    assert reader.state().status == "sealed" and reader.state().num_refs == 3
    assert reader.refs_so_far() == [ref(0), ref(1), ref(2)]
    assert list(reader.follow(timeout_s=1)) == [ref(0), ref(1), ref(2)]


def test_publish_refuses_a_ref_holding_a_tensor(tmp_path):
    import torch
    bad = dataclasses.replace(ref(0), num_tokens=torch.tensor(7))
    with ManifestWriter(tmp_path, SECRET, header()) as w, pytest.raises(TypeError, match="tensor-free"):
        w.publish(bad)


def test_seal_refuses_fewer_refs_than_planned_and_publish_beyond_plan(tmp_path):
    with ManifestWriter(tmp_path, SECRET, header(num_samples=2)) as w:
        w.publish(ref(0))
        with pytest.raises(ManifestError, match="cannot seal with 1 refs; the header plans 2"):
            w.seal()
        w.publish(ref(1))
        with pytest.raises(ManifestError, match="beyond that"):
            w.publish(ref(2))


def test_republishing_same_ref_is_noop_but_different_ref_refused(tmp_path):
    with ManifestWriter(tmp_path, SECRET, header()) as w:
        w.publish(ref(0))
        w.publish(ref(0))
        assert w.num_refs == 1
        with pytest.raises(ManifestError, match="already published with a different ref"):
            w.publish(dataclasses.replace(ref(0), num_tokens=99))


_FILLS_UP = """
import resource, signal, sys
sys.path.insert(0, {repo!r})
from tests.test_manifest import SECRET, header, ref
from draftflow.control.manifest import ManifestWriter
w = ManifestWriter({d!r}, SECRET, header(num_samples=50))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for i in range(50):
    w.publish(ref(i))
"""


def test_a_journal_write_that_fails_names_the_journal(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _FILLS_UP.format(repo=str(REPO), d=str(tmp_path))],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0 and "[Errno 27] File too large" in proc.stderr, proc.stderr[-2000:]
    assert f"{tmp_path / JOURNAL_FILE}" in proc.stderr.splitlines()[-1]


def test_a_full_disk_error_names_the_file_being_written():
    from draftflow.fsutil import naming

    with pytest.raises(OSError) as e:
        with naming(Path("/feat/control/refs.jsonl")), open("/dev/full", "wb", buffering=0) as f:
            f.write(b"x")  # ENOSPC, and Python's error names no file
    assert e.value.errno == errno.ENOSPC and str(e.value) == \
        "[Errno 28] No space left on device: '/feat/control/refs.jsonl'"


# ------------------------------------------------------------------ following a live producer

_PRODUCER = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.test_manifest import SECRET, header, ref
from draftflow.control.manifest import ManifestWriter
w = ManifestWriter({d!r}, SECRET, header(num_samples=4))
for i in range({n}):
    time.sleep(0.05)
    w.publish(ref(i))
{end}
"""


def start_producer(d: Path, n: int, end: str) -> subprocess.Popen:
    code = _PRODUCER.format(repo=str(REPO), d=str(d), n=n, end=end)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO)


def test_follow_yields_refs_from_producer_process_until_sealed(tmp_path):
    proc = start_producer(tmp_path, 4, "w.seal()")
    wait_for_header(tmp_path, timeout_s=30)
    got = [r.sample_id for r in ManifestReader(tmp_path, SECRET).follow(timeout_s=30, poll_s=0.02)]
    assert proc.wait(30) == 0
    assert got == ["s0000", "s0001", "s0002", "s0003"]


def test_failed_producer_reaches_following_reader_as_error(tmp_path):
    proc = start_producer(tmp_path, 2, "w.fail('CUDA out of memory at sample 2')")
    wait_for_header(tmp_path, timeout_s=30)
    got = []
    with pytest.raises(ProducerFailedError, match="failed after 2 refs: CUDA out of memory at sample 2"):
        for r in ManifestReader(tmp_path, SECRET).follow(timeout_s=30, poll_s=0.02):
            got.append(r.sample_id)
    assert proc.wait(30) == 0
    assert got == ["s0000", "s0001"]


def test_follow_times_out_clearly_when_producer_is_silent(tmp_path):
    write_run(tmp_path, seal=False)
    start = time.monotonic()
    follow = ManifestReader(tmp_path, SECRET).follow(timeout_s=0.3, poll_s=0.02)
    with pytest.raises(ProducerTimeoutError, match=f"timed out after 0.3 s waiting for the producer at {tmp_path}"):
        list(follow)
    assert time.monotonic() - start < 5


def test_wait_for_header_times_out_without_producer(tmp_path):
    with pytest.raises(ProducerTimeoutError, match="timed out after 0.2 s waiting for the producer"):
        wait_for_header(tmp_path, timeout_s=0.2, poll_s=0.02)


def test_reader_without_manifest_says_header_is_missing(tmp_path):
    with pytest.raises(ManifestError, match="header.json is missing"):
        ManifestReader(tmp_path, SECRET)


def test_reader_leaves_a_partial_last_line_for_later(tmp_path):
    write_run(tmp_path, seal=False)
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(b'{"n":3,"ref":{"sample')
    assert len(ManifestReader(tmp_path, SECRET).refs_so_far()) == 3


# ------------------------------------------------------------------ resume

def test_writer_resumes_after_torn_journal_line(tmp_path):
    with ManifestWriter(tmp_path, SECRET, header(num_samples=5)) as w:
        for i in range(3):
            w.publish(ref(i))
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(b'{"mac":"ab12","n":3,"ref":{"sam')  # crash mid-append
    with ManifestWriter(tmp_path, SECRET, header(num_samples=5, created="2099-01-01T00:00:00Z")) as w:
        assert w.truncated_bytes > 0
        assert w.published_ids() == {"s0000", "s0001", "s0002"}
        for i in range(5):
            w.publish(ref(i))  # a rerun republishes everything; known refs are skipped
        w.seal()
    assert read_all(tmp_path) == [ref(i) for i in range(5)]


def test_writer_refuses_control_dir_of_a_different_run(tmp_path):
    write_run(tmp_path)
    with pytest.raises(ManifestError, match=r"holds a different run \(run_id 'run-1'.*run_id"):
        ManifestWriter(tmp_path, SECRET, header(run_id="run-2"))


def test_rerun_of_failed_run_can_finish_it(tmp_path):
    with ManifestWriter(tmp_path, SECRET, header(num_samples=2)) as w:
        w.publish(ref(0))
        w.fail("killed")
    assert ManifestReader(tmp_path, SECRET).state().error == "killed"
    with ManifestWriter(tmp_path, SECRET, header(num_samples=2)) as w:
        assert ManifestReader(tmp_path, SECRET).state().status == "in_progress"
        w.publish(ref(1))
        w.seal()
    assert read_all(tmp_path) == [ref(0), ref(1)]


# ------------------------------------------------------------------ refusals

def edit_line(path: Path, lineno: int, fn) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[lineno] = json.dumps(fn(json.loads(lines[lineno])), separators=(",", ":")).encode()
    path.write_bytes(b"\n".join(lines))


def test_tampered_journal_line_is_refused_naming_the_line(tmp_path):
    write_run(tmp_path)
    edit_line(tmp_path / JOURNAL_FILE, 1, lambda d: {**d, "ref": {**d["ref"], "num_tokens": 1000}})
    with pytest.raises(TamperedManifestError, match=r"refs.jsonl line 2: signature does not match"):
        read_all(tmp_path)


def test_reordered_or_dropped_journal_lines_are_refused(tmp_path):
    write_run(tmp_path, seal=False)
    journal = tmp_path / JOURNAL_FILE
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[1] + lines[0] + lines[2])
    with pytest.raises(TamperedManifestError, match="line 1"):
        read_all(tmp_path)
    journal.write_bytes(lines[0] + lines[2])
    with pytest.raises(TamperedManifestError, match="line 2"):
        read_all(tmp_path)


def test_journal_line_spliced_from_another_run_is_refused(tmp_path):
    write_run(tmp_path / "a", seal=False)
    write_run(tmp_path / "b", seal=False, run_id="run-other")
    other = (tmp_path / "b" / JOURNAL_FILE).read_bytes().splitlines(keepends=True)
    mine = (tmp_path / "a" / JOURNAL_FILE).read_bytes().splitlines(keepends=True)
    (tmp_path / "a" / JOURNAL_FILE).write_bytes(mine[0] + other[1] + mine[2])
    with pytest.raises(TamperedManifestError, match="line 2"):
        read_all(tmp_path / "a")


def edit_record(path, section: str, field: str, value) -> None:
    """Change one field of a signed JSON record in place, leaving its signature."""
    doc = json.loads(path.read_text())
    doc[section][field] = value
    path.write_text(json.dumps(doc))


def test_tampered_state_record_is_refused(tmp_path):
    write_run(tmp_path)
    edit_record(tmp_path / STATE_FILE, "state", "num_refs", 2)
    with pytest.raises(TamperedManifestError, match="state.json: state record signature does not match"):
        read_all(tmp_path)


def test_bytes_appended_after_the_seal_are_refused(tmp_path):
    write_run(tmp_path)
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(b'{"n":3')
    with pytest.raises(TamperedManifestError, match="seal in state.json covers 3 refs .* and 6 more bytes"):
        read_all(tmp_path)


def test_changing_any_digit_in_any_manifest_file_is_refused(tmp_path):
    write_run(tmp_path)
    for name in (HEADER_FILE, JOURNAL_FILE, STATE_FILE):
        path = tmp_path / name
        original = path.read_bytes()
        digits = [i for i, c in enumerate(original) if chr(c).isdigit()]
        assert len(digits) > 20
        for i in digits:
            new = b"%d" % ((int(chr(original[i])) + 1) % 10)
            path.write_bytes(original[:i] + new + original[i + 1:])
            with pytest.raises(ManifestError):
                read_all(tmp_path)
        path.write_bytes(original)
    assert len(read_all(tmp_path)) == 3


def test_manifest_under_another_secret_is_refused_with_both_key_ids(tmp_path):
    write_run(tmp_path)
    msg = f"signed under a different secret \\(key id {key_id(SECRET)}, yours is {key_id(b'other')}\\)"
    with pytest.raises(WrongSecretError, match=msg):
        ManifestReader(tmp_path, b"other")


@pytest.mark.parametrize("name, key", [(HEADER_FILE, "sig"), (STATE_FILE, "sig"), (JOURNAL_FILE, "mac")])
def test_unsigned_records_are_refused(tmp_path, name, key):
    write_run(tmp_path)
    path = tmp_path / name
    if name == JOURNAL_FILE:
        edit_line(path, 0, lambda d: {k: v for k, v in d.items() if k != key})
    else:
        doc = json.loads(path.read_text())
        del doc[key]
        path.write_text(json.dumps(doc))
    with pytest.raises(UnsignedManifestError, match="unsigned"):
        read_all(tmp_path)


def test_provenance_mismatch_lists_each_differing_field(tmp_path):
    write_run(tmp_path)
    h = ManifestReader(tmp_path, SECRET).header
    check_provenance(h, provenance(producer_version="0.2.0"))  # a newer producer version is fine
    with pytest.raises(ProvenanceMismatchError) as e:
        check_provenance(h, provenance(hidden_size=128, aux_layer_ids=(1, 2, 3)))
    assert "hidden_size: manifest has 64, this config gives 128" in str(e.value)
    assert "aux_layer_ids: manifest has (1, 3, 5)" in str(e.value)
    assert "tokenizer_hash" not in str(e.value)


def test_manifest_of_unknown_format_version_is_refused(tmp_path):
    with pytest.raises(ValueError, match="format_version 9"):
        header(format_version=9)
    write_run(tmp_path)
    edit_record(tmp_path / HEADER_FILE, "header", "format_version", 3)
    with pytest.raises(ManifestError, match="manifest format version 3; this DraftFlow reads 2"):
        ManifestReader(tmp_path, SECRET)
    edit_record(tmp_path / HEADER_FILE, "header", "format_version", 1)  # unsigned samples: recapture
    with pytest.raises(ManifestError, match="version 1; .*older DraftFlow.*unsigned.*store gc --what all"):
        ManifestReader(tmp_path, SECRET)


# ------------------------------------------------------------------ consume-once claims

def test_consumers_holding_claims_do_not_wait_on_each_other(tmp_path):
    """Two consumers each hold one uncommitted claim at the end of a sealed run: neither
    may block on the other's claim (that deadlocked until the wait timeout); once both
    commit, the stream ends."""
    from draftflow.control.binding import RunKeys
    from draftflow.control.claims import ClaimBook
    from draftflow.control.sources import ClaimingRefSource
    from draftflow.train.batches import EndOfStream, Pending

    class Store:
        def delete(self, ref):
            pass

    write_run(tmp_path, n=2)
    keys = RunKeys(SECRET, "s")
    a, b = (ClaimingRefSource(ManifestReader(tmp_path, SECRET), Store(),
                              ClaimBook(tmp_path / "claims", owner, claim_timeout_s=60, keys=keys), timeout_s=30,
                              poll_s=0.01)
            for owner in ("a", "b"))
    x = a.resolve(0)
    y = b.resolve(0)
    assert {x.sample_id, y.sample_id} == {"s0000", "s0001"}
    start = time.monotonic()
    with pytest.raises(Pending):
        a.resolve(1)  # y is claimed by b, and a still holds x
    with pytest.raises(Pending):
        b.resolve(1)
    assert time.monotonic() - start < 5
    a.commit([x.sample_id])
    b.commit([y.sample_id])
    a.close()  # waits for the commits in flight
    b.close()
    with pytest.raises(EndOfStream):  # all done: nothing left to wait for
        a.resolve(1)
