"""Mooncake Store backend: features in a Mooncake cluster, moved zero-copy.

Data path. One host buffer is allocated, pre-touched and registered with Mooncake
once, when the store opens (registration pins and maps memory for the transfer
engine; doing it per call would cost more than the transfer). A put copies the
sample's tensors into a range of that buffer and sends all features with ONE
`batch_put_from`; a get reads them into a range and returns tensors that are views
of it, checked against the ref's checksums. Nothing is serialized and no existence
RPC is made on either path.

Reads. A get reads the features with `get_into_ranges` (byte ranges of their
objects), not `batch_get_into`: in mooncake 0.3.13 the latter spins on a core while
it waits for the transfer, which on a small host slows the very transfer it waits
for (docs/benchmarks.md); `get_into_ranges` blocks. With
`features.mooncake.chunk_bytes` set, the sample's bytes are cut into chunks that a
worker thread reads in order while this thread hashes each chunk that has landed,
so only the last chunk's hash is not hidden behind a transfer.

Lease lifetime. Tensors of a `Lease` view the store's buffer until `release(lease)`;
after that the range is reused by later gets, so a consumer that keeps data past
release must copy it (the loader's batch collation does).

Keys. `<namespace>/<sample_id>/<generation>/<feature>`, where the namespace is an
HMAC of the run id under the run secret (`RunKeys.namespace`): nobody without the
secret can name, and so plant, a key of the run. A put never writes a key twice
(Mooncake keeps the old value when a key is put again), because every put draws a
new generation. `<namespace>/<sample_id>/ref` holds the sample's signed `SampleRef`
as JSON; it is upserted after the features, so it is the moment of publication, and
`lookup` reads it to let a producer rerun skip published samples (a ref this run did
not sign is ignored and the sample captured again; `get` refuses it). A re-put leaves the older
generation's objects in place (delete the old ref first); features of a put that
crashed before its ref was written are reachable only by `cleanup_run`.

Capacity. Objects are hard-pinned, so Mooncake never evicts an unconsumed sample.
The master's allocator is the byte account: a put that does not fit fails with
NO_AVAILABLE_HANDLE; the store then removes what the batch did write and waits
(bounded by `features.mooncake.full_timeout_s`) for consumers to free room, then
raises `StoreFullError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Mapping

import torch
import xxhash

from draftflow.records import SampleRef, validate_sample_id
from draftflow.stores.base import (LandingChecksum, Lease, RoomWanted, StoreError, algorithm_of, check_signed,
                                   checksum_mismatch, make_spec, signed_or_none, tensor_bytes)
from draftflow.stores.mooncake_service import MooncakeService, apply_mooncake_env, http_get, port_open
from draftflow.stores.shared_dir import resolve_release

_ALIGN = 64  # every feature starts 64-byte aligned in the buffer, so any dtype can view it
_MAX_REF_BYTES = 64 << 10  # a ref is ~1 KiB of JSON

OBJECT_NOT_FOUND = -704
REPLICA_IS_NOT_READY = -703
NO_AVAILABLE_HANDLE = -200
_CODES = {  # mooncake-store/include/types.h, ErrorCode
    -1: ("INTERNAL_ERROR", ""),
    -101: ("SEGMENT_NOT_FOUND", ": no segment is mounted; is the segment holder running?"),
    -200: ("NO_AVAILABLE_HANDLE", ": no room left in the store's segments"),
    -400: ("INVALID_KEY", ""),
    -600: ("INVALID_PARAMS", ": a size or buffer does not match the stored object"),
    -703: ("REPLICA_IS_NOT_READY", ": its put has not completed (or its writer died during it)"),
    -704: ("OBJECT_NOT_FOUND", ": consumed or deleted already, never put, or its segment holder restarted"),
    -705: ("OBJECT_ALREADY_EXISTS", ""),
    -706: ("OBJECT_HAS_LEASE", ": a recent read holds a lease (about 10 s); remove it with force"),
    -707: ("LEASE_EXPIRED", ": the read lease ran out before the transfer ended"),
    -800: ("TRANSFER_FAIL", ": the data transfer failed; is the segment holder alive?"),
    -900: ("RPC_FAIL", ": the master did not answer"),
}


class MooncakeError(StoreError):
    """A Mooncake call failed; `code` is Mooncake's integer error code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StoreFullError(MooncakeError):
    """No room for a sample, even after waiting for consumers to free some."""


