"""Run a Mooncake Store service: a master (with its HTTP metadata server) and a segment holder.

Mooncake keeps an object in the memory segment of the client that mounted that
segment; when that client exits, its objects vanish. So features must not live in
the producer's own segment: a separate, long-lived holder (the `mooncake_client`
program the wheel ships) mounts the segment and outlives producers and consumers.
`MooncakeService` starts both children on loopback (or a given host), waits until the
master sees the holder's segment, and stops them in order. `serve` runs one in the
foreground for `draftflow store serve --backend mooncake`.

The MC_* environment variables of the Mooncake transfer engine are set here and
nowhere else (`apply_mooncake_env`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from draftflow.fsutil import write_atomic
from draftflow.stores.base import StoreError

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_MIN_SEGMENT_BYTES = 16 << 20


def mooncake_env(host: str) -> dict[str, str]:
    """MC_* variables for a Mooncake process bound to `host`.

    Without MC_TCP_BIND_ADDRESS the TCP transport advertises the host's LAN address,
    so loopback runs would send data through the NIC. MC_LOG_LEVEL defaults to ERROR
    (glog INFO lines flood otherwise); an exported value is kept for debugging.
    """
    return {"MC_TCP_BIND_ADDRESS": host, "MC_LOG_LEVEL": os.environ.get("MC_LOG_LEVEL", "ERROR")}


def apply_mooncake_env(host: str) -> None:
    """Set the MC_* variables in this process, before a Mooncake client is set up."""
    os.environ.update(mooncake_env(host))


def find_binary(name: str) -> str:
    """Path of a program shipped in the mooncake wheel (`mooncake_master`, `mooncake_client`)."""
    spec = importlib.util.find_spec("mooncake")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise StoreError(f"{name} not found: install Mooncake with "
                         "`pip install mooncake-transfer-engine-non-cuda` (CPU) or `mooncake-transfer-engine`")
    return found


def free_port(host: str) -> int:
    """A port free on `host` right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page: {"master_key_count": 3.0, ...}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


