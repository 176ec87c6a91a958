"""The FeatureStore contract: how features of one sample are put, read and freed.

Backends (local directory, shared directory, Mooncake) live side by side in this
package and are chosen by `build_store` from `features.backend`. The trainer and
the capture loop see only this protocol and `SampleRef`s, never a backend.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

import torch
import xxhash

from draftflow.records import FeatureSpec, SampleRef

log = logging.getLogger("draftflow.stores")


class StoreError(RuntimeError):
    """A store operation failed; the message names the sample and what went wrong."""


class ChecksumError(StoreError):
    """Bytes read back do not match the checksum recorded when they were put."""


class UnsignedSampleError(StoreError):
    """A sample's ref is not signed under this run's secret for this store."""


class RoomWanted:
    """The producer's "waiting for room" flag (consume-once back-pressure), whatever
    the backend: `control/progress/room-wanted` exists while a put waits for consumers
    to free room. Consumers free samples only when a checkpoint holding their training
    is published; one that sees the flag while holding such samples checkpoints early
    instead of waiting for data that cannot come. Advisory: a stale flag (a producer
    killed while waiting) costs at most one early checkpoint per wait."""

    def __init__(self, features_root: str | Path):
        self.path = Path(features_root) / "control" / "progress" / "room-wanted"
        self._raised = False

    def raise_flag(self) -> None:
        if not self._raised:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            self._raised = True

    def lower_flag(self) -> None:
        """After a wait (a no-op, without a file-system call, when none was needed)."""
        if self._raised:
            self.path.unlink(missing_ok=True)
            self._raised = False

    def wanted(self) -> bool:
        return self.path.exists()


def check_signed(keys, ref: SampleRef, where) -> None:
    """Refuse a ref this run did not sign (`control.binding.RunKeys`): planted, copied
    from another store, or written by an older DraftFlow. One HMAC over the ref's JSON."""
    if not keys.ref_ok(ref):
        raise UnsignedSampleError(f"{where}: sample {ref.sample_id!r} is not signed under this run's secret for "
                                  "this store (planted, copied from another store, or written by an older "
                                  "DraftFlow); refusing to train on it")


def signed_or_none(keys, ref: SampleRef | None, sample_id: str, where) -> SampleRef | None:
    """`lookup`'s check of what it found at `where` (None: unreadable): a ref this run
    signed for `sample_id`, else None with a warning, so that the caller captures the
    sample again and replaces what is there."""
    if ref is not None and ref.sample_id == sample_id and keys.ref_ok(ref):
        return ref
    log.warning("%s: not a sample this run signed for %r (planted, foreign or from an older DraftFlow); "
                "capturing it again", where, sample_id)
    return None


@dataclass(frozen=True, slots=True)
class Lease:
    """Tensors of one sample, held until `FeatureStore.release` is called."""

    ref: SampleRef
    tensors: Mapping[str, torch.Tensor]
    buffer: torch.Tensor | None = None  # backing memory a store may reuse after release


