"""Feature stores: one contract (`base.FeatureStore`), backends side by side."""

from __future__ import annotations

from draftflow.stores.base import FeatureStore, Lease, StoreError, ChecksumError
from draftflow.stores.local import LocalStore

BACKENDS = {"local": LocalStore}


def build_store(features_cfg) -> FeatureStore:
    """Open the store named by `features.backend` at `features.root`."""
    try:
        cls = BACKENDS[features_cfg.backend]
    except KeyError:
        raise ValueError(f"features.backend: unknown backend {features_cfg.backend!r}, "
                         f"expected one of {sorted(BACKENDS)}") from None
    return cls(features_cfg.root)


__all__ = ["FeatureStore", "Lease", "StoreError", "ChecksumError", "LocalStore", "build_store"]
