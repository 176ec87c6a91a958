"""HMAC-SHA256 signatures for control-plane records, under a run secret.

Only the producer and its consumers hold the secret. A signature is computed over
the record's canonical JSON (sorted keys, no spaces), so the same record always
signs the same way whatever process or host wrote it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
from pathlib import Path
from typing import Any, Mapping

SECRET_ENV = "DRAFTFLOW_SECRET"


def load_secret(features_cfg, environ: Mapping[str, str]) -> bytes:
    """The run secret: `features.secret_file` if set, else `$DRAFTFLOW_SECRET`.

    `environ` is passed in (not read here) so the environment is read once, by the CLI.
    Surrounding whitespace (a trailing newline in a file) is not part of the secret.
    """
    if features_cfg.secret_file:
        return _read_secret_file(Path(features_cfg.secret_file).expanduser())
    secret = environ.get(SECRET_ENV, "").strip().encode()
    if not secret:
        raise ValueError(f"no run secret: set features.secret_file or the {SECRET_ENV} environment "
                         "variable (the same value for producer and consumers)")
    return secret


def _read_secret_file(path: Path) -> bytes:
    """The secret in `path`, refusing a file other users could read or change.

    The configured text is named only once it is known to be an existing file: people
    paste the secret itself into `features.secret_file`, and messages end up in logs.
    Group members may read the file (a team sharing runs), but not change it: whoever
    can write it decides what the producer signs with and what the consumer trusts.
    """
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):  # ValueError: a NUL byte in the text
        raise ValueError("features.secret_file: no such file (its value is not shown, in case it is the secret "
                         "itself; the key takes the path of a file holding the secret, and "
                         f"{SECRET_ENV} takes the secret)") from None
    if stat.S_ISREG(mode) and mode & 0o022:
        raise ValueError(f"features.secret_file: {path} is writable by {'others' if mode & 0o002 else 'its group'}; "
                         f"refusing it, anyone who can change it controls what runs trust. Fix: chmod 600 {path}")
    if stat.S_ISREG(mode) and mode & 0o004:
        raise ValueError(f"features.secret_file: {path} is readable by every user of this host; refusing it, "
                         f"anyone who reads it can sign manifests. Fix: chmod 600 {path}")
    try:
        secret = path.read_bytes().strip()
    except OSError as e:
        raise ValueError(f"features.secret_file: cannot read {path} ({e.strerror})") from None
    if not secret:
        raise ValueError(f"features.secret_file: {path} is empty; expected the run secret")
    return secret


def canonical_json(payload: Any) -> bytes:
    """The one byte string a record signs as: sorted keys, no spaces, UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def sign(payload: Mapping[str, Any], secret: bytes) -> str:
    """Hex HMAC-SHA256 of `payload`'s canonical JSON."""
    return hmac.new(secret, canonical_json(payload), hashlib.sha256).hexdigest()


def verify(payload: Mapping[str, Any], signature: str, secret: bytes) -> bool:
    """True if `signature` is `payload`'s signature under `secret` (constant-time compare)."""
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(payload, secret), signature)


def key_id(secret: bytes) -> str:
    """A short public name of a secret. Stored beside signatures so a reader can tell
    "signed under another secret" from "tampered with" (HMAC alone cannot); 32 bits
    of a domain-separated hash say nothing useful about the secret itself."""
    return hashlib.sha256(b"draftflow-key-id" + secret).hexdigest()[:8]
