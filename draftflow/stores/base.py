"""The FeatureStore contract: how features of one sample are put, read and freed.

Backends (local directory, shared directory, Mooncake) live side by side in this
package and are chosen by `build_store` from `features.backend`. The trainer and
the capture loop see only this protocol and `SampleRef`s, never a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import torch
import xxhash

from draftflow.records import FeatureSpec, SampleRef


class StoreError(RuntimeError):
    """A store operation failed; the message names the sample and what went wrong."""


class ChecksumError(StoreError):
    """Bytes read back do not match the checksum recorded when they were put."""


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
        """The ref of an already published sample, or None (lets a rerun skip it)."""

    def get(self, ref: SampleRef) -> Lease:
        """Read a sample, verifying every feature against its spec and checksum."""

    def release(self, lease: Lease) -> None:
        """The consumer is done with this lease (frees it in consume-once stores)."""

    def delete(self, ref: SampleRef) -> None:
        """Remove a sample's features."""

    def close(self) -> None:
        """Release connections and buffers."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def checksum(data) -> str:
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_spec(name: str, t: torch.Tensor) -> FeatureSpec:
    return FeatureSpec(name=name, dtype=dtype_name(t.dtype), shape=tuple(t.shape),
                       num_bytes=t.numel() * t.element_size(), checksum=checksum(tensor_bytes(t)))


def verify_tensor(ref: SampleRef, name: str, t: torch.Tensor) -> None:
    """Raise ChecksumError/StoreError unless `t` matches the spec of feature `name`."""
    spec = next((f for f in ref.features if f.name == name), None)
    if spec is None:
        raise StoreError(f"sample {ref.sample_id!r}: {ref.uri} holds an unexpected feature {name!r}")
    if dtype_name(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
        raise StoreError(
            f"sample {ref.sample_id!r}: feature {spec.name!r} is {dtype_name(t.dtype)}{list(t.shape)}, "
            f"expected {spec.dtype}{list(spec.shape)} ({ref.uri})")
    got = checksum(tensor_bytes(t))
    if got != spec.checksum:
        raise ChecksumError(
            f"sample {ref.sample_id!r}: feature {spec.name!r} is corrupt in {ref.uri} "
            f"(checksum {got}, expected {spec.checksum})")


def verify_tensors_present(ref: SampleRef, tensors: Mapping[str, torch.Tensor]) -> None:
    for spec in ref.features:
        if spec.name not in tensors:
            raise StoreError(f"sample {ref.sample_id!r}: feature {spec.name!r} is missing from {ref.uri}")


def verify_tensors(ref: SampleRef, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise ChecksumError/StoreError if `tensors` do not match `ref`'s specs exactly."""
    verify_tensors_present(ref, tensors)
    for name, t in tensors.items():
        verify_tensor(ref, name, t)
