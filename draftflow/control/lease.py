"""One producer per run: a lease in `control/lease/`, held with a heartbeat.

Two producers of one run would append to the same journal, each chaining its lines
to what it last wrote, and both seal: every reader then refuses the manifest. So a
producer (or ingest) takes the lease before it opens the manifest, and a second one
is refused at start, naming the holder. The lease is a consume-once claim on the name
`producer` (`ClaimBook`: created with `os.link`, taken over by creating the next
generation), renewed by a heartbeat thread every `claim_timeout_s / 4`. It is taken
over when its heartbeat is older than `features.claim_timeout_s`, or at once when its
owner is a process of this host that no longer runs (a killed producer's rerun).
"This host" is the hostname plus, where Linux offers them, the boot id and the pid
namespace (`host_identity`): containers can share a hostname, and a pid means
something only in its own namespace, so a live producer in another container is never
taken for a dead one of ours. A producer whose lease was taken over stops before its
next journal line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import threading
from pathlib import Path

from draftflow.control.claims import ClaimBook, default_owner
from draftflow.control.manifest import ManifestError

LEASE_DIR = "lease"
_NAME = "producer"


class LeaseError(ManifestError):
    """Another producer holds the run, or took it over from this one."""


class _LeaseBook(ClaimBook):
    def _stale(self, path: Path) -> bool:
        if super()._stale(path):
            return True
        try:
            owner = str(json.loads(path.read_text()).get("owner", ""))
        except json.JSONDecodeError:
            return False
        host, _, rest = owner.partition(":")  # default_owner(host_identity()): host:pid:random
        pid = rest.partition(":")[0]
        return host == host_identity() and pid.isdigit() and not _alive(int(pid))


@functools.cache  # fixed for the process: read once, not at every staleness check
def host_identity() -> str:
    """The hostname, with a digest of the boot id and the pid namespace where they can be
    read (the pids of two holders compare only when both match)."""
    parts = []
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            pass
    host = socket.gethostname().replace(":", "_")
    return f"{host}@{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:12]}" if parts else host


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class ProducerLease:
    """Held from `acquire()` until `release()`; `check()` raises once it was lost."""

    def __init__(self, control_dir: str | Path, keys, timeout_s: float):
        self._book = _LeaseBook(Path(control_dir) / LEASE_DIR, default_owner(host_identity()), timeout_s, keys)
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    def acquire(self) -> "ProducerLease":
        if not self._book.try_claim(_NAME):
            owner, age = self._book.holder(_NAME) or ("?", 0.0)
            raise LeaseError(f"{self._book.claims_dir}: another producer holds this run ({owner}, heartbeat "
                             f"{age:.0f} s ago); it is taken over once its heartbeat is "
                             f"{self._book.claim_timeout_s:g} s old (features.claim_timeout_s) or its process "
                             "on this host has ended")
        self._thread = threading.Thread(target=self._heartbeat, name="producer-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._book.claim_timeout_s / 4):
            if self._book.renew_all():
                self._lost = True
                return

    @property
    def lost(self) -> bool:
        return self._lost

    def check(self) -> None:
        if self._lost:
            raise LeaseError(f"{self._book.claims_dir}: another producer took this run over (this one's heartbeat "
                             f"was older than {self._book.claim_timeout_s:g} s); stopping")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._lost:
            self._book.release(_NAME)
