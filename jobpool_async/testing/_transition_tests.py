"""Every transition of SPEC §2 and every rejected one, through a queue."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from jobpool_async import (
    BatchError,
    InvalidTransitionError,
    JobNotFoundError,
    JobStatus,
    PoolQueue,
)

from ._helpers import FINAL, LIFECYCLE, UPDATE_ALLOWED, job_in, new_id, take

S = JobStatus


def single_call(queue: PoolQueue, op: str, job_id: str) -> Awaitable[None]:
    calls: dict[str, Callable[[], Awaitable[None]]] = {
        "complete": lambda: queue.complete_job(job_id, b"result"),
        "fail": lambda: queue.fail_job(job_id, "failure"),
        "stop": lambda: queue.stop_job(job_id, "stop message"),
        "stop_with_retry": lambda: queue.stop_job_with_retry(job_id, "stop retry"),
        "mark_unknown_stopped": lambda: queue.mark_job_unknown_stopped(job_id, "unknown"),
        "discard": lambda: queue.discard_job(job_id, "discarded"),
    }
    return calls[op]()


def batch_call(queue: PoolQueue, op: str, job_ids: list[str]) -> Awaitable[None]:
    if op == "complete":
        return queue.complete_jobs({i: b"result" for i in job_ids})
    msg = {
        "fail": "failure",
        "stop": "stop message",
        "stop_with_retry": "stop retry",
        "mark_unknown_stopped": "unknown",
        "discard": "discarded",
    }[op]
    method = {
        "discard": queue.discard_jobs,
        "fail": queue.fail_jobs,
        "stop": queue.stop_jobs,
        "stop_with_retry": queue.stop_jobs_with_retry,
        "mark_unknown_stopped": queue.mark_jobs_unknown_stopped,
    }[op]
    return method(dict.fromkeys(job_ids, msg))


def check_side_effects(op: str, before: object, after: object) -> None:
    from jobpool_async import Job

    assert isinstance(before, Job) and isinstance(after, Job)
    assert after.assignee_id == before.assignee_id, "assignee is never cleared"
    assert after.assigned_at == before.assigned_at
    assert after.started_at == before.started_at
    assert after.created_at == before.created_at
    if op == "complete":
        assert after.result == b"result"
    if op in ("fail", "stop_with_retry"):
        assert after.retry_count == before.retry_count + 1
        assert after.last_retry_at is not None
        assert before.last_retry_at is None or after.last_retry_at > before.last_retry_at
    else:
        assert after.retry_count == before.retry_count
        assert after.last_retry_at == before.last_retry_at
    if after.status in FINAL:
        assert after.finalized_at is not None
        assert before.finalized_at is None or after.finalized_at > before.finalized_at
    else:
        assert after.finalized_at == before.finalized_at
    expected_msg = {
        "fail": "failure",
        "stop": "stop message",
        "stop_with_retry": "stop retry",
        "mark_unknown_stopped": "unknown",
        "discard": "discarded",
    }.get(op)
    if expected_msg is not None:
        assert after.error_message == expected_msg


class TransitionTests:
    @pytest.mark.parametrize("op", sorted(LIFECYCLE))
    async def test_single_lifecycle_call_from_every_status(self, queue: PoolQueue, op: str) -> None:
        sources, target = LIFECYCLE[op]
        for status in S:
            job_id = await job_in(queue, status)
            before = await queue.get_job(job_id)
            if status in sources:
                await single_call(queue, op, job_id)
                after = await queue.get_job(job_id)
                assert after.status is target, (op, status)
                check_side_effects(op, before, after)
            else:
                with pytest.raises(InvalidTransitionError) as info:
                    await single_call(queue, op, job_id)
                assert info.value.job_id == job_id
                assert info.value.current is status
                assert info.value.target is target
                assert await queue.get_job(job_id) == before, "a rejected move changed the job"

    @pytest.mark.parametrize("op", sorted(LIFECYCLE))
    async def test_batch_call_moves_what_it_can_and_reports_the_rest(
        self, queue: PoolQueue, op: str
    ) -> None:
        sources, target = LIFECYCLE[op]
        ids = {status: await job_in(queue, status) for status in S}
        missing = new_id("missing")
        with pytest.raises(BatchError) as info:
            await batch_call(queue, op, [*ids.values(), missing])
        errors = info.value.errors
        assert isinstance(errors[missing], JobNotFoundError)
        for status, job_id in ids.items():
            got = await queue.get_job(job_id)
            if status in sources:
                assert job_id not in errors
                assert got.status is target
            else:
                err = errors[job_id]
                assert isinstance(err, InvalidTransitionError)
                assert (err.current, err.target) == (status, target)
                assert got.status is status
        assert set(errors) == {missing} | {i for s, i in ids.items() if s not in sources}

    async def test_batch_of_only_good_jobs_raises_nothing(self, queue: PoolQueue) -> None:
        ids = [await job_in(queue, S.RUNNING) for _ in range(3)]
        await queue.complete_jobs({i: f"r{i}".encode() for i in ids})
        for job in await queue.get_jobs(ids):
            assert job.status is S.COMPLETED
            assert job.result == f"r{job.id}".encode()

    async def test_empty_batches_are_no_ops(self, queue: PoolQueue) -> None:
        await queue.complete_jobs({})
        await queue.fail_jobs({})
        await queue.stop_jobs({})
        await queue.stop_jobs_with_retry({})
        await queue.mark_jobs_unknown_stopped({})
        await queue.acknowledge_cancellation({})
        assert await queue.enqueue_jobs([]) == []
        assert (await queue.get_job_stats()).total_jobs == 0

    async def test_single_calls_on_missing_job_raise_not_found(self, queue: PoolQueue) -> None:
        for op in LIFECYCLE:
            with pytest.raises(JobNotFoundError):
                await single_call(queue, op, "nope")
        with pytest.raises(JobNotFoundError):
            await queue.update_job_status("nope", S.COMPLETED)
        with pytest.raises(JobNotFoundError):
            await queue.get_job("nope")
        with pytest.raises(BatchError) as info:
            await queue.acknowledge_cancellation({"nope": True})
        assert isinstance(info.value.errors["nope"], JobNotFoundError)
        assert isinstance(JobNotFoundError("x"), LookupError)

    async def test_update_job_status_allows_exactly_the_spec_moves(self, queue: PoolQueue) -> None:
        for current in S:
            for target in S:
                job_id = await job_in(queue, current)
                before = await queue.get_job(job_id)
                if target is current:
                    await queue.update_job_status(job_id, target, b"new result", "new message")
                    after = await queue.get_job(job_id)
                    assert after.status is current
                    assert after.result == b"new result"
                    assert after.error_message == "new message"
                    assert after.finalized_at == before.finalized_at, "self-move sets no timestamp"
                    assert after.last_retry_at == before.last_retry_at
                    assert after.retry_count == before.retry_count
                elif target in UPDATE_ALLOWED[current]:
                    await queue.update_job_status(job_id, target, b"res", "msg")
                    after = await queue.get_job(job_id)
                    assert after.status is target, (current, target)
                    assert after.result == b"res"
                    assert after.error_message == "msg"
                    assert after.retry_count == before.retry_count
                    assert after.last_retry_at == before.last_retry_at
                    if target in FINAL:
                        assert after.finalized_at is not None
                        if before.finalized_at is not None:
                            assert after.finalized_at > before.finalized_at
                    else:
                        assert after.finalized_at == before.finalized_at
                else:
                    with pytest.raises(InvalidTransitionError) as info:
                        await queue.update_job_status(job_id, target)
                    assert (info.value.current, info.value.target) == (current, target)
                    assert await queue.get_job(job_id) == before

    async def test_update_keeps_result_and_message_when_not_given(self, queue: PoolQueue) -> None:
        job_id = await job_in(queue, S.FAILED_RETRY)
        await queue.update_job_status(job_id, S.STOPPED)
        job = await queue.get_job(job_id)
        assert job.error_message == "boom"
        assert job.result is None
        done = await job_in(queue, S.RUNNING)
        await queue.complete_job(done, b"")
        assert (await queue.get_job(done)).result == b"", "b'' stays b''"

    async def test_unknown_stopped_to_completed_refinalizes(self, queue: PoolQueue) -> None:
        job_id = await job_in(queue, S.UNKNOWN_STOPPED)
        first = await queue.get_job(job_id)
        await queue.complete_job(job_id, b"late")
        after = await queue.get_job(job_id)
        assert after.status is S.COMPLETED
        assert first.finalized_at is not None and after.finalized_at is not None
        assert after.finalized_at > first.finalized_at

    async def test_cancel_moves_each_status_as_specified(self, queue: PoolQueue) -> None:
        expected = {
            S.INITIAL_PENDING: S.UNSCHEDULED,
            S.RUNNING: S.CANCELLING,
            S.CANCELLING: S.CANCELLING,
            S.FAILED_RETRY: S.STOPPED,
            S.UNKNOWN_RETRY: S.STOPPED,
        }
        ids = {status: await job_in(queue, status) for status in S}
        missing = new_id("missing")
        result = await queue.cancel_jobs(job_ids=[*ids.values(), missing, ids[S.RUNNING]])
        assert sorted(result.cancelled) == sorted(ids[s] for s in expected)
        assert sorted(result.unknown) == sorted([missing, *(ids[s] for s in FINAL)])
        assert result.missing == [missing]
        for status, job_id in ids.items():
            job = await queue.get_job(job_id)
            assert job.status is expected.get(status, status)
            if expected.get(status) in FINAL:
                assert job.finalized_at is not None
            if status is S.RUNNING:
                assert job.finalized_at is None

    async def test_cancel_by_tags_and_ids_is_a_union_reported_once(self, queue: PoolQueue) -> None:
        from jobpool_async import Job

        await queue.enqueue_jobs(
            [
                Job(id="a", job_type="t", tags=["x", "y"]),
                Job(id="b", job_type="t", tags=["x"]),
                Job(id="c", job_type="t", tags=["y"]),
            ]
        )
        result = await queue.cancel_jobs(tags=["x", "y"], job_ids=["a", "c"])
        assert sorted(result.cancelled) == ["a", "c"]
        assert result.unknown == []
        assert (await queue.get_job("b")).status is S.INITIAL_PENDING
        again = await queue.cancel_jobs(tags=["x"])
        assert again.cancelled == ["b"]
        assert sorted(again.unknown) == ["a"]
        assert again.missing == []

    async def test_cancel_reports_missing_ids_apart_from_final_ones(self, queue: PoolQueue) -> None:
        """``missing`` (no such job: an HTTP 404) is the part of ``unknown`` that does not
        exist; a final job (409) is only in ``unknown``. Request order, each id once."""
        done = await job_in(queue, S.COMPLETED)
        pending = await job_in(queue, S.INITIAL_PENDING)
        gone1, gone2 = new_id("gone"), new_id("gone")
        result = await queue.cancel_jobs(job_ids=[gone2, done, pending, gone1, gone2])
        assert result.cancelled == [pending]
        assert result.missing == [gone2, gone1]
        assert sorted(result.unknown) == sorted([gone1, gone2, done])
        assert set(result.missing) <= set(result.unknown)
        by_tag = await queue.cancel_jobs(tags=["no-such-tag"])
        assert by_tag.cancelled == by_tag.unknown == by_tag.missing == []

    async def test_acknowledge_cancellation(self, queue: PoolQueue) -> None:
        executing = await job_in(queue, S.CANCELLING)
        idle = await job_in(queue, S.CANCELLING)
        running = await job_in(queue, S.RUNNING)
        with pytest.raises(BatchError) as info:
            await queue.acknowledge_cancellation({executing: True, idle: False, running: True})
        assert set(info.value.errors) == {running}
        err = info.value.errors[running]
        assert isinstance(err, InvalidTransitionError) and err.current is S.RUNNING
        assert (await queue.get_job(executing)).status is S.STOPPED
        assert (await queue.get_job(idle)).status is S.UNKNOWN_STOPPED
        assert (await queue.get_job(idle)).finalized_at is not None

    async def test_mark_worker_unresponsive_moves_only_that_workers_active_jobs(
        self,
        queue: PoolQueue,
    ) -> None:
        await take(queue, "r1", "dead")
        await take(queue, "r2", "dead")
        await take(queue, "done", "dead")
        await take(queue, "other", "alive")
        await queue.cancel_jobs(job_ids=["r2"])
        await queue.complete_job("done", b"x")
        assert await queue.mark_worker_unresponsive("dead") == 2
        assert (await queue.get_job("r1")).status is S.UNKNOWN_RETRY
        r2 = await queue.get_job("r2")
        assert r2.status is S.UNKNOWN_STOPPED and r2.finalized_at is not None
        assert (await queue.get_job("done")).status is S.COMPLETED
        assert (await queue.get_job("other")).status is S.RUNNING
        assert (await queue.get_job("r1")).assignee_id == "dead", "assignee is kept"
        assert await queue.mark_worker_unresponsive("dead") == 0
        assert await queue.mark_worker_unresponsive("nobody") == 0

    async def test_reset_running_jobs(self, queue: PoolQueue) -> None:
        running = await job_in(queue, S.RUNNING)
        cancelling = await job_in(queue, S.CANCELLING)
        pending = await job_in(queue, S.INITIAL_PENDING)
        assert await queue.reset_running_jobs() == 2
        assert (await queue.get_job(running)).status is S.UNKNOWN_RETRY
        assert (await queue.get_job(cancelling)).status is S.UNKNOWN_STOPPED
        assert (await queue.get_job(pending)).status is S.INITIAL_PENDING
        assert await queue.reset_running_jobs() == 0

    async def test_retry_then_reassignment_keeps_started_at(self, queue: PoolQueue) -> None:
        first = await take(queue, "again")
        await queue.fail_job("again", "transient")
        failed = await queue.get_job("again")
        async with queue.stream_jobs("w2", tags=["only:again"]) as stream:
            (second,) = await stream.__anext__()
        assert second.status is S.RUNNING
        assert second.started_at == first.started_at, "started_at is set once"
        assert second.assignee_id == "w2"
        assert second.assigned_at is not None and first.assigned_at is not None
        assert second.assigned_at > first.assigned_at
        assert second.retry_count == 1
        assert second.last_retry_at == failed.last_retry_at