class FeatureStore(Protocol):
    def put(self, sample_id: str, index: int, tensors: Mapping[str, torch.Tensor]) -> SampleRef:
        """Publish one sample atomically: readers see all of it or none of it."""

    def lookup(self, sample_id: str, index: int) -> SampleRef | None:
        """The ref of a sample this run already published, or None (lets a rerun skip
        it); anything there that this run did not sign is None too (captured again)."""

    def get(self, ref: SampleRef) -> Lease:
        """Read a sample: its ref must be signed by this run, every feature must match
        its spec and checksum."""

    def release(self, lease: Lease) -> None:
        """The consumer is done with this lease (frees it in consume-once stores)."""

    def delete(self, ref: SampleRef) -> None:
        """Remove a sample's features."""

    def close(self) -> None:
        """Release connections and buffers."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


# Feature checksums. "xxh3_64c8m:<hex>" (written since 2026-11-26): xxh3_64 of each
# 8 MiB chunk of the bytes, hashed on a few threads at once (xxhash releases the GIL), then
# xxh3_64 over the chunks' 8-byte little-endian digests: one sequential xxh3 cannot be
# split over cores, chunks can (docs/benchmarks.md has the timings). "xxh3_64:<hex>" (one xxh3_64 over all the
# bytes) is what earlier versions wrote; it is still verified. `checksum` and a read that
# hashes as bytes land (`LandingChecksum`) share one chunking path.
CHECKSUM_CHUNK = 8 << 20
CHUNKED = "xxh3_64c8m"
WHOLE = "xxh3_64"
_HASH_THREADS = min(4, os.cpu_count() or 1)
_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="checksum")
        return _hash_pool


def chunk_digests(chunks: list) -> list[int]:
    """xxh3_64 of each chunk (several threads when there are several chunks)."""
    if len(chunks) <= 1 or _HASH_THREADS == 1:
        return [xxhash.xxh3_64_intdigest(c) for c in chunks]
    return list(_pool().map(xxhash.xxh3_64_intdigest, chunks))


def combine_digests(digests: list[int]) -> str:
    return f"{CHUNKED}:" + xxhash.xxh3_64_hexdigest(b"".join(d.to_bytes(8, "little") for d in digests))


class LandingChecksum:
    """The checksum of `data` in `algorithm`, computed while its bytes land in order:
    `landed(n)` says the first n bytes are in place; whole chunks are hashed as soon as
    they are complete (a WHOLE checksum streams instead)."""

    def __init__(self, data, algorithm: str):
        if algorithm not in (CHUNKED, WHOLE):
            raise StoreError(f"unknown checksum algorithm {algorithm!r}; expected {CHUNKED} or {WHOLE}")
        self.data, self.done, self.digests = memoryview(data), 0, []
        self._whole = xxhash.xxh3_64() if algorithm == WHOLE else None

    def landed(self, upto: int) -> None:
        size = len(self.data)
        if self._whole is not None:
            self._whole.update(self.data[self.done:upto])
            self.done = upto
            return
        stop = size if upto >= size else self.done + (upto - self.done) // CHECKSUM_CHUNK * CHECKSUM_CHUNK
        if stop > self.done:
            self.digests += chunk_digests([self.data[i:min(i + CHECKSUM_CHUNK, stop)]
                                           for i in range(self.done, stop, CHECKSUM_CHUNK)])
            self.done = stop

    def value(self) -> str:
        """The checksum (every byte must have landed)."""
        if self._whole is not None:
            return f"{WHOLE}:{self._whole.hexdigest()}"
        return combine_digests(self.digests or chunk_digests([self.data]))


def algorithm_of(checksum_value: str) -> str:
    """The algorithm a stored "<algorithm>:<hex>" checksum was made with."""
    return checksum_value.partition(":")[0]


def checksum(data, algorithm: str = CHUNKED) -> str:
    """The checksum of `data` (bytes or a memoryview) in `algorithm` (see above)."""
    all_at_once = LandingChecksum(data, algorithm)
    all_at_once.landed(len(all_at_once.data))
    return all_at_once.value()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_spec(name: str, t: torch.Tensor) -> FeatureSpec:
    return FeatureSpec(name=name, dtype=dtype_name(t.dtype), shape=tuple(t.shape),
                       num_bytes=t.numel() * t.element_size(), checksum=checksum(tensor_bytes(t)))


def read_from(ref: SampleRef, path: Path | None) -> str:
    """Where a message says `ref` was read: the file read (the producer's URI may name
    another host's mount), with the URI beside it where the two differ."""
    if path is None or Path(path).resolve().as_uri() == ref.uri:
        return ref.uri if path is None else str(path)
    return f"{path} (published as {ref.uri})"


def verify_tensor(ref: SampleRef, name: str, t: torch.Tensor, path: Path | None = None) -> None:
    """Raise ChecksumError/StoreError unless `t` matches the spec of feature `name`
    (`path`: the file `t` was read from, for messages)."""
    spec = next((f for f in ref.features if f.name == name), None)
    if spec is None:
        raise StoreError(f"sample {ref.sample_id!r}: {read_from(ref, path)} holds an unexpected feature {name!r}")
    if dtype_name(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
        raise StoreError(
            f"sample {ref.sample_id!r}: feature {spec.name!r} is {dtype_name(t.dtype)}{list(t.shape)}, "
            f"expected {spec.dtype}{list(spec.shape)} ({read_from(ref, path)})")
    got = checksum(tensor_bytes(t), algorithm_of(spec.checksum))
    if got != spec.checksum:
        raise checksum_mismatch(ref, spec, got, path)


def checksum_mismatch(ref: SampleRef, spec: FeatureSpec, got: str, path: Path | None = None) -> ChecksumError:
    return ChecksumError(f"sample {ref.sample_id!r}: feature {spec.name!r} is corrupt in {read_from(ref, path)} "
                         f"(checksum {got}, expected {spec.checksum})")


def verify_tensors_present(ref: SampleRef, tensors: Mapping[str, torch.Tensor], path: Path | None = None) -> None:
    for spec in ref.features:
        if spec.name not in tensors:
            raise StoreError(f"sample {ref.sample_id!r}: feature {spec.name!r} is missing from "
                             f"{read_from(ref, path)}")


def verify_tensors(ref: SampleRef, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise ChecksumError/StoreError if `tensors` do not match `ref`'s specs exactly."""
    verify_tensors_present(ref, tensors)
    for name, t in tensors.items():
        verify_tensor(ref, name, t)
