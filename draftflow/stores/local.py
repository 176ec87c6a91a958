"""Local directory store: one safetensors file per sample under `<root>/samples/`.

Used by colocated runs. Publication is atomic (see `write_sample_file`), reads are
verified against the ref's checksums, and `lookup` rebuilds a ref from a file's
header so that a rerun of capture skips what is already published. Refs are signed
with the run's keys (`control.binding.RunKeys`): `lookup` ignores a file this run did
not sign (it is captured again and replaced) and `get` refuses its ref.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Mapping

import torch

from draftflow.records import SampleRef, validate_sample_id
from draftflow.stores.base import (Lease, StoreError, check_signed, make_spec, signed_or_none, verify_tensor,
                                   verify_tensors_present)
from draftflow.stores.sample_file import read_metadata, read_sample_file, write_sample_file

REF_KEY = "draftflow.ref"


class LocalStore:
    # Read buffers kept for reuse: enough for the loader's prefetch depth.
    max_pooled_buffers = 4

    def __init__(self, root: str | Path, keys):
        self.root = Path(root)
        self.keys = keys  # control.binding.RunKeys of this store
        self._buffers: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.samples_dir = self.root / "samples"
        self.samples_dir.mkdir(parents=True, exist_ok=True)

    def path_of(self, sample_id: str) -> Path:
        return self.samples_dir / f"{validate_sample_id(sample_id)}.safetensors"

    def put(self, sample_id: str, index: int, tensors: Mapping[str, torch.Tensor]) -> SampleRef:
        path = self.path_of(sample_id)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        ref = self.keys.sign_ref(SampleRef(sample_id=sample_id, index=index, uri=path.resolve().as_uri(),
                                           num_tokens=int(tensors["input_ids"].shape[0]),
                                           features=tuple(make_spec(k, v) for k, v in tensors.items())))
        write_sample_file(path, tensors, {REF_KEY: json.dumps(ref.to_dict())})
        return ref

    def lookup(self, sample_id: str, index: int) -> SampleRef | None:
        path = self.path_of(sample_id)
        if not path.exists():
            return None
        try:
            ref = SampleRef.from_dict(json.loads(read_metadata(path)[REF_KEY]))
        except (StoreError, KeyError, TypeError, ValueError):
            ref = None  # not a DraftFlow sample file
        ref = signed_or_none(self.keys, ref, sample_id, path)  # not ours: captured again
        if ref is not None and ref.index != index:
            raise StoreError(f"{path}: holds sample index {ref.index}, expected {index} "
                             "(the store was filled from different data)")
        return ref

    def get(self, ref: SampleRef) -> Lease:
        path = self.path_of(ref.sample_id)
        check_signed(self.keys, ref, path)
        # The data section holds exactly the features (safetensors allows no gaps), so
        # ref.num_bytes is the buffer a read needs.
        buffer = self._take_buffer(ref.num_bytes)
        try:
            # each feature is verified while the next one is still being read
            tensors, _ = read_sample_file(path, buffer, on_tensor=lambda name, t: verify_tensor(ref, name, t, path))
            verify_tensors_present(ref, tensors, path)
        except FileNotFoundError:
            self._recycle_buffer(buffer)
            raise StoreError(f"sample {ref.sample_id!r}: {path} does not exist") from None
        except BaseException:
            self._recycle_buffer(buffer)
            raise
        return Lease(ref, tensors, buffer=buffer)

    def _take_buffer(self, num_bytes: int) -> torch.Tensor:
        with self._lock:
            for i, buf in enumerate(self._buffers):
                if buf.numel() >= num_bytes:
                    return self._buffers.pop(i)
        return torch.empty(num_bytes, dtype=torch.uint8)

    def _recycle_buffer(self, buffer: torch.Tensor) -> None:
        with self._lock:
            if len(self._buffers) < self.max_pooled_buffers:
                self._buffers.append(buffer)

    def release(self, lease: Lease) -> None:
        """Samples are retained; the lease's read buffer goes back to the pool, so the
        caller must not touch the lease's tensors afterwards."""
        self._recycle(lease)

    def _recycle(self, lease: Lease) -> None:
        if lease.buffer is not None:
            self._recycle_buffer(lease.buffer)

    def delete(self, ref: SampleRef) -> None:
        self.path_of(ref.sample_id).unlink(missing_ok=True)

    def close(self) -> None:
        pass
