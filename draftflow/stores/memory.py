"""In-memory store: the features of an online run, held as tensors in the job's own memory.

An online run (`features.backend: memory`, `capture/online.py`) captures each sample
just before the trainer needs it and puts it here; the loader gets it, copies it into
its batch and releases it, which frees it. Nothing is written to disk and nothing
leaves the process, so there is no file to publish atomically and no byte to corrupt
between put and get: the store keeps no checksums (hashing every feature byte, and
copying GPU features to the host to do it, would guard against nothing). Refs are
still signed, with a key made for this process, so `get` takes only refs this store
handed out, as every backend does.

Memory is bounded: `put_when_room` blocks a put while the held samples and the new
one would exceed `features.max_inflight_bytes`, checking and putting under one lock
(one sample is always let in, so a sample larger than the bound still runs; the online
source also lets in every sample the loader is waiting for). A sample put again while
an earlier copy is unread (an epoch boundary inside the capture window) is counted,
not stored twice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping

import torch

from draftflow.records import FeatureSpec, SampleRef, validate_sample_id
from draftflow.stores.base import Lease, StoreError, check_signed, dtype_name

UNHASHED = "none:"  # the checksum field of an in-memory feature (see module docstring)


@dataclass(slots=True)
class _Held:
    ref: SampleRef
    tensors: dict[str, torch.Tensor]
    count: int  # puts not yet released


class MemoryStore:
    def __init__(self, keys, max_bytes: int):
        self.keys = keys  # control.binding.RunKeys; an online run makes them for this process
        self.max_bytes = max_bytes
        self._held: dict[str, _Held] = {}
        self._cond = threading.Condition(threading.RLock())  # put_when_room calls put under it
        self._closed = False
        self.held_bytes = 0
        self.peak_bytes = 0  # the most held at once (the bound's check in tests and benchmarks)

    def put(self, sample_id: str, index: int, tensors: Mapping[str, torch.Tensor]) -> SampleRef:
        with self._cond:
            held = self._held.get(validate_sample_id(sample_id))
            if held is not None:
                held.count += 1
                return held.ref
            tensors = {k: v.detach() for k, v in tensors.items()}
            specs = tuple(FeatureSpec(name=k, dtype=dtype_name(v.dtype), shape=tuple(v.shape),
                                      num_bytes=v.numel() * v.element_size(), checksum=UNHASHED)
                          for k, v in tensors.items())
            ref = self.keys.sign_ref(SampleRef(sample_id=sample_id, index=index, uri=f"memory:{sample_id}",
                                               num_tokens=int(tensors["input_ids"].shape[0]), features=specs))
            self._held[sample_id] = _Held(ref, tensors, 1)
            self.held_bytes += ref.num_bytes
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
            return ref

    def put_when_room(self, sample_id: str, index: int, tensors: Mapping[str, torch.Tensor],
                      until=lambda: False) -> SampleRef | None:
        """`put` once there is room: it blocks while the new sample would take the held
        bytes past the bound and something is held, unless the sample is held already (a
        second put of it takes no bytes), `until()` turns true (checked every few
        milliseconds) or the store closes. The check and the put are one step under the
        store's lock, so a copy released meanwhile cannot let a new one in past the bound.
        None, with nothing stored, once the store is closed."""
        num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._cond:  # re-entrant: `put` takes it again
            while (sample_id not in self._held and self.held_bytes and self.held_bytes + num_bytes > self.max_bytes
                   and not self._closed and not until()):
                self._cond.wait(0.02)
            return None if self._closed else self.put(sample_id, index, tensors)

    def lookup(self, sample_id: str, index: int) -> SampleRef | None:
        with self._cond:
            held = self._held.get(sample_id)
        return held.ref if held is not None and held.ref.index == index else None

    def get(self, ref: SampleRef) -> Lease:
        check_signed(self.keys, ref, "memory store")
        with self._cond:
            held = self._held.get(ref.sample_id)
        if held is None or held.ref != ref:
            raise StoreError(f"sample {ref.sample_id!r}: not in the memory store (released already, or never put)")
        return Lease(ref, held.tensors)

    def release(self, lease: Lease) -> None:
        """The loader has copied the sample: free it (once every put of it is released)."""
        with self._cond:
            held = self._held.get(lease.ref.sample_id)
            if held is None:
                return
            held.count -= 1
            if held.count == 0:
                del self._held[lease.ref.sample_id]
                self.held_bytes -= held.ref.num_bytes
                self._cond.notify_all()

    def delete(self, ref: SampleRef) -> None:
        with self._cond:
            held = self._held.pop(ref.sample_id, None)
            if held is not None:
                self.held_bytes -= held.ref.num_bytes
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._held.clear()
            self.held_bytes = 0
            self._cond.notify_all()
