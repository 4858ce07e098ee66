"""Bad input (SPEC §5): ValueError/TypeError naming the problem, and nothing written."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from jobpool_async import Job, JobStatus, PoolQueue

from ._helpers import job_in

S = JobStatus


Call = Callable[[PoolQueue], Awaitable[Any]]


def enqueue(**fields: Any) -> Call:
    def call(queue: PoolQueue) -> Awaitable[Any]:
        base: dict[str, Any] = {"id": "bad", "job_type": "t"}
        base.update(fields)
        return queue.enqueue_job(Job(**base))

    return call


BAD_ENQUEUES: list[tuple[str, Call, type[Exception], str]] = [
    ("empty id", enqueue(id=""), ValueError, "empty"),
    ("NUL in id", enqueue(id="a\x00b"), ValueError, "NUL"),
    ("id not str", enqueue(id=7), TypeError, "job id"),
    ("status not pending", enqueue(status=S.RUNNING), ValueError, "INITIAL_PENDING"),
    ("payload not bytes", enqueue(job_definition="text"), TypeError, "job_definition"),
    ("tag not str", enqueue(tags=["ok", 3]), TypeError, "tag"),
    ("empty tag", enqueue(tags=["ok", ""]), ValueError, "tag"),
    ("NUL in tag", enqueue(tags=["a\x00"]), ValueError, "NUL"),
    ("tags a string", enqueue(tags="abc"), TypeError, "tags"),
    ("naive created_at", enqueue(created_at=datetime(2020, 1, 1)), ValueError, "naive"),
    ("created_at not datetime", enqueue(created_at="2020"), TypeError, "created_at"),
    ("job_type not str", enqueue(job_type=b"t"), TypeError, "job_type"),
    ("not a Job", lambda q: q.enqueue_job({"id": "x"}), TypeError, "Job"),  # type: ignore[arg-type]
]


BAD_CALLS: list[tuple[str, Call, type[Exception], str]] = [
    ("fail empty message", lambda q: q.fail_job("r", ""), ValueError, "error_message"),
    ("fail_jobs empty message", lambda q: q.fail_jobs({"r": ""}), ValueError, "error_message"),
    ("complete non-bytes", lambda q: q.complete_job("r", "text"), TypeError, "result"),  # type: ignore[arg-type]
    ("complete_jobs non-bytes", lambda q: q.complete_jobs({"r": 1}), TypeError, "result"),  # type: ignore[dict-item]
    ("complete empty id", lambda q: q.complete_job("", b""), ValueError, "empty"),
    ("complete_jobs not a mapping", lambda q: q.complete_jobs(["r"]), TypeError, "mapping"),  # type: ignore[arg-type]
    ("stop message not str", lambda q: q.stop_job("r", None), TypeError, "error_message"),  # type: ignore[arg-type]
    ("cleanup zero ttl", lambda q: q.cleanup_expired_jobs(timedelta(0)), ValueError, "ttl"),
    ("cleanup negative ttl", lambda q: q.cleanup_expired_jobs(timedelta(-1)), ValueError, "ttl"),
    ("cleanup ttl not timedelta", lambda q: q.cleanup_expired_jobs(3600), TypeError, "ttl"),  # type: ignore[arg-type]
    ("cancel nothing", lambda q: q.cancel_jobs(), ValueError, "tags or job_ids"),
    ("cancel empty lists", lambda q: q.cancel_jobs([], []), ValueError, "tags or job_ids"),
    ("delete nothing", lambda q: q.delete_jobs(), ValueError, "tags or job_ids"),
    ("cancel empty tag", lambda q: q.cancel_jobs(tags=[""]), ValueError, "tag"),
    ("delete NUL id", lambda q: q.delete_jobs(job_ids=["\x00"]), ValueError, "NUL"),
    ("update unknown status", lambda q: q.update_job_status("r", "nope"), ValueError, "status"),  # type: ignore[arg-type]
    ("ack not bool", lambda q: q.acknowledge_cancellation({"r": 1}), TypeError, "bool"),  # type: ignore[dict-item]
    ("unresponsive empty", lambda q: q.mark_worker_unresponsive(""), ValueError, "assignee"),
    ("get_job NUL", lambda q: q.get_job("a\x00"), ValueError, "NUL"),
    ("get_jobs a string", lambda q: q.get_jobs("abc"), TypeError, "job_ids"),
    ("stats tag not str", lambda q: q.get_job_stats([1]), TypeError, "tag"),  # type: ignore[list-item]
]


class BadInputTests:
    @pytest.mark.parametrize(
        ("call", "error", "words"),
        [pytest.param(c, e, w, id=name) for name, c, e, w in BAD_ENQUEUES],
    )
    async def test_bad_jobs_are_rejected_before_anything_is_written(
        self, queue: PoolQueue, call: Call, error: type[Exception], words: str
    ) -> None:
        with pytest.raises(error, match=words):
            await call(queue)
        assert (await queue.get_job_stats()).total_jobs == 0

    async def test_one_bad_job_in_a_batch_writes_nothing(self, queue: PoolQueue) -> None:
        with pytest.raises(ValueError, match="tag"):
            await queue.enqueue_jobs(
                [Job(id="good", job_type="t"), Job(id="bad", job_type="t", tags=[""])]
            )
        assert (await queue.get_job_stats()).total_jobs == 0
        with pytest.raises(TypeError):
            await queue.enqueue_jobs(Job(id="single", job_type="t"))  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("call", "error", "words"), [pytest.param(c, e, w, id=name) for name, c, e, w in BAD_CALLS]
    )
    async def test_bad_arguments_leave_the_store_as_it_was(
        self, queue: PoolQueue, call: Call, error: type[Exception], words: str
    ) -> None:
        await job_in(queue, S.RUNNING, "r")
        before = await queue.get_job("r")
        with pytest.raises(error, match=words):
            await call(queue)
        assert await queue.get_job("r") == before
        assert (await queue.get_job_stats()).total_jobs == 1

    @pytest.mark.parametrize(
        ("kwargs", "error", "words"),
        [
            ({"assignee_id": ""}, ValueError, "assignee_id"),
            ({"assignee_id": 5}, TypeError, "assignee_id"),
            ({"assignee_id": "w", "max_assigned_jobs": 0}, ValueError, "max_assigned_jobs"),
            ({"assignee_id": "w", "max_assigned_jobs": -3}, ValueError, "max_assigned_jobs"),
            ({"assignee_id": "w", "max_assigned_jobs": 1.5}, TypeError, "max_assigned_jobs"),
            ({"assignee_id": "w", "tags": [""]}, ValueError, "tag"),
            ({"assignee_id": "w", "tags": "gpu"}, TypeError, "tags"),
        ],
    )
    async def test_bad_stream_arguments_raise_when_stream_jobs_is_called(
        self, queue: PoolQueue, kwargs: dict[str, Any], error: type[Exception], words: str
    ) -> None:
        with pytest.raises(error, match=words):
            queue.stream_jobs(**kwargs)
