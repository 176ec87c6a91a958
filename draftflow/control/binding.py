"""What binds a store's contents to the run secret: the store record, sample MACs, done markers.

A signed manifest alone is not enough: a producer skips samples it finds already
stored, and a colocated run trains on whatever `lookup` returns, so a sample file or
Mooncake object planted in the store (its embedded ref and checksums recomputed by
whoever planted it) would be journaled and trained on. So:

- `control/store.json` (the store record, signed) says what filled the store: the
  provenance (target, tokenizer, data hash, aux layers, feature dtype), the capture
  settings and a random `store_id`. A run with another provenance or capture config
  refuses the folder instead of reusing its features.
- Every `SampleRef` carries a MAC under the run secret over its spec (id, index, uri,
  token count, each feature's dtype, shape and checksum) and the `store_id`. Stores
  sign at `put` and check at `lookup` and `get` (one HMAC over ~1 KiB of JSON: no RPC,
  no second pass over tensor bytes; the checksums already tie the bytes to the spec).
- Consume-once `done/<id>` markers are signed too (sample id, claim generation,
  owner, store id), so a forged marker cannot make a sample skipped or collected.
- Mooncake keys live under `RunKeys.namespace`, an HMAC of the run id: without the
  secret nobody can name them.

Each use draws its own key from the secret (`subkey`), so no signature of one kind
can pass for another. A colocated run without a configured secret uses a per-root
key, `control/store.key`, generated once with mode 0600 (`root_secret`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from draftflow.control.manifest import ManifestError, TamperedManifestError, WrongSecretError
from draftflow.control.signing import SECRET_ENV, canonical_json, key_id, load_secret, sign, verify
from draftflow.fsutil import fsync_dir, write_atomic
from draftflow.records import Provenance, SampleRef, assert_no_tensors

STORE_FILE = "store.json"
ROOT_KEY_FILE = "store.key"
STORE_RECORD_VERSION = 1
DONE_MARKER_VERSION = 1
RECAPTURE = "use a new features.root, or remove this one's features with `draftflow store gc --what all`"


def subkey(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose only, derived from the run secret."""
    return hmac.new(secret, b"draftflow-subkey:" + purpose.encode(), hashlib.sha256).digest()


class RunKeys:
    """The keys of one filled store (its `store_id`) under one run secret."""

    def __init__(self, secret: bytes, store_id: str):
        self.store_id = store_id
        self._sample, self._done = subkey(secret, "sample"), subkey(secret, "done")
        self._namespace = subkey(secret, "mooncake-namespace")

    def _ref_mac(self, ref: SampleRef) -> str:
        spec = {k: v for k, v in ref.to_dict().items() if k != "mac"}
        return sign({"store": self.store_id, "ref": spec}, self._sample)

    def sign_ref(self, ref: SampleRef) -> SampleRef:
        return dataclasses.replace(ref, mac=self._ref_mac(ref))

    def ref_ok(self, ref: SampleRef) -> bool:
        """True if this run signed `ref` for this store (constant-time compare)."""
        return bool(ref.mac) and hmac.compare_digest(self._ref_mac(ref), ref.mac)

    def done_marker(self, sample_id: str, gen: int, owner: str) -> bytes:
        payload = {"format_version": DONE_MARKER_VERSION, "sample_id": sample_id, "gen": gen, "owner": owner,
                   "store": self.store_id}
        return canonical_json({"done": payload, "mac": sign(payload, self._done)})

    def done_marker_ok(self, sample_id: str, raw: bytes) -> bool:
        """True for a marker this run wrote for `sample_id` in this store (in this format)."""
        try:
            doc = json.loads(raw)
            payload = doc["done"]
            return (payload["format_version"] == DONE_MARKER_VERSION and payload["sample_id"] == sample_id
                    and payload["store"] == self.store_id and verify(payload, doc["mac"], self._done))
        except (ValueError, KeyError, TypeError):
            return False

    def namespace(self, run_id: str) -> str:
        """Mooncake key prefix of `run_id`: unguessable without the secret."""
        return "ns-" + hmac.new(self._namespace, run_id.encode(), hashlib.sha256).hexdigest()[:32]


# ------------------------------------------------------------------ secrets

def root_secret(root: str | Path, create: bool) -> bytes:
    """The per-root key of a colocated run that has no run secret: `control/store.key`,
    created once (0600, atomically) and refused unless it is yours and private."""
    path = Path(root) / "control" / ROOT_KEY_FILE
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
            os.fsync(fd)
            os.close(fd)
            os.link(tmp, path)  # create-if-absent: concurrent ranks agree on one key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"no run secret and no {path}: set features.secret_file or {SECRET_ENV}") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{path}: the store's key must be yours with mode 0600 (it is uid {st.st_uid}, mode "
                         f"{st.st_mode & 0o777:o}); someone else may know it. {RECAPTURE}")
    return path.read_bytes().strip()


