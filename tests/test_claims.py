"""ClaimBook ownership: done/release after a steal, and adoption after a restart (real files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from draftflow.control.binding import RunKeys
from draftflow.control.claims import ClaimBook, ClaimLostError, consumer_identity, default_owner

KEYS = RunKeys(b"store-secret", "store-1")


def book(tmp_path: Path, owner: str, identity: str | None = None, timeout_s: float = 60) -> ClaimBook:
    return ClaimBook(tmp_path, owner, timeout_s, KEYS, identity=identity)


def make_stale(tmp_path: Path, name: str) -> None:
    os.utime(tmp_path / "claims" / name, (0, 0))  # its owner stalled long past the timeout


def claim_files(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "claims").iterdir() if not p.name.startswith(".")}


def test_done_after_a_steal_raises_and_writes_no_marker(tmp_path):
    a, b = book(tmp_path, "a:1:x"), book(tmp_path, "b:2:y")
    assert a.try_claim("s0")
    make_stale(tmp_path, "s0@0")
    assert b.try_claim("s0")
    with pytest.raises(ClaimLostError, match=r"s0@0.*taken over by b:2:y.*not marked done") as lost:
        a.done("s0")
    assert (lost.value.sample_id, lost.value.holder, lost.value.marked) == ("s0", "b:2:y", False)
    assert lost.value.claim_file == tmp_path / "claims" / "s0@0"
    assert not a.is_done("s0")
    assert "s0@1" in claim_files(tmp_path)  # the new owner's claim stands
    b.done("s0")  # returns: b may free the data
    assert b.is_done("s0") and claim_files(tmp_path) == set()


def test_release_after_a_steal_keeps_the_new_owners_claim(tmp_path):
    a, b = book(tmp_path, "a:1:x"), book(tmp_path, "b:2:y")
    assert a.try_claim("s0")
    make_stale(tmp_path, "s0@0")
    assert b.try_claim("s0")
    a.release("s0")
    assert claim_files(tmp_path) == {"s0@0", "s0@1"}  # a gap below s0@1 would let a third one in
    assert not book(tmp_path, "c:3:z").try_claim("s0")
    assert b.renew_all() == [] and b.held() == {"s0"}


def test_release_of_a_held_claim_lets_another_consumer_claim_it(tmp_path):
    a = book(tmp_path, "a:1:x")
    assert a.try_claim("s0")
    a.release("s0")
    assert a.held() == frozenset() and claim_files(tmp_path) == set()
    assert book(tmp_path, "b:2:y").try_claim("s0")


class _StolenDuringMarker(ClaimBook):
    """Another consumer steals the claim after done's first check, before the marker is linked."""

    def _write_marker(self, sample_id: str, gen: int) -> None:
        make_stale(self.claims_dir.parent, f"{sample_id}@{gen}")
        assert self.thief.try_claim(sample_id)  # it looks for the marker before it exists
        super()._write_marker(sample_id, gen)


def test_steal_racing_done_marks_done_but_keeps_the_data_for_the_stealer(tmp_path):
    a = _StolenDuringMarker(tmp_path, "a:1:x", 60, KEYS)
    a.thief = book(tmp_path, "b:2:y")
    assert a.try_claim("s0")
    with pytest.raises(ClaimLostError, match="marked done, but the new owner may be training it") as lost:
        a.done("s0")
    assert lost.value.marked and a.is_done("s0")
    assert claim_files(tmp_path) == {"s0@1"}  # ours went (the marker covers the gap), the stealer's stays
    assert not book(tmp_path, "c:3:z").try_claim("s0")  # a newcomer sees the marker
    a.thief.done("s0")  # the stealer finishes and frees the data
    assert claim_files(tmp_path) == set()


def test_done_of_a_held_claim_removes_its_chain(tmp_path):
    a = book(tmp_path, "a:1:x")
    assert a.try_claim("s0")
    make_stale(tmp_path, "s0@0")
    b = book(tmp_path, "b:2:y")
    assert b.try_claim("s0")
    assert a.renew_all() == ["s0"]
    b.done("s0")
    assert b.is_done("s0") and claim_files(tmp_path) == set()
    with pytest.raises(ValueError, match="not claimed by"):
        b.done("s0")


def test_restarted_consumer_adopts_its_claims_at_once(tmp_path):
    identity = consumer_identity(tmp_path / "out", 0)
    before = book(tmp_path, default_owner(identity), identity)
    assert before.try_claim("s0") and before.try_claim("s1")
    stranger_id = consumer_identity(tmp_path / "out", 1)
    assert not book(tmp_path, default_owner(stranger_id), stranger_id).try_claim("s0")  # fresh: not its
    assert not book(tmp_path, default_owner()).try_claim("s0")  # no identity: waits for staleness
    after = book(tmp_path, default_owner(identity), identity)
    assert after.try_claim("s0") and after.try_claim("s1")  # fresh, but its own from before the restart
    assert claim_files(tmp_path) == {"s0@0", "s0@1", "s1@0", "s1@1"}
    assert before.renew_all() == ["s0", "s1"] and before.held() == frozenset()
    assert after.renew_all() == [] and after.held() == {"s0", "s1"}
    after.done("s0")
    after.done("s1")
    assert after.is_done("s0") and claim_files(tmp_path) == set()


def test_done_by_the_previous_incarnation_raises_claim_lost(tmp_path):
    identity = consumer_identity(tmp_path / "out", 0)
    before = book(tmp_path, default_owner(identity), identity)
    assert before.try_claim("s0")
    after = book(tmp_path, default_owner(identity), identity)
    assert after.try_claim("s0")
    with pytest.raises(ClaimLostError, match=f"taken over by {after.owner}"):
        before.done("s0")
    assert not after.is_done("s0") and after.renew_all() == []


def test_consumer_identity_is_stable_per_output_dir_and_rank(tmp_path):
    identity = consumer_identity(tmp_path / "out", 0)
    assert identity == consumer_identity(tmp_path / "x" / ".." / "out", 0)
    assert identity != consumer_identity(tmp_path / "out", 1)
    assert identity != consumer_identity(tmp_path / "other", 0)
    owner = default_owner(identity)
    assert owner.startswith(identity + ":") and owner != default_owner(identity)
    with pytest.raises(ValueError, match="must be default_owner"):
        book(tmp_path, "a:1:x", identity)
