"""Every duration or interval taken in seconds refuses NaN and infinity (issue #14, item 7).

A timer on NaN never compares and one on infinity never fires, so each is refused
when the option is given, with a ``ValueError`` naming the option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import Config, Job, JobStatus, MemoryBackend, PoolQueue, Worker
from jobpool_async.backends.sqlite import SQLiteBackend
from jobpool_async.pytest_plugin import wait_for_status

NOT_FINITE = [math.nan, math.inf, -math.inf, 10**400]
NOT_FINITE_IDS = ["nan", "inf", "-inf", "10**400"]


async def _noop(job: Job) -> bytes:
    return b""


def _postgres(**options: Any) -> object:
    pytest.importorskip("asyncpg", reason="the postgres extra is not installed")
    from jobpool_async.backends.postgres import PostgresBackend

    return PostgresBackend("postgresql://nowhere.invalid/x", **options)


SYNC_OPTIONS: dict[str, Callable[[float, Path], object]] = {
    "poll_interval": lambda v, _: PoolQueue(MemoryBackend(), poll_interval=v),
    "grace": lambda v, _: Worker(PoolQueue(MemoryBackend()), _noop, assignee_id="w", grace=v),
    "busy_timeout": lambda v, p: SQLiteBackend(p / "jobs.db", busy_timeout=v),
    "connect_timeout": lambda v, _: _postgres(connect_timeout=v),
    "command_timeout": lambda v, _: _postgres(command_timeout=v),
}


@pytest.mark.parametrize("value", NOT_FINITE, ids=NOT_FINITE_IDS)
@pytest.mark.parametrize("option", sorted(SYNC_OPTIONS))
def test_non_finite_seconds_are_refused(option: str, value: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{option} must be a finite number of seconds"):
        SYNC_OPTIONS[option](value, tmp_path)


@pytest.mark.parametrize("value", NOT_FINITE, ids=NOT_FINITE_IDS)
async def test_non_finite_stop_grace_and_wait_timeout_are_refused(value: float) -> None:
    async with PoolQueue(MemoryBackend()) as queue:
        worker = Worker(queue, _noop, assignee_id="w")
        with pytest.raises(ValueError, match="grace must be a finite number"):
            await worker.stop(grace=value)
        await queue.enqueue_job(Job(id="j", job_type="t"))
        with pytest.raises(ValueError, match="timeout must be a finite number"):
            await wait_for_status(queue, "j", JobStatus.COMPLETED, timeout=value)


@pytest.mark.parametrize("text", ["nan", "inf", "infinity", "1e9999", "-1"])
@pytest.mark.parametrize("var", ["JOBPOOL_TTL", "JOBPOOL_CLEANUP_INTERVAL"])
def test_non_finite_durations_from_the_environment_are_refused(var: str, text: str) -> None:
    with pytest.raises(ValueError, match=var):
        Config.from_env({var: text})


async def test_a_float_ttl_is_refused_not_read_as_seconds() -> None:
    async with PoolQueue(MemoryBackend()) as queue:
        with pytest.raises(TypeError, match="ttl must be a timedelta"):
            await queue.cleanup_expired_jobs(math.inf)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"Config\.ttl must be a timedelta"):
            Config(ttl=math.nan)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.001, 1, 3600.5, timedelta(seconds=2)], ids=repr)
def test_finite_seconds_are_taken(value: float) -> None:
    worker = Worker(PoolQueue(MemoryBackend()), _noop, assignee_id="w", grace=value)
    assert worker._grace == (value.total_seconds() if isinstance(value, timedelta) else value)
    if not isinstance(value, timedelta):
        assert PoolQueue(MemoryBackend(), poll_interval=value).poll_interval == value
