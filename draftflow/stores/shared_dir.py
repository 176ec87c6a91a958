"""Shared directory store: sample files on a POSIX mount (NFS, Lustre) seen by many hosts.

The file format, atomic publish (temp file, fsync, rename) and checksum-verified
reads are `LocalStore`'s; this class adds what sharing needs:

- release policy (recorded in the manifest). `retain` keeps every sample for further
  epochs. In `consume_once` runs the consumer's ref source hands each sample to exactly
  one consumer (claims in `control/claims/`, see `draftflow.control.sources`) and,
  once the step that trained it is done, calls `delete`, which frees the file.
- back-pressure for consume-once runs: the producer calls `wait_for_room` before a
  put and blocks while published-but-unconsumed bytes exceed
  `features.max_inflight_bytes`.

Back-pressure bookkeeping is one small counter file per writer under
`control/progress/`: `published` (the producer's total bytes put) and
`consumed-<owner>` (each consumer's total bytes released). Each is overwritten in
place at a fixed width, so a put or a release costs one small write, and the
producer's check reads one file per consumer, never one per sample (counting
`done/` entries would be O(samples)). Counters are advisory flow control and not
fsync'd: a crash can lose the last few counts, never a sample.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping

import torch

from draftflow.control.claims import default_owner
from draftflow.control.manifest import RELEASE_POLICIES
from draftflow.fsutil import naming
from draftflow.records import SampleRef
from draftflow.stores.base import RoomWanted, StoreError
from draftflow.stores.local import LocalStore

_COUNTER_WIDTH = 20  # digits; fits any byte count, so every write has the same size


def resolve_release(policy: str) -> str:
    """`auto` -> `retain` (the trainer may run several epochs); others unchanged."""
    if policy not in RELEASE_POLICIES:
        raise ValueError(f"features.release: {policy!r}, expected auto, retain or consume_once")
    return "retain" if policy == "auto" else policy


def _counter_name(owner: str) -> str:
    return "consumed-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in owner)


class _Counter:
    """A monotonically growing byte count in a fixed-width file, overwritten in place."""

    def __init__(self, path: Path):
        self.path = path
        self.value = read_counter(path) if path.exists() else 0

    def add(self, num_bytes: int) -> None:
        self.value += num_bytes
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with naming(self.path):
                os.pwrite(fd, f"{self.value:0{_COUNTER_WIDTH}d}\n".encode(), 0)
        finally:
            os.close(fd)


def read_counter(path: Path) -> int:
    text = path.read_text().strip()
    if not text.isdigit():
        raise StoreError(f"{path}: expected a byte count, found {text[:40]!r}")
    return int(text)


class SharedDirStore(LocalStore):
    """FeatureStore over a shared folder: `<root>/samples/` and `<root>/control/`."""

    def __init__(self, features_cfg, keys, owner: str | None = None):
        super().__init__(features_cfg.root, keys)
        self.control_dir = self.root / "control"
        self.progress_dir = self.control_dir / "progress"
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        self.release_policy = resolve_release(features_cfg.release)
        self.max_inflight_bytes = features_cfg.max_inflight_bytes
        self.wait_timeout_s = features_cfg.wait_timeout_s
        self._room = RoomWanted(self.root)
        self.owner = owner or default_owner()
        self._published: _Counter | None = None  # opened on the first put: producers only
        self._consumed: _Counter | None = None  # opened on the first release: consumers only
        self._consumed_seen: dict[str, int] = {}  # last good value of each consumer's counter

    # ------------------------------------------------------------ producer side

    def put(self, sample_id: str, index: int, tensors: Mapping[str, torch.Tensor]) -> SampleRef:
        ref = super().put(sample_id, index, tensors)
        if self._published is None:
            self._published = _Counter(self.progress_dir / "published")
        self._published.add(ref.num_bytes)
        return ref

    def inflight_bytes(self) -> int:
        """Bytes published but not yet released by a consumer (reads one file per consumer)."""
        return self._total_published() - self._total_consumed()

    def _total_published(self) -> int:
        if self._published is not None:
            return self._published.value  # this process is the producer
        path = self.progress_dir / "published"
        return read_counter(path) if path.exists() else 0

    def _total_consumed(self) -> int:
        for entry in os.scandir(self.progress_dir):
            if entry.name.startswith("consumed-"):
                try:
                    self._consumed_seen[entry.name] = read_counter(Path(entry.path))
                except StoreError:
                    pass  # caught mid-overwrite: keep the last good value
        return sum(self._consumed_seen.values())

    def wait_for_room(self, num_bytes: int, poll_s: float = 0.05) -> None:
        """Block (consume-once only) until `num_bytes` more fit under max_inflight_bytes.

        A sample always fits when nothing is in flight, however large. Raises
        StoreError if consumers make no progress for `features.wait_timeout_s`.
        """
        if self.release_policy != "consume_once":
            return
        try:
            self._wait_for_room(num_bytes, poll_s)
        finally:
            self._room.lower_flag()

    def _wait_for_room(self, num_bytes: int, poll_s: float) -> None:
        last_consumed, last_progress = None, time.monotonic()
        while True:
            consumed = self._total_consumed()
            inflight = self._total_published() - consumed
            if inflight <= 0 or inflight + num_bytes <= self.max_inflight_bytes:
                return
            self._room.raise_flag()  # consume-once consumers checkpoint early to free samples
            if consumed != last_consumed:
                last_consumed, last_progress = consumed, time.monotonic()
            elif time.monotonic() - last_progress > self.wait_timeout_s:
                raise StoreError(
                    f"{self.root}: {inflight} bytes published but not consumed (features.max_inflight_bytes="
                    f"{self.max_inflight_bytes}) and no consumer progress for {self.wait_timeout_s:g} s; "
                    "are the consumers running?")
            time.sleep(poll_s)

    # ------------------------------------------------------------ consumer side
    def delete(self, ref: SampleRef) -> None:
        """Free a sample's file and count its bytes as consumed (back-pressure)."""
        try:
            self.path_of(ref.sample_id).unlink()
        except FileNotFoundError:
            return  # already freed (e.g. by a consumer that took the claim over): count it once
        if self._consumed is None:
            self._consumed = _Counter(self.progress_dir / _counter_name(self.owner))
        self._consumed.add(ref.num_bytes)