class SampleMissingError(MooncakeError):
    """The sample's objects are not in the store."""


class LeaseHeldError(MooncakeError):
    """An object cannot be removed yet: a reader's lease on it is live."""


_ERROR_CLASSES = {NO_AVAILABLE_HANDLE: StoreFullError, OBJECT_NOT_FOUND: SampleMissingError, -706: LeaseHeldError}


def error_for(code: int, what: str) -> MooncakeError:
    """The exception for Mooncake error `code` while doing `what` (names the code and a likely cause)."""
    name, hint = _CODES.get(code, ("unknown error", ""))
    return _ERROR_CLASSES.get(code, MooncakeError)(f"{what}: Mooncake error {code} ({name}){hint}", code)


def default_run_id(root: str | Path) -> str:
    """A run id derived from the absolute features root (the same for every role of a run);
    keys are namespaced by an HMAC of it (`RunKeys.namespace`), not by the id itself."""
    return "root-" + xxhash.xxh3_64_hexdigest(str(Path(root).expanduser().resolve()).encode())


def _new_generation() -> str:
    # Time-ordered and unique across processes without coordination: a re-put of a
    # sample never collides with the keys of an earlier put.
    return f"g{time.time_ns():x}{os.urandom(3).hex()}"


def _layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of consecutive `_ALIGN`-aligned blocks of `sizes`, and their total."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // _ALIGN) * _ALIGN
    return offsets, max(end, _ALIGN)


def ranges_args(buffer_ptr: int, keys: list[str], feature_offsets: list[int],
                chunk: list[tuple[int, int, int]]) -> tuple[list, ...]:
    """`get_into_ranges` arguments for one chunk (see `_chunks`): each piece of feature i
    goes from its object at `start` to `feature_offsets[i] + start` in the buffer."""
    return ([buffer_ptr], [[keys[i] for i, _, _ in chunk]], [[[feature_offsets[i] + start] for i, start, _ in chunk]],
            [[[start] for _, start, _ in chunk]], [[[size] for _, _, size in chunk]])


