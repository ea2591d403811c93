"""natask: a Celery-style distributed task queue on NATS JetStream."""

from .app import Natask
from .canvas import EagerResult, GroupResult, ResultSet, chain, chord, chunks, group
from .errors import (
    BrokerError,
    ConfigError,
    DecodeError,
    EncodeError,
    ExceptionInfo,
    Ignore,
    MaxRetriesExceededError,
    NataskError,
    NoWorkers,
    PayloadTooLarge,
    PermissionDenied,
    Reject,
    ResultError,
    ResultTimeout,
    Retry,
    SoftTimeLimitExceeded,
    StorageFull,
    TaskControl,
    TaskFailed,
    TaskNotFound,
    TaskRevoked,
    TimeLimitExceeded,
    WorkerLostError,
)
from .result import AsyncResult
from .task import AsyncTask, Request, Task
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "AsyncTask",
    "BrokerError",
    "ConfigError",
    "DecodeError",
    "EagerResult",
    "EncodeError",
    "ExceptionInfo",
    "GroupResult",
    "Ignore",
    "MaxRetriesExceededError",
    "Natask",
    "NataskError",
    "NoWorkers",
    "PayloadTooLarge",
    "PermissionDenied",
    "Reject",
    "Request",
    "ResultSet",
    "ResultError",
    "ResultTimeout",
    "Retry",
    "SoftTimeLimitExceeded",
    "StorageFull",
    "Task",
    "TaskControl",
    "TaskFailed",
    "TaskNotFound",
    "TaskRevoked",
    "TimeLimitExceeded",
    "Worker",
    "WorkerLostError",
    "chain",
    "chord",
    "chunks",
    "group",
]
