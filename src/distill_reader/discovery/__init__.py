"""Discovery: teacher leases, student registrations, a pure balancing function, pushed assignments.

Client side: :class:`StudentSession`, :func:`keep_registered` (:func:`keep_all_registered` for several). Server side:
``distill_reader.discovery.server``. Balancing: ``distill_reader.discovery.balance``.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
"""

from distill_reader.discovery.client import (
    StudentSession,
    TeacherEndpoint,
    TeacherRegistration,
    keep_all_registered,
    keep_registered,
    parse_endpoints,
)

__all__ = [
    "StudentSession",
    "TeacherEndpoint",
    "TeacherRegistration",
    "keep_all_registered",
    "keep_registered",
    "parse_endpoints",
]
