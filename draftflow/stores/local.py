"""Local directory store: one safetensors file per sample under `<root>/samples/`.

Used by colocated runs. Publication is atomic (see `write_sample_file`), reads are
verified against the ref's checksums, and `lookup` rebuilds a ref from a file's
header so that a rerun of capture skips what is already published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from draftflow.records import SampleRef, validate_sample_id
from draftflow.stores.base import Lease, StoreError, make_spec, verify_tensors
from draftflow.stores.sample_file import read_metadata, read_sample_file, write_sample_file

REF_KEY = "draftflow.ref"


class LocalStore:
    scheme = "file"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.samples_dir = self.root / "samples"
        self.samples_dir.mkdir(parents=True, exist_ok=True)

    def path_of(self, sample_id: str) -> Path:
        return self.samples_dir / f"{validate_sample_id(sample_id)}.safetensors"

    def put(self, sample_id: str, index: int, tensors: Mapping[str, torch.Tensor]) -> SampleRef:
        path = self.path_of(sample_id)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        ref = SampleRef(sample_id=sample_id, index=index, uri=path.resolve().as_uri(),
                        num_tokens=int(tensors["input_ids"].shape[0]),
                        features=tuple(make_spec(k, v) for k, v in tensors.items()))
        write_sample_file(path, tensors, {REF_KEY: json.dumps(ref.to_dict())})
        return ref

    def lookup(self, sample_id: str, index: int) -> SampleRef | None:
        path = self.path_of(sample_id)
        if not path.exists():
            return None
        meta = read_metadata(path)
        if REF_KEY not in meta:
            raise StoreError(f"{path}: not a DraftFlow sample file (no {REF_KEY!r} metadata)")
        ref = SampleRef.from_dict(json.loads(meta[REF_KEY]))
        if ref.index != index:
            raise StoreError(f"{path}: holds sample index {ref.index}, expected {index} "
                             "(the store was filled from different data)")
        return ref

    def get(self, ref: SampleRef) -> Lease:
        path = self.path_of(ref.sample_id)
        try:
            tensors, _ = read_sample_file(path)
        except FileNotFoundError:
            raise StoreError(f"sample {ref.sample_id!r}: {path} does not exist") from None
        verify_tensors(ref, tensors)
        return Lease(ref, tensors)

    def release(self, lease: Lease) -> None:
        pass  # a local store retains every sample

    def delete(self, ref: SampleRef) -> None:
        self.path_of(ref.sample_id).unlink(missing_ok=True)

    def close(self) -> None:
        pass
