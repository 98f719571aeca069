"""Discovery stores: where leases and assignments live (memory, Redis, etcd), and
:func:`open_discovery_store`, the factory that picks one for a ``--store`` URL."""

from __future__ import annotations

from dataclasses import replace

from distill_reader.discovery.stores.base import (
    ServiceState,
    Store,
    StoreSecurity,
    StoreURL,
    parse_store_url,
    store_security,
)
from distill_reader.errors import AlreadyRegistered, StoreUnavailable


def open_discovery_store(url: str, security: StoreSecurity | None = None) -> Store:
    """A store for a ``--store`` URL (not started yet), with :func:`store_security`'s credentials."""
    parsed = parse_store_url(url)
    security = security or StoreSecurity()
    if parsed.username and not security.username:
        security = replace(security, username=parsed.username)
    if parsed.kind == "memory":
        from distill_reader.discovery.stores.memory import MemoryStore

        return MemoryStore()
    if parsed.kind == "redis":
        from distill_reader.discovery.stores.redis import RedisStore

        return RedisStore(parsed.host, parsed.port, parsed.db, tls=parsed.tls, security=security)
    from distill_reader.discovery.stores.etcd import EtcdStore

    return EtcdStore(parsed.host, parsed.port, tls=parsed.tls, security=security)


__all__ = [
    "AlreadyRegistered",
    "ServiceState",
    "Store",
    "StoreSecurity",
    "StoreURL",
    "StoreUnavailable",
    "open_discovery_store",
    "parse_store_url",
    "store_security",
]
