"""Feature stores: one contract (`base.FeatureStore`), backends side by side."""

from __future__ import annotations

from draftflow.stores.base import FeatureStore, Lease, StoreError, ChecksumError
from draftflow.stores.local import LocalStore
from draftflow.stores.memory import MemoryStore
from draftflow.stores.shared_dir import SharedDirStore


def _mooncake(features_cfg, keys):
    from draftflow.stores.mooncake import open_mooncake_store  # optional dependency

    return open_mooncake_store(features_cfg, keys)


# Backends side by side, keyed by `features.backend`; each takes the features config
# and the store's keys (`control.binding.RunKeys`: refs are signed and checked with them).
BACKENDS = {
    "local": lambda c, keys: LocalStore(c.root, keys),
    "memory": lambda c, keys: MemoryStore(keys, c.max_inflight_bytes),  # online runs (capture/online.py)
    "shared_dir": SharedDirStore,
    "mooncake": _mooncake,
}


def build_store(features_cfg, keys) -> FeatureStore:
    """Open the store named by `features.backend` at `features.root`, with its keys
    (from `control.binding.open_store_record`)."""
    try:
        make = BACKENDS[features_cfg.backend]
    except KeyError:
        raise ValueError(f"features.backend: unknown backend {features_cfg.backend!r}, "
                         f"expected one of {sorted(BACKENDS)}") from None
    return make(features_cfg, keys)


__all__ = ["FeatureStore", "Lease", "StoreError", "ChecksumError", "LocalStore", "MemoryStore", "SharedDirStore",
           "build_store"]
