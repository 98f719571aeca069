"""Discovery stores: where leases and assignments live (memory, Redis, etcd)."""

from distill_reader.discovery.stores.base import (
    AlreadyRegistered,
    ServiceState,
    Store,
    StoreSecurity,
    StoreUnavailable,
    StoreURL,
    open_store,
    parse_store_url,
    store_security,
)

__all__ = [
    "AlreadyRegistered",
    "ServiceState",
    "Store",
    "StoreSecurity",
    "StoreURL",
    "StoreUnavailable",
    "open_store",
    "parse_store_url",
    "store_security",
]