def colocated_secret(features_cfg, environ: Mapping[str, str], create: bool = True) -> bytes:
    """The run secret if one is configured, else the root's own key (`root_secret`)."""
    if features_cfg.secret_file or environ.get(SECRET_ENV, "").strip():
        return load_secret(features_cfg, environ)
    return root_secret(features_cfg.root, create)


# ------------------------------------------------------------------ the store record

@dataclass(frozen=True, slots=True, kw_only=True)
class StoreFill:
    """What fills a store: the features' provenance and how they were made."""

    provenance: Provenance
    # (name, value) pairs, e.g. (("batch_tokens", 8192), ("dtype", "float32")), or (("source", "ingest"),)
    capture: tuple[tuple[str, Any], ...]

    def differences(self, other: "StoreFill") -> list[str]:
        # every field but producer_version
        out = self.provenance.mismatches(other.provenance, ("store has", "this run has"))
        if self.capture != other.capture:
            out.append(f"capture: store has {dict(self.capture)}, this run has {dict(other.capture)}")
        return out


def _store_key(secret: bytes) -> bytes:
    return subkey(secret, "store-record")


def _create_record(path: Path, secret: bytes, fill: StoreFill) -> None:
    payload = {"format_version": STORE_RECORD_VERSION, "store_id": secrets.token_hex(16),
               "provenance": fill.provenance.to_dict(), "capture": [list(kv) for kv in fill.capture],
               "key_id": key_id(secret), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    assert_no_tensors(payload, "store record")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, canonical_json({"store": payload, "sig": sign(payload, _store_key(secret))}),
                     exclusive=True)
    except FileExistsError:
        pass  # another rank or role created it first: read and compare it


def _read_record(path: Path, secret: bytes) -> dict:
    try:
        doc = json.loads(path.read_bytes())
        payload, sig = doc["store"], doc["sig"]
        version = payload["format_version"]
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing: this store was not filled by this DraftFlow version (older "
                            f"stores hold unsigned samples, which are not trusted); recapture: {RECAPTURE}") from None
    except (ValueError, KeyError, TypeError):
        raise TamperedManifestError(f"{path}: not a signed store record (corrupt or tampered); {RECAPTURE}") from None
    if version != STORE_RECORD_VERSION:
        raise ManifestError(f"{path}: store record version {version!r}; this DraftFlow reads "
                            f"{STORE_RECORD_VERSION}; {RECAPTURE}")
    if not verify(payload, sig, _store_key(secret)):
        theirs, ours = payload.get("key_id"), key_id(secret)
        if theirs != ours:
            raise WrongSecretError(f"{path}: store filled under a different secret (key id {theirs}, yours is "
                                   f"{ours}); use that run's secret, or {RECAPTURE}")
        raise TamperedManifestError(f"{path}: store record signature does not match its content (tampered); "
                                    f"{RECAPTURE}")
    return payload


def open_store_record(root: str | Path, secret: bytes, fill: StoreFill | None) -> tuple[RunKeys, StoreFill]:
    """The keys of the store at `root`, and what filled it.

    With `fill` (a producer, colocated run, capture or ingest): create the record if the
    store has none, else refuse a store filled with anything else. Without (a consumer,
    `store verify`): the record must exist; the caller compares its provenance."""
    path = Path(root) / "control" / STORE_FILE
    if fill is not None and not path.exists():
        _create_record(path, secret, fill)
    payload = _read_record(path, secret)
    try:
        recorded = StoreFill(provenance=Provenance.from_dict(payload["provenance"]),
                             capture=tuple((str(k), v) for k, v in payload["capture"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path}: malformed store record ({e})") from None
    if fill is not None:
        diffs = recorded.differences(fill)
        if diffs:
            raise ManifestError(f"features.root {Path(root)} holds features of another run ({path}):\n  "
                                + "\n  ".join(diffs) + f"\n{RECAPTURE}")
    return RunKeys(secret, str(payload["store_id"])), recorded


def check_filled_with(root: str | Path, filled: StoreFill, provenance: Provenance) -> None:
    """Refuse a store whose record describes other features than the manifest does."""
    diffs = provenance.mismatches(filled.provenance, ("manifest has", "store has"))
    if diffs:
        raise ManifestError(f"{Path(root) / 'control' / STORE_FILE}: the store was filled with other features than "
                            "the manifest describes:\n  " + "\n  ".join(diffs))
