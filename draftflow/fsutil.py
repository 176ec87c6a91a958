"""File-system helpers shared by the data plane and the control plane."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def naming(path: Path):
    """Make an OSError that names no file name `path`: a write to a full disk says only
    `[Errno 28] No space left on device`, which leaves the operator guessing which
    file system filled."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # same errno, same subclass


def fsync_dir(path: Path) -> None:
    """Make a rename or link in `path` durable (POSIX needs the folder itself fsync'd)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Temp file + fsync + rename (or link, which fails if `path` exists) + fsync folder:
    readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with naming(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, path)  # atomic create-if-absent, also on NFS
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
