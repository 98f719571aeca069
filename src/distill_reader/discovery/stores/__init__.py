"""Discovery stores: where leases and assignments live (memory, Redis, etcd)."""

from distill_reader.discovery.stores.base import (
    AlreadyRegistered,
    ServiceState,
    Store,
    StoreUnavailable,
    open_store,
    parse_store_url,
)

__all__ = ["AlreadyRegistered", "ServiceState", "Store", "StoreUnavailable", "open_store", "parse_store_url"]