def _die_with_parent() -> None:
    # A child outliving a crashed parent would keep ports and memory: ask the kernel
    # to SIGTERM it when the parent dies (Linux prctl PR_SET_PDEATHSIG = 1).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class MooncakeService:
    """A master and one segment holder on `host`; ports 0 mean "pick a free one". Their
    logs go to a temporary folder; the holder's segment is touched once after start."""

    def __init__(self, *, segment_bytes: int, host: str = "127.0.0.1", master_port: int = 0,
                 metadata_port: int = 0, metrics_port: int = 0, holder_port: int = 0):
        if segment_bytes < _MIN_SEGMENT_BYTES:  # the holder aborts (INVALID_PARAMS) below this
            raise ValueError(f"features.mooncake.segment_bytes: expected at least 16 MiB, got {segment_bytes}")
        self.host = host
        self.segment_bytes = segment_bytes
        self.master_port = master_port or free_port(host)
        self.metadata_port = metadata_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.holder_port = holder_port or free_port(host)
        self._tmp: tempfile.TemporaryDirectory | None = None  # the logs' folder, made on first use
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def master(self) -> str:
        return f"{self.host}:{self.master_port}"

    @property
    def metadata_server(self) -> str:
        return f"http://{self.host}:{self.metadata_port}/metadata"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def log_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="draftflow-mooncake-")
        return Path(self._tmp.name)

    def start(self) -> "MooncakeService":
        """Start the master, then the holder; return when the holder's segment is mounted."""
        try:
            self._spawn("master", [
                find_binary("mooncake_master"), f"--rpc_port={self.master_port}", f"--rpc_address={self.host}",
                "--enable_http_metadata_server=true", f"--http_metadata_server_host={self.host}",
                f"--http_metadata_server_port={self.metadata_port}", "--enable_metric_reporting=false",
                f"--metrics_host={self.host}", f"--metrics_port={self.metrics_port}"])
            self._wait("master", lambda: http_get(self.metrics_url + "/health")[0] == 200
                       and port_open(self.host, self.master_port))
            self._spawn("holder", [
                find_binary("mooncake_client"), f"--host={self.host}", f"--port={self.holder_port}",
                f"--global_segment_size={self.segment_bytes}", f"--master_server_address={self.master}",
                f"--metadata_server={self.metadata_server}", "--protocol=tcp"])
            self._wait("holder", lambda: self.stats().get("master_total_capacity_bytes", 0) >= self.segment_bytes)
            warm_segment(self)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")
        env = {**os.environ, **mooncake_env(self.host)}
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent)
        log.close()  # the child holds its own descriptor

    def _wait(self, name: str, ready) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not ready():
            proc = self._procs[name]
            if proc.poll() is not None:
                raise StoreError(f"mooncake {name} exited with code {proc.returncode} during start-up:\n"
                                 + self.log_tail(name))
            if time.monotonic() > deadline:
                raise StoreError(f"mooncake {name} not ready after {_START_TIMEOUT_S:.0f} s:\n" + self.log_tail(name))
            time.sleep(0.05)

    def log_tail(self, name: str, num_lines: int = 20) -> str:
        try:
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-num_lines:])

    def stats(self) -> dict[str, float]:
        """The master's gauges: master_allocated_bytes, master_total_capacity_bytes, master_key_count..."""
        status, body = http_get(self.metrics_url + "/metrics")
        return parse_metrics(body) if status == 200 else {}

    def check_alive(self) -> None:
        """Raise StoreError if the master or the holder has exited."""
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise StoreError(f"mooncake {name} exited with code {proc.returncode}:\n" + self.log_tail(name))

    def stop(self) -> None:
        """Stop the holder (its objects vanish with it), then the master. Idempotent."""
        for name in ("holder", "master"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "MooncakeService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def warm_segment(service: MooncakeService, chunk_bytes: int = 64 << 20) -> None:
    """Write the holder's whole segment once, then free it.

    The first write into fresh segment pages is several times slower than later ones
    (the kernel faults each page in); paying that at start-up keeps it out of the run.
    Fill objects are hard-pinned so the master cannot evict them instead of failing.
    """
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    import torch

    apply_mooncake_env(service.host)
    client = MooncakeDistributedStore()
    if client.setup(service.host, service.metadata_server, 0, 0, "tcp", "", service.master) != 0:
        raise StoreError(f"mooncake: cannot connect a warm-up client to {service.master}")
    chunk = min(chunk_bytes, service.segment_bytes)
    buf = torch.zeros(chunk, dtype=torch.uint8)
    client.register_buffer(buf.data_ptr(), chunk)
    pin = ReplicateConfig()
    pin.with_hard_pin = True
    prefix = f"__draftflow_warm_{os.getpid()}"
    i = 0
    while chunk >= (1 << 20):
        if client.put_from(f"{prefix}/{i}", buf.data_ptr(), chunk, pin) == 0:
            i += 1
        else:
            chunk //= 2  # the tail of the segment is smaller than a chunk
    client.remove_by_regex(f"^{prefix}/", True)
    client.unregister_buffer(buf.data_ptr())
    client.close()


def client_settings(service: MooncakeService) -> dict:
    """The `features` keys a client needs to reach `service`."""
    mooncake = {"master": service.master, "metadata_server": service.metadata_server, "protocol": "tcp"}
    if service.host == "localhost" or service.host.startswith("127."):
        # On loopback every client is on this host; elsewhere each client sets its own address.
        mooncake["local_hostname"] = service.host
    return {"features": {"backend": "mooncake", "mooncake": mooncake}}


def write_client_config(path: str | Path, service: MooncakeService) -> Path:
    """Write `client_settings` as YAML to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, ("# Written by `draftflow store serve --backend mooncake`; pass it with --config.\n"
                        + yaml.safe_dump(client_settings(service), sort_keys=False)).encode())
    return path


def serve(features_cfg, config_out: str | Path, host: str = "127.0.0.1", *, master_port: int = 0,
          metadata_port: int = 0, metrics_port: int = 0, holder_port: int = 0,
          ready: threading.Event | None = None, stop: threading.Event | None = None) -> int:
    """Run a service in the foreground until SIGINT/SIGTERM (or `stop`); return an exit code.

    The holder's segment is `features.mooncake.segment_bytes`. The client settings are
    written to `config_out` once the service is ready (then `ready` is set). A child
    that dies ends the service with code 1, so a stale config is never served.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    with MooncakeService(segment_bytes=features_cfg.mooncake.segment_bytes, host=host,
                         master_port=master_port, metadata_port=metadata_port,
                         metrics_port=metrics_port, holder_port=holder_port) as service:
        write_client_config(config_out, service)
        print(f"mooncake master {service.master}, metadata {service.metadata_server}, "
              f"segment {features_cfg.mooncake.segment_bytes} bytes; client config in {config_out}", flush=True)
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            try:
                service.check_alive()
            except StoreError as e:
                print(f"error: {e}", flush=True)
                return 1
    return 0
