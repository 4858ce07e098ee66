"""jobpool_async: an asyncio-native job queue with a precise, atomic job state machine."""

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
from ._models import CancelResult, Job, JobStats, JobStatus
from ._queue import JobStream, PoolQueue
from .backends import Backend, MemoryBackend

__all__ = [
    "Backend",
    "BatchError",
    "CancelResult",
    "DuplicateJobError",
    "InvalidTransitionError",
    "Job",
    "JobNotFoundError",
    "JobPoolError",
    "JobStats",
    "JobStatus",
    "JobStream",
    "JobsNotFinalError",
    "MemoryBackend",
    "PoolQueue",
    "QueueClosedError",
    "StorageError",
]
__version__ = "0.1.0"
