"""Read and write one sample as a safetensors file, atomically, with no extra copies.

The files are standard safetensors (readable by `safetensors.safe_open`), written
here directly so that a put is one sequential write from the tensors' own memory
and a get is one `readinto` into a buffer the returned tensors view. The sample's
`SampleRef` (with per-feature checksums) is kept in the header's `__metadata__`, so
a store can rebuild refs from its files alone.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Mapping

import torch

from draftflow.fsutil import fsync_dir, naming
from draftflow.stores.base import StoreError, tensor_bytes

_DTYPE_TO_ST = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                torch.int32: "I32", torch.int64: "I64", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
if hasattr(torch, "float8_e4m3fn"):  # FP8 features (features.dtype); torch >= 2.1
    _DTYPE_TO_ST[torch.float8_e4m3fn] = "F8_E4M3"
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}


def encode_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def aligned_order(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors by element size, largest first: with no gaps allowed between tensors
    (safetensors forbids holes), this keeps every tensor aligned to its element size
    so it can be viewed in place, without a copy."""
    return dict(sorted(tensors.items(), key=lambda kv: -kv[1].element_size()))


def write_sample_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write `tensors` to `path` atomically: temp file, fsync, rename, fsync the folder.

    A reader (or a crash) can observe either no file or the complete one, never a
    prefix: the rename is the single moment of publication.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = aligned_order(tensors)
    try:
        with naming(path), open(tmp, "wb") as f:
            f.write(encode_header(tensors, metadata))
            for t in tensors.values():
                f.write(tensor_bytes(t))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_header(f, path: Path) -> tuple[dict, int]:
    """Parse the safetensors header of an open file; return (header, data_start)."""
    head = f.read(8)
    if len(head) != 8:
        raise StoreError(f"{path}: truncated safetensors file (no header length)")
    (n,) = struct.unpack("<Q", head)
    if n > 100_000_000:
        raise StoreError(f"{path}: implausible safetensors header length {n}")
    raw = f.read(n)
    if len(raw) != n:
        raise StoreError(f"{path}: truncated safetensors header")
    try:
        return json.loads(raw), 8 + n
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: safetensors header is not JSON ({e})") from None


def read_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        header, _ = read_header(f, path)
    return header.get("__metadata__", {})


def read_sample_file(path: Path, buffer: torch.Tensor | None = None, on_tensor=None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a whole sample file into one buffer; tensors are views of it.

    Pass a reusable uint8 `buffer` (grown if too small) to avoid mapping fresh pages
    on every read: a new 64 MiB buffer costs more page faults than the read itself.
    With `on_tensor(name, tensor)`, a second thread reads the tensors one after the
    other while this thread calls `on_tensor` on each one already read, so checksum
    verification (which holds the GIL) overlaps the reads (which release it).
    """
    with open(path, "rb", buffering=0) as f:
        header, start = read_header(f, path)
        size = os.fstat(f.fileno()).st_size - start
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.uint8)
        data = buffer[:size]
        metadata = header.pop("__metadata__", {})
        tensors = _views(path, header, data, size)
        if on_tensor is None:
            got = f.readinto(memoryview(data.numpy())) if size else 0
            if got != size:
                raise StoreError(f"{path}: short read ({got} of {size} bytes)")
        else:
            _read_overlapped(f, path, header, data, tensors, on_tensor)
    return tensors, metadata


def _views(path: Path, header: dict, data: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= size:
            raise StoreError(f"{path}: tensor {name!r} lies outside the file")
        dtype = _ST_TO_DTYPE.get(info["dtype"])
        if dtype is None:
            raise StoreError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        tensors[name] = data[begin:end].view(dtype).reshape(info["shape"])
    return tensors


def _read_overlapped(f, path: Path, header: dict, data: torch.Tensor, tensors: dict, on_tensor) -> None:
    ranges = sorted((info["data_offsets"], name) for name, info in header.items())
    done: queue.Queue = queue.Queue()

    def read_all() -> None:
        try:
            raw = memoryview(data.numpy())
            for (begin, end), name in ranges:
                got = f.readinto(raw[begin:end]) if end > begin else 0
                if got != end - begin:
                    raise StoreError(f"{path}: short read of {name!r} ({got} of {end - begin} bytes)")
                done.put((name, None))
        except BaseException as e:  # hand the error to the calling thread
            done.put((None, e))

    # Reads are sequential at increasing offsets, so the file position needs no seeks.
    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    try:
        for _ in ranges:
            name, error = done.get()
            if error is not None:
                raise error
            on_tensor(name, tensors[name])
    finally:
        reader.join()
