"""Control-plane records: the only things that cross from producer to consumer.

Every record here is frozen, tensor-free and JSON-serialisable. `assert_no_tensors`
guards each one before it is written or sent, so a tensor can never leak into a
manifest or a ref by accident (the data plane is the FeatureStore alone).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

# 2: sample refs carry a MAC under the run secret (`mac`), and the store has a signed
# record of what filled it (control/binding.py). Version 1 refs are unsigned.
FORMAT_VERSION = 2

# Sample ids become file names and store keys: keep them to a safe alphabet so an
# id like "../x" or "/etc/passwd" can never escape a store root.
_SAMPLE_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")

# The four features of one sample (DESIGN.md section 3).
FEATURE_NAMES = ("input_ids", "loss_mask", "aux_hidden", "last_hidden")


def validate_sample_id(sample_id: str) -> str:
    """Return `sample_id` unchanged, or raise ValueError naming what is wrong with it."""
    if not isinstance(sample_id, str) or not _SAMPLE_ID_RE.match(sample_id) or ".." in sample_id:
        raise ValueError(
            f"invalid sample id {sample_id!r}: expected 1-200 characters of [A-Za-z0-9_.-], "
            "not starting with '.' or '-' and without '..'"
        )
    return sample_id


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureSpec:
    """One stored tensor of a sample: what it is and how to check it."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]
    num_bytes: int
    checksum: str  # "<algorithm>:<hex>" of the raw little-endian bytes (stores/base.py: checksum)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "num_bytes": self.num_bytes, "checksum": self.checksum}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(int(x) for x in d["shape"]),
                   num_bytes=int(d["num_bytes"]), checksum=str(d["checksum"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleRef:
    """Where one sample's features live and what they must look like. No tensors."""

    sample_id: str
    index: int  # position of the sample in the prepared dataset; fixes the training order
    uri: str  # backend-specific location, e.g. "file:///feat/samples/s000001.safetensors"
    num_tokens: int
    features: tuple[FeatureSpec, ...]
    # HMAC of everything above under the run secret, bound to the store it was put in
    # (`control.binding.RunKeys`): a store refuses a ref without a valid one.
    mac: str = ""

    def __post_init__(self) -> None:
        validate_sample_id(self.sample_id)

    def spec(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"sample {self.sample_id!r} has no feature {name!r}")

    @property
    def num_bytes(self) -> int:
        return sum(f.num_bytes for f in self.features)

    def to_dict(self) -> dict[str, Any]:
        return {"sample_id": self.sample_id, "index": self.index, "uri": self.uri,
                "num_tokens": self.num_tokens, "features": [f.to_dict() for f in self.features], "mac": self.mac}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SampleRef":
        return cls(sample_id=str(d["sample_id"]), index=int(d["index"]), uri=str(d["uri"]),
                   num_tokens=int(d["num_tokens"]),
                   features=tuple(FeatureSpec.from_dict(f) for f in d["features"]), mac=str(d.get("mac", "")))


# Provenance fields set by config keys: a refusal names the keys to change (the tokenizer
# hash covers the chat template too).
_CONFIG_KEYS = {"feature_dtype": "features.dtype", "tokenizer_hash": "target.tokenizer, target.chat_template"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """What produced a set of features; a consumer checks it against its own config."""

    target: str  # human-readable identity of the target (path or "random:<hash>")
    target_config_hash: str
    tokenizer_hash: str
    hidden_size: int
    vocab_size: int
    aux_layer_ids: tuple[int, ...]
    feature_dtype: str
    data_hash: str  # hash of the prepared token ids and loss masks
    producer_version: str

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Provenance":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"provenance: unknown field(s) {sorted(unknown)}")
        missing = fields - set(d)
        if missing:
            raise ValueError(f"provenance: missing field(s) {sorted(missing)}")
        return cls(**{**d, "aux_layer_ids": tuple(int(x) for x in d["aux_layer_ids"])})

    def mismatches(self, other: "Provenance", labels: tuple[str, str] = ("manifest has", "this config gives")
                   ) -> list[str]:
        """Names of fields that differ, with both values (`labels` say whose), for a
        clear refusal message."""
        out = []
        for f in dataclasses.fields(self):
            if f.name == "producer_version":
                continue  # a newer consumer may read an older producer's features
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                key = f"{f.name} ({_CONFIG_KEYS[f.name]})" if f.name in _CONFIG_KEYS else f.name
                out.append(f"{key}: {labels[0]} {a!r}, {labels[1]} {b!r}")
        return out


def assert_no_tensors(obj: Any, path: str = "record") -> None:
    """Raise TypeError if `obj` holds a tensor or array anywhere (control plane guard)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            assert_no_tensors(getattr(obj, f.name), f"{path}.{f.name}")
        return
    if isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            assert_no_tensors(k, f"{path}[key]")
            assert_no_tensors(v, f"{path}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_no_tensors(v, f"{path}[{i}]")
        return
    kind = type(obj)
    raise TypeError(f"{path}: control-plane records must be tensor-free plain data, "
                    f"found {kind.__module__}.{kind.__qualname__}")
