"""jobpool_async: an asyncio-native job queue with a precise, atomic job state machine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import Config
from ._errors import (
    BatchError,
    DuplicateJobError,
    InvalidTransitionError,
    JobNotFoundError,
    JobPoolError,
    JobsNotFinalError,
    QueueClosedError,
    StorageError,
)
from ._leases import Lease
from ._listing import JobPage
from ._models import CancelResult, Job, JobStats, JobStatus
from ._periodic import Periodic, run_periodic
from ._queue import JobStream, PoolQueue
from ._retry import Discard, Retry, RetryPolicy
from ._worker import Worker
from .backends import Backend, MemoryBackend, open_backend

if TYPE_CHECKING:
    from .backends.leveldb import LevelDBBackend
    from .backends.postgres import PostgresBackend
    from .backends.sqlite import SQLiteBackend

__all__ = [
    "Backend",
    "BatchError",
    "CancelResult",
    "Config",
    "Discard",
    "DuplicateJobError",
    "InvalidTransitionError",
    "Job",
    "JobNotFoundError",
    "JobPage",
    "JobPoolError",
    "JobStats",
    "JobStatus",
    "JobStream",
    "JobsNotFinalError",
    "Lease",
    "LevelDBBackend",
    "MemoryBackend",
    "Periodic",
    "PoolQueue",
    "PostgresBackend",
    "QueueClosedError",
    "Retry",
    "RetryPolicy",
    "SQLiteBackend",
    "StorageError",
    "Worker",
    "open_backend",
    "run_periodic",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The storage backends with optional dependencies load on first use."""
    if name in ("SQLiteBackend", "LevelDBBackend", "PostgresBackend"):
        from . import backends

        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
