from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Health(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_UNSPECIFIED: _ClassVar[Health]
    HEALTH_READY: _ClassVar[Health]
    HEALTH_NOT_READY: _ClassVar[Health]
HEALTH_UNSPECIFIED: Health
HEALTH_READY: Health
HEALTH_NOT_READY: Health

class RegisterTeacherRequest(_message.Message):
    __slots__ = ("service_name", "endpoint", "model_name", "weight", "instance_id", "health", "protocol")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    endpoint: str
    model_name: str
    weight: float
    instance_id: str
    health: Health
    protocol: str
    def __init__(self, service_name: _Optional[str] = ..., endpoint: _Optional[str] = ..., model_name: _Optional[str] = ..., weight: _Optional[float] = ..., instance_id: _Optional[str] = ..., health: _Optional[_Union[Health, str]] = ..., protocol: _Optional[str] = ...) -> None: ...

class RegisterTeacherResponse(_message.Message):
    __slots__ = ("lease_id", "ttl_seconds", "keepalive_seconds")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl_seconds: float
    keepalive_seconds: float
    def __init__(self, lease_id: _Optional[str] = ..., ttl_seconds: _Optional[float] = ..., keepalive_seconds: _Optional[float] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("service_name", "endpoint", "lease_id", "health")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    endpoint: str
    lease_id: str
    health: Health
    def __init__(self, service_name: _Optional[str] = ..., endpoint: _Optional[str] = ..., lease_id: _Optional[str] = ..., health: _Optional[_Union[Health, str]] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("ttl_seconds", "keepalive_seconds")
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: float
    keepalive_seconds: float
    def __init__(self, ttl_seconds: _Optional[float] = ..., keepalive_seconds: _Optional[float] = ...) -> None: ...

class KeepAliveBatch(_message.Message):
    __slots__ = ("keep_alives",)
    KEEP_ALIVES_FIELD_NUMBER: _ClassVar[int]
    keep_alives: _containers.RepeatedCompositeFieldContainer[KeepAliveRequest]
    def __init__(self, keep_alives: _Optional[_Iterable[_Union[KeepAliveRequest, _Mapping]]] = ...) -> None: ...

class KeepAliveResult(_message.Message):
    __slots__ = ("code", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class KeepAliveBatchResponse(_message.Message):
    __slots__ = ("ttl_seconds", "keepalive_seconds", "results")
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: float
    keepalive_seconds: float
    results: _containers.RepeatedCompositeFieldContainer[KeepAliveResult]
    def __init__(self, ttl_seconds: _Optional[float] = ..., keepalive_seconds: _Optional[float] = ..., results: _Optional[_Iterable[_Union[KeepAliveResult, _Mapping]]] = ...) -> None: ...

class DeregisterTeacherRequest(_message.Message):
    __slots__ = ("service_name", "endpoint", "lease_id")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    endpoint: str
    lease_id: str
    def __init__(self, service_name: _Optional[str] = ..., endpoint: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class DeregisterTeacherResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchAssignmentRequest(_message.Message):
    __slots__ = ("service_name", "require_num", "student_id", "instance_id")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_NUM_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    require_num: int
    student_id: str
    instance_id: str
    def __init__(self, service_name: _Optional[str] = ..., require_num: _Optional[int] = ..., student_id: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class TeacherEndpoint(_message.Message):
    __slots__ = ("endpoint", "model_name", "registration", "protocol")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    model_name: str
    registration: str
    protocol: str
    def __init__(self, endpoint: _Optional[str] = ..., model_name: _Optional[str] = ..., registration: _Optional[str] = ..., protocol: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("student_id", "teachers")
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    student_id: str
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherEndpoint]
    def __init__(self, student_id: _Optional[str] = ..., teachers: _Optional[_Iterable[_Union[TeacherEndpoint, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("service_name",)
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    def __init__(self, service_name: _Optional[str] = ...) -> None: ...

class TeacherStatus(_message.Message):
    __slots__ = ("endpoint", "model_name", "weight", "healthy", "students", "protocol")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STUDENTS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    model_name: str
    weight: float
    healthy: bool
    students: _containers.RepeatedScalarFieldContainer[str]
    protocol: str
    def __init__(self, endpoint: _Optional[str] = ..., model_name: _Optional[str] = ..., weight: _Optional[float] = ..., healthy: bool = ..., students: _Optional[_Iterable[str]] = ..., protocol: _Optional[str] = ...) -> None: ...

class StudentStatus(_message.Message):
    __slots__ = ("id", "require_num", "teachers")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_NUM_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    require_num: int
    teachers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., require_num: _Optional[int] = ..., teachers: _Optional[_Iterable[str]] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("name", "teachers", "students")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    STUDENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherStatus]
    students: _containers.RepeatedCompositeFieldContainer[StudentStatus]
    def __init__(self, name: _Optional[str] = ..., teachers: _Optional[_Iterable[_Union[TeacherStatus, _Mapping]]] = ..., students: _Optional[_Iterable[_Union[StudentStatus, _Mapping]]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("services", "server_id", "store")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    server_id: str
    store: str
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ..., server_id: _Optional[str] = ..., store: _Optional[str] = ...) -> None: ...

class TeacherFigures(_message.Message):
    __slots__ = ("endpoint", "rows_per_s", "rows", "has_latency", "latency_p50_ms", "latency_p99_ms", "in_flight", "quarantined", "healthy", "requests", "failures")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    HAS_LATENCY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    rows_per_s: float
    rows: int
    has_latency: bool
    latency_p50_ms: float
    latency_p99_ms: float
    in_flight: int
    quarantined: str
    healthy: bool
    requests: int
    failures: int
    def __init__(self, endpoint: _Optional[str] = ..., rows_per_s: _Optional[float] = ..., rows: _Optional[int] = ..., has_latency: bool = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., in_flight: _Optional[int] = ..., quarantined: _Optional[str] = ..., healthy: bool = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ...) -> None: ...

class StudentReport(_message.Message):
    __slots__ = ("service_name", "student_id", "instance_id", "interval_seconds", "rows_per_s", "tokens_per_s", "rows", "tokens", "wait_fraction", "teachers", "store_hits", "fixed")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    STORE_HITS_FIELD_NUMBER: _ClassVar[int]
    FIXED_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    student_id: str
    instance_id: str
    interval_seconds: float
    rows_per_s: float
    tokens_per_s: float
    rows: int
    tokens: int
    wait_fraction: float
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherFigures]
    store_hits: int
    fixed: bool
    def __init__(self, service_name: _Optional[str] = ..., student_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., interval_seconds: _Optional[float] = ..., rows_per_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., rows: _Optional[int] = ..., tokens: _Optional[int] = ..., wait_fraction: _Optional[float] = ..., teachers: _Optional[_Iterable[_Union[TeacherFigures, _Mapping]]] = ..., store_hits: _Optional[int] = ..., fixed: bool = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("report_seconds",)
    REPORT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    report_seconds: float
    def __init__(self, report_seconds: _Optional[float] = ...) -> None: ...