def _chunks(sizes: list[int], chunk_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive bytes of features of `sizes`, cut into chunks of `chunk_bytes` (the
    last may be shorter); a chunk is a list of (feature index, start, size) pieces."""
    chunks, chunk, room = [], [], chunk_bytes
    for i, n in enumerate(sizes):
        start = 0
        while start < n:
            size = min(n - start, room)
            chunk.append((i, start, size))
            start, room = start + size, room - size
            if room == 0:
                chunks.append(chunk)
                chunk, room = [], chunk_bytes
    return chunks + [chunk] if chunk else chunks


class _BufferPool:
    """One host buffer, registered once, handed out in byte ranges (first fit)."""

    def __init__(self, num_bytes: int):
        # zeros, not empty: writing every page now keeps first-touch page faults
        # (several times slower than later writes) out of the transfers.
        self.data = torch.zeros(num_bytes, dtype=torch.uint8)
        self.ptr = self.data.data_ptr()
        self.num_bytes = num_bytes
        self._free = [(0, num_bytes)]  # sorted, coalesced (offset, size) holes
        self._cond = threading.Condition()

    def alloc(self, size: int, timeout_s: float) -> int:
        """Offset of a free range of `size` bytes; waits for `free` up to `timeout_s`."""
        if size > self.num_bytes:
            raise StoreError(f"a sample of {size} bytes exceeds the registered buffer of {self.num_bytes} "
                             "bytes; raise features.mooncake.buffer_bytes")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for i, (off, hole) in enumerate(self._free):
                    if hole >= size:
                        self._free[i:i + 1] = [(off + size, hole - size)] if hole > size else []
                        return off
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreError(f"registered buffer full ({self.num_bytes} bytes): release leases "
                                     "sooner or raise features.mooncake.buffer_bytes")
                self._cond.wait(left)

    def free(self, off: int, size: int) -> None:
        with self._cond:
            holes = sorted(self._free + [(off, size)])
            merged = [holes[0]]
            for o, n in holes[1:]:
                last_o, last_n = merged[-1]
                if last_o + last_n == o:
                    merged[-1] = (last_o, last_n + n)
                else:
                    merged.append((o, n))
            self._free = merged
            self._cond.notify_all()

    def view(self, off: int, size: int) -> torch.Tensor:
        return self.data[off:off + size]


def _connect(mc):
    """A Mooncake client set up for config `mc` (features.mooncake); clear errors first."""
    if not mc.master or not mc.metadata_server:
        raise ValueError("features.mooncake.master and features.mooncake.metadata_server are required "
                         "(e.g. from the file `draftflow store serve --backend mooncake --config-out` writes)")
    host, _, port = mc.master.rpartition(":")
    if not port.isdigit() or not port_open(host, int(port)):
        # setup() itself would retry for about 90 s before failing
        raise StoreError(f"features.mooncake.master: no Mooncake master answers at {mc.master!r}")
    if http_get(mc.metadata_server + "?key=draftflow-probe")[0] == 0:
        raise StoreError(f"features.mooncake.metadata_server: nothing answers at {mc.metadata_server!r}")
    apply_mooncake_env(mc.local_hostname)
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise StoreError("features.backend 'mooncake' needs `pip install mooncake-transfer-engine-non-cuda` "
                         f"(CPU) or `mooncake-transfer-engine` (CUDA), and Debian's libibverbs1 ({e})") from None
    client = MooncakeDistributedStore()
    rc = client.setup(mc.local_hostname, mc.metadata_server, mc.global_segment_size, 0, mc.protocol,
                      mc.device_name, mc.master)
    if rc != 0:
        raise StoreError(f"Mooncake client setup failed (code {rc}) for master {mc.master}")
    return client


class MooncakeStore:
    """FeatureStore on a Mooncake cluster (see the module docstring for the data path)."""

    def __init__(self, features_cfg, keys, *, run_id: str | None = None, service: MooncakeService | None = None):
        """Connect to `features.mooncake.master`; `keys` (`control.binding.RunKeys`) sign refs
        and name the key namespace. `service`, if given, is stopped by `close()`."""
        mc = features_cfg.mooncake
        self.release_policy = resolve_release(features_cfg.release)
        self.run_id = run_id or mc.run_id or default_run_id(features_cfg.root)
        if not self.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum() or len(self.run_id) > 64:
            raise ValueError(f"features.mooncake.run_id: {self.run_id!r}, expected 1-64 characters of [A-Za-z0-9_.-]")
        self.keys = keys
        self.namespace = keys.namespace(self.run_id)
        if mc.buffer_bytes < (1 << 20):
            raise ValueError(f"features.mooncake.buffer_bytes: expected at least 1 MiB, got {mc.buffer_bytes}")
        if mc.chunk_bytes is not None and (mc.chunk_bytes <= 0 or mc.chunk_bytes % _ALIGN):
            raise ValueError(f"features.mooncake.chunk_bytes: expected a positive multiple of {_ALIGN} or null, "
                             f"got {mc.chunk_bytes}")
        self.chunk_bytes = mc.chunk_bytes
        self.master = mc.master
        self.full_timeout_s = mc.full_timeout_s
        self._room = RoomWanted(features_cfg.root)
        self._service = service
        self._client = _connect(mc)
        self._pool = _BufferPool(mc.buffer_bytes)
        rc = self._client.register_buffer(self._pool.ptr, self._pool.num_bytes)
        if rc != 0:
            self._client.close()
            raise error_for(rc, f"registering {mc.buffer_bytes} bytes with Mooncake")
        from mooncake.store import ReplicateConfig
        self._pin = ReplicateConfig()
        self._pin.with_hard_pin = True  # never evicted: an evicted sample would be lost, not re-captured
        self._leases: dict[int, tuple[Lease, int, int]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mooncake-put")  # see put()
        # Its own thread: a get must not queue behind a put that waits for room.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="mooncake-get")  # see get()

    # keys ---------------------------------------------------------------------------
    def _ref_key(self, sample_id: str) -> str:
        return f"{self.namespace}/{sample_id}/ref"

    def _uri(self, sample_id: str, generation: str) -> str:
        return f"mooncake://{self.master}/{self.namespace}/{sample_id}/{generation}"

    @staticmethod
    def feature_keys(ref: SampleRef) -> list[str]:
        """Mooncake keys of `ref`'s non-empty features (empty ones are not stored)."""
        if not ref.uri.startswith("mooncake://"):
            raise StoreError(f"sample {ref.sample_id!r}: {ref.uri} is not a Mooncake ref")
        prefix = ref.uri.removeprefix("mooncake://").partition("/")[2]
        return [f"{prefix}/{f.name}" for f in ref.features if f.num_bytes]

    # FeatureStore -------------------------------------------------------------------
    def put(self, sample_id: str, index: int, tensors: Mapping[str, torch.Tensor]) -> SampleRef:
        """Publish one sample; blocks while the store is full (see module docstring)."""
        validate_sample_id(sample_id)
        for name in tensors:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"sample {sample_id!r}: feature name {name!r} must be [A-Za-z0-9_]")
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        offsets, total = _layout(sizes + [_MAX_REF_BYTES])
        base = self._pool.alloc(total, self.full_timeout_s)
        try:
            # Copy every feature into the registered buffer, then start the transfer in a
            # worker thread; meanwhile the source tensors (the same bytes) are checksummed.
            # The copy, the transfer and xxhash release the GIL, so the checksums cost
            # little wall time. The ref, which carries them, is written last.
            sources = {name: t.detach().contiguous() for name, t in tensors.items()}
            for (name, t), o in zip(sources.items(), offsets):
                self._pool.view(base + o, t.numel() * t.element_size()).copy_(t.view(-1).view(torch.uint8))
            uri = self._uri(sample_id, _new_generation())
            prefix = uri.removeprefix("mooncake://").partition("/")[2]  # as feature_keys() derives it
            keys = [f"{prefix}/{name}" for name, t in sources.items() if t.numel()]
            ptrs = [self._pool.ptr + base + o for (name, t), o in zip(sources.items(), offsets) if t.numel()]
            sizes = [t.numel() * t.element_size() for t in sources.values() if t.numel()]
            transfer = self._executor.submit(self._put_with_room, sample_id, sum(sizes), keys, ptrs, sizes)
            try:
                specs = tuple(make_spec(name, t if t.device.type == "cpu" else self._pool.view(
                    base + o, t.numel() * t.element_size()).view(t.dtype).view(t.shape))
                    for (name, t), o in zip(sources.items(), offsets))
            finally:
                transfer.result()
            ref = self.keys.sign_ref(SampleRef(sample_id=sample_id, index=index, uri=uri,
                                               num_tokens=int(tensors["input_ids"].shape[0]), features=specs))
            ref_json = json.dumps(ref.to_dict()).encode()
            if len(ref_json) > _MAX_REF_BYTES:
                self._remove(keys, f"sample {sample_id!r}")
                raise StoreError(f"sample {sample_id!r}: ref of {len(ref_json)} bytes exceeds {_MAX_REF_BYTES}")
            ref_bytes = torch.frombuffer(bytearray(ref_json), dtype=torch.uint8)
            self._pool.view(base + offsets[-1], len(ref_json)).copy_(ref_bytes)
            rc = self._client.upsert_from(self._ref_key(sample_id), self._pool.ptr + base + offsets[-1],
                                          len(ref_json), self._pin)
            if rc != 0:
                self._remove(keys, f"sample {sample_id!r}")
                raise error_for(rc, f"sample {sample_id!r}: publishing its ref")
        finally:
            self._pool.free(base, total)
        return ref

    def _put_with_room(self, sample_id: str, num_bytes: int, keys: list[str], ptrs: list[int],
                       sizes: list[int]) -> None:
        deadline = time.monotonic() + self.full_timeout_s
        delay = 0.01
        try:
            while True:
                codes = self._client.batch_put_from(keys, ptrs, sizes, self._pin)
                if all(c == 0 for c in codes):
                    return
                # A batch can half succeed; a partial sample must not stay behind.
                self._remove([k for k, c in zip(keys, codes) if c == 0], f"sample {sample_id!r}")
                code = next(c for c in codes if c != 0)
                if code != NO_AVAILABLE_HANDLE:
                    raise error_for(code, f"sample {sample_id!r}: put")
                self._room.raise_flag()  # consume-once consumers checkpoint early to free samples
                if time.monotonic() + delay > deadline:
                    raise StoreFullError(
                        f"store full: no room for sample {sample_id!r} ({num_bytes} bytes) after waiting "
                        f"{self.full_timeout_s:g} s (features.mooncake.full_timeout_s): consumers are not releasing "
                        "samples, the segment (features.mooncake.segment_bytes) is smaller than a sample, or no "
                        "segment holder is running",
                        NO_AVAILABLE_HANDLE)
                time.sleep(delay)
                delay = min(2 * delay, 0.5)
        finally:
            self._room.lower_flag()

    def lookup(self, sample_id: str, index: int) -> SampleRef | None:
        """The published ref of `sample_id`, or None; one read plus one batched existence check."""
        validate_sample_id(sample_id)
        base = self._pool.alloc(_MAX_REF_BYTES, self.full_timeout_s)
        try:
            n = self._client.get_into(self._ref_key(sample_id), self._pool.ptr + base, _MAX_REF_BYTES)
            if n == OBJECT_NOT_FOUND:
                return None
            if n == REPLICA_IS_NOT_READY:
                # The ref is written last, so this is a writer (a killed producer) that died
                # while publishing it: not published. Try to drop the remnant, ignoring the
                # result (an unfinished object may refuse removal); the caller captures the
                # sample again and upserts its ref over whatever is left.
                self._client.batch_remove([self._ref_key(sample_id)], True)
                return None
            if n < 0:
                raise error_for(n, f"sample {sample_id!r}: reading its ref")
            raw = self._pool.view(base, n).numpy().tobytes()
        finally:
            self._pool.free(base, _MAX_REF_BYTES)
        try:
            ref = SampleRef.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            ref = None  # not a DraftFlow ref
        ref = signed_or_none(self.keys, ref, sample_id, f"Mooncake key {self._ref_key(sample_id)}")
        if ref is None:
            return None  # not ours: the caller captures the sample again and upserts its ref
        if ref.index != index:
            raise StoreError(f"{self._ref_key(sample_id)}: holds sample index {ref.index}, expected {index} "
                             "(the store was filled from different data)")
        found = self._client.batch_is_exist(self.feature_keys(ref))
        if all(x == 1 for x in found):
            return ref
        if any(x < 0 for x in found):
            raise StoreError(f"sample {sample_id!r}: existence check failed ({found})")
        self.delete(ref)  # features lost (holder restarted): drop the remnants, let the caller re-put
        return None

    def get(self, ref: SampleRef) -> Lease:
        """Read a sample into the registered buffer; tensors view it until `release`."""
        check_signed(self.keys, ref, ref.uri)  # no RPC: one HMAC over the ref
        offsets, total = _layout([f.num_bytes for f in ref.features])
        base = self._pool.alloc(total, self.full_timeout_s)
        try:
            tensors = {f.name: self._pool.view(base + o, f.num_bytes).view(_dtype(f.dtype)).reshape(f.shape)
                       for f, o in zip(ref.features, offsets)}
            self._read_verified(ref, base, offsets)
        except BaseException:
            self._pool.free(base, total)
            raise
        lease = Lease(ref, tensors)
        with self._lock:
            self._leases[id(lease)] = (lease, base, total)
        return lease

    def _read_verified(self, ref: SampleRef, base: int, offsets: list[int]) -> None:
        """Read `ref`'s features into the buffer at `base`, chunk by chunk, and check them.

        The reader thread fetches the chunks back to back (the transfer releases the GIL);
        this thread checksums what has landed (`LandingChecksum`: whole 8 MiB checksum
        chunks, on the checksum threads; xxhash releases the GIL). Without chunk_bytes
        the read is one call and the checksums run once it is done."""
        stored = [(f, o) for f, o in zip(ref.features, offsets) if f.num_bytes]
        keys = self.feature_keys(ref)
        sums = [LandingChecksum(tensor_bytes(self._pool.view(base + o, f.num_bytes)), algorithm_of(f.checksum))
                for f, o in stored]
        sizes = [f.num_bytes for f, _ in stored]
        chunks = _chunks(sizes, self.chunk_bytes or sum(sizes))
        feature_offsets = [base + o for _, o in stored]

        def landed(chunk):
            for i, start, size in chunk:
                sums[i].landed(start + size)

        if len(chunks) > 1:
            fetches = [self._reader.submit(self._fetch, ref, keys, feature_offsets, chunk) for chunk in chunks]
            try:
                for chunk, fetch in zip(chunks, fetches):
                    fetch.result()
                    landed(chunk)
            finally:
                _stop(fetches)  # nothing may still write into the range when the caller frees it
        else:  # one read: nothing to overlap the checksums with, so no hop to the reader thread
            for chunk in chunks:
                self._fetch(ref, keys, feature_offsets, chunk)
                landed(chunk)
        for (f, _), checked in zip(stored, sums):
            if checked.value() != f.checksum:
                raise checksum_mismatch(ref, f, checked.value())

    def _fetch(self, ref: SampleRef, keys: list[str], feature_offsets: list[int],
               chunk: list[tuple[int, int, int]]) -> None:
        """One chunk: its pieces of features' objects into their places in the buffer."""
        results = self._client.get_into_ranges(*ranges_args(self._pool.ptr, keys, feature_offsets, chunk))
        for (i, start, size), (code,) in zip(chunk, results[0]):
            if code < 0:
                raise error_for(code, f"sample {ref.sample_id!r}: get {keys[i]}")
            if code != size:
                raise StoreError(f"sample {ref.sample_id!r}: {keys[i]} gave {code} bytes at offset {start}, "
                                 f"expected {size}")

    def release(self, lease: Lease) -> None:
        """Done with `lease`: its buffer range is reused. (Consume-once removal happens
        through `delete`, called once the step that trained the sample is done.)"""
        with self._lock:
            entry = self._leases.pop(id(lease), None)
        if entry is None or entry[0] is not lease:
            raise StoreError(f"sample {lease.ref.sample_id!r}: lease not from this store or released twice")
        self._pool.free(entry[1], entry[2])

    def delete(self, ref: SampleRef) -> None:
        """Remove a sample's features and its ref key (missing ones are fine)."""
        self._remove(self.feature_keys(ref) + [self._ref_key(ref.sample_id)], f"sample {ref.sample_id!r}")

    def _remove(self, keys: list[str], what: str) -> None:
        # force=True: our own read left a lease of ~10 s on each object, and waiting it
        # out would stall the consumer. Safe because a sample is removed only by the one
        # consumer that held it (consume-once claims) or by an operator.
        if not keys:
            return
        for key, code in zip(keys, self._client.batch_remove(keys, True)):
            if code not in (0, OBJECT_NOT_FOUND):
                raise error_for(code, f"{what}: removing {key}")

    def cleanup_run(self) -> int:
        """Remove every key of this store's run (its namespace), e.g. after a failed run."""
        n = self._client.remove_by_regex("^" + self.namespace + "/", True)
        if n < 0:
            raise error_for(n, f"removing the keys of run {self.run_id!r}")
        return n

    def close(self) -> None:
        """Disconnect; stop the service this store started, if any. Idempotent."""
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        if self._client is not None:
            self._client.unregister_buffer(self._pool.ptr)
            self._client.close()
            self._client = None
        if self._service is not None:
            self._service.stop()
            self._service = None

    def __enter__(self) -> "MooncakeStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop(fetches: list[Future]) -> None:
    """Cancel the fetches not started yet and wait for the one running, if any."""
    for fetch in fetches:
        fetch.cancel()
    wait(fetches)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreError(f"unknown feature dtype {name!r}")
    return dtype


def open_mooncake_store(features_cfg, keys, *, run_id: str | None = None) -> MooncakeStore:
    """A MooncakeStore; with no `features.mooncake.master` (colocated runs) it starts a
    private service (master + holder of `segment_bytes`) that `close()` stops."""
    mc = features_cfg.mooncake
    if mc.master:
        return MooncakeStore(features_cfg, keys, run_id=run_id)
    service = MooncakeService(segment_bytes=mc.segment_bytes, host=mc.local_hostname).start()
    try:
        local = dataclasses.replace(mc, master=service.master, metadata_server=service.metadata_server)
        return MooncakeStore(dataclasses.replace(features_cfg, mooncake=local), keys, run_id=run_id, service=service)
    except BaseException:
        service.stop()
        raise
