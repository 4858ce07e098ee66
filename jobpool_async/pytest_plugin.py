"""pytest fixtures for projects that use jobpool_async (registered as a ``pytest11`` plugin).

Installing jobpool_async makes these fixtures available in every test suite:

* ``jobpool_backend`` — a fresh, unopened :class:`~jobpool_async.Backend`. Memory by
  default; choose another with ``--jobpool-backend=sqlite`` (or ``leveldb``,
  ``postgres``) or per test with ``@pytest.mark.jobpool_backend("sqlite")``. SQLite
  and LevelDB stores live in ``tmp_path``; PostgreSQL uses the DSN in
  ``JOBPOOL_TEST_POSTGRES_DSN`` and a schema of its own, dropped afterwards (the
  test is skipped, saying why, when the variable is not set).
* ``jobpool_queue`` — an open :class:`~jobpool_async.PoolQueue` on that backend,
  closed after the test.
* ``jobpool_wait_for_status`` — ``await wait(queue, job_id, status, timeout=10.0)``
  waits until the job is in ``status`` (or one of several) and returns it (a thin
  alias of :meth:`PoolQueue.wait_for`, which also waits for a job not enqueued yet); on
  timeout it raises :class:`JobStatusTimeout` (an ``AssertionError`` and a
  ``TimeoutError``) naming the status it last saw.

The async fixtures need pytest-asyncio (they work in its ``auto`` and ``strict``
modes and follow its default fixture loop scope).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import pytest

from . import Job, JobNotFoundError, JobStatus, PoolQueue
from .backends.base import Backend, check_seconds
from .backends.registry import BACKEND_NAMES, backend_info, temporary_store

# The shipped conformance kit asserts in jobpool_async.testing: show the values on failure.
pytest.register_assert_rewrite("jobpool_async.testing")

__all__ = [
    "BACKEND_NAMES",
    "POSTGRES_DSN_ENV",
    "JobStatusTimeout",
    "WaitForStatus",
    "wait_for_status",
]

POSTGRES_DSN_ENV = "JOBPOOL_TEST_POSTGRES_DSN"
_OPTION = "--jobpool-backend"
_MARKER = "jobpool_backend"


class JobStatusTimeout(AssertionError, TimeoutError):
    """A job did not reach the expected status before the deadline."""


async def wait_for_status(
    queue: PoolQueue,
    job_id: str,
    status: JobStatus | Iterable[JobStatus],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline for a test helper, not a cancel scope
) -> Job:
    """Wait until job ``job_id`` is in ``status`` (one status or several) and return it.

    A thin alias of :meth:`PoolQueue.wait_for` for tests: a job that does not exist
    (yet) is waited for too, and after ``timeout`` seconds :class:`JobStatusTimeout`
    says what the job was last.
    """
    wanted = (
        frozenset({JobStatus(status)})
        if isinstance(status, str)
        else frozenset(JobStatus(s) for s in status)
    )
    if not wanted:
        raise ValueError("status must name at least one JobStatus")
    deadline = time.monotonic() + check_seconds(timeout, "timeout")
    while True:
        remaining = deadline - time.monotonic()
        try:
            return await queue.wait_for(job_id, timeout=max(remaining, 0), statuses=wanted)
        except JobNotFoundError:
            if remaining > 0:  # not enqueued yet: look again shortly
                await asyncio.sleep(min(0.01, remaining))
                continue
            last: Job | None = None
        except TimeoutError:
            try:
                last = await queue.get_job(job_id)
            except JobNotFoundError:
                last = None
        seen = "it does not exist" if last is None else f"it is {last.status.name}"
        names = " or ".join(sorted(s.name for s in wanted))
        detail = f" (error_message: {last.error_message!r})" if last and last.error_message else ""
        raise JobStatusTimeout(
            f"job {job_id!r} did not reach {names} within {timeout:g} s; {seen}{detail}"
        )


class WaitForStatus(Protocol):
    """The type of the ``jobpool_wait_for_status`` fixture."""

    def __call__(
        self,
        queue: PoolQueue,
        job_id: str,
        status: JobStatus | Iterable[JobStatus],
        *,
        timeout: float = 10.0,
    ) -> Awaitable[Job]: ...


# --- pytest hooks -------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jobpool_async", "jobpool_async fixtures")
    group.addoption(
        _OPTION,
        action="store",
        choices=BACKEND_NAMES,
        default=None,
        help="backend behind the jobpool_backend/jobpool_queue fixtures (default: memory)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(name): run this test's jobpool_backend fixture on the named backend "
        f"({', '.join(BACKEND_NAMES)})",
    )


# --- fixtures -----------------------------------------------------------------------------


def _backend_name(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker(_MARKER)
    if marker is not None:
        if len(marker.args) != 1 or not isinstance(marker.args[0], str):
            raise pytest.UsageError(
                f"@pytest.mark.{_MARKER} takes one backend name, e.g. "
                f'@pytest.mark.{_MARKER}("sqlite"); got {marker.args!r}'
            )
        name: str = marker.args[0]
    else:
        name = request.config.getoption(_OPTION) or "memory"
    if name not in BACKEND_NAMES:
        raise pytest.UsageError(
            f"unknown jobpool backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
        )
    return name


async def _backend_fixture(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    info = backend_info(_backend_name(request))
    dsn = os.environ.get(POSTGRES_DSN_ENV, "")
    if info.needs_server and not dsn:
        pytest.skip(
            f"jobpool_backend {info.name!r} needs a server: set {POSTGRES_DSN_ENV} "
            "(e.g. postgresql://postgres@127.0.0.1:5432/test)"
        )
    store = temporary_store(info.name, tmp_path, postgres_dsn=dsn, stem="jobpool")
    backend = store.new_backend()
    try:
        yield backend
    finally:
        await backend.close()
        await store.remove()


async def _queue_fixture(jobpool_backend: Backend) -> AsyncIterator[PoolQueue]:
    queue = PoolQueue(jobpool_backend)
    await queue.open()
    try:
        yield queue
    finally:
        await queue.close()


def _wait_fixture() -> WaitForStatus:
    return wait_for_status


def _needs_pytest_asyncio(name: str) -> Callable[..., Any]:
    def fixture() -> Any:
        raise pytest.UsageError(
            f"the {name} fixture is async and needs pytest-asyncio: pip install pytest-asyncio"
        )

    return fixture


jobpool_backend: Any
jobpool_queue: Any
try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - depends on the user's environment
    jobpool_backend = pytest.fixture(name="jobpool_backend")(
        _needs_pytest_asyncio("jobpool_backend")
    )
    jobpool_queue = pytest.fixture(name="jobpool_queue")(_needs_pytest_asyncio("jobpool_queue"))
else:
    jobpool_backend = pytest_asyncio.fixture(name="jobpool_backend")(_backend_fixture)
    jobpool_queue = pytest_asyncio.fixture(name="jobpool_queue")(_queue_fixture)

jobpool_wait_for_status = pytest.fixture(name="jobpool_wait_for_status")(_wait_fixture)
