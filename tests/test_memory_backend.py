"""The memory backend: its lazily applied indexes (``_Lazy``) against a plain sorted
set, and what it keeps of the jobs it is given."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from jobpool_async import Job, JobStatus, PoolQueue
from jobpool_async.backends.base import FAIL, WORKER_LOST, Change
from jobpool_async.backends.memory import MemoryBackend, _Lazy, _Taken

# (op, value): add a value absent from the index, remove one present, or read it.
_OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "read"]), st.integers(0, 40)))


def _entry(job_id: str, value: int) -> tuple[int, str]:
    return (value, job_id)


@given(_OPS)
def test_a_lazy_index_reads_as_its_changes_applied_in_order(ops: list[tuple[str, int]]) -> None:
    """Changes noted by job id (an addition keeps its value, a removal its entry)
    read as if applied in order; an id that goes and comes back with another value
    (a job deleted, a new one with its id) has the new entry only."""
    lazy: _Lazy[tuple[int, str]] = _Lazy(_entry)
    model: dict[str, int] = {}
    for op, value in ops:
        job_id = str(value % 20)
        if op == "add" and job_id not in model:
            lazy.add(job_id, value)
            model[job_id] = value
        elif op == "remove" and model:
            present = sorted(model)[value % len(model)]
            lazy.remove(present, (model.pop(present), present))
        elif op == "read":
            assert list(lazy.sorted()) == sorted((v, i) for i, v in model.items())
        assert len(lazy) == len(model)
    want = sorted((v, i) for i, v in model.items())
    assert list(lazy.sorted()) == want
    assert list(lazy.sorted()) == want  # a second read changes nothing


def test_many_removals_rebuild_the_index_and_few_remove_entry_by_entry() -> None:
    lazy: _Lazy[tuple[int, str]] = _Lazy(_entry)
    lazy.add_all({str(value): value for value in range(100)})
    first = lazy.sorted()
    lazy.remove("5", (5, "5"))
    assert lazy.sorted() is first and list(first) == [(v, str(v)) for v in range(100) if v != 5]
    for value in range(10, 90):
        lazy.remove(str(value), (value, str(value)))
    rebuilt = lazy.sorted()
    assert rebuilt is not first
    assert list(rebuilt) == [(v, str(v)) for v in range(100) if v != 5 and not 10 <= v < 90]


# (op, values): add values (absent ones; taken ones may come back), remove present ones,
# take the first few (the count: the first value), or read it.
_TAKEN_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "update", "remove", "take", "read"]),
        st.lists(st.integers(0, 500), min_size=1, max_size=60),
    ),
    max_size=80,
)  # (lists long next to a take: taken entries stay marked, not deleted, for a while)


@given(_TAKEN_OPS)
def test_the_eligible_index_reads_as_a_sorted_list_its_head_taken(
    ops: list[tuple[str, list[int]]],
) -> None:
    """``_Taken`` against a plain sorted list: a take returns the first entries and
    leaves the rest; an entry taken may be added again (a claimed job made eligible
    with the same key), and what was taken never shows again."""
    index: _Taken[tuple[int]] = _Taken()
    model: set[tuple[int]] = set()
    for op, values in ops:
        if op == "add":
            for value in values:
                if (value,) not in model:
                    index.add((value,))
                    model.add((value,))
        elif op == "update":
            new = {(v,) for v in values} - model
            index.update(sorted(new, reverse=True))
            model |= new
        elif op == "remove":
            for value in values:
                if (value,) in model:
                    index.remove((value,))
                    model.discard((value,))
        elif op == "take":
            got = index.take(values[0] % 7 + 1)
            assert got == sorted(model)[: values[0] % 7 + 1]
            model.difference_update(got)
        assert list(index) == sorted(model)
        assert len(index) == len(model)


def test_taking_the_head_deletes_the_taken_entries_together() -> None:
    """Taken entries stay, marked, until they are half the list: then they go in one
    rebuild (which sorts what is left: at an eighth, as ``SortedList`` deletes a large
    slice, a drain's takes sorted the list seven times over in all, not once)."""
    index: _Taken[tuple[int]] = _Taken()
    index.update([(i,) for i in range(80)])
    assert index.take(3) == [(0,), (1,), (2,)]
    assert index._taken == 3 and len(index._sorted) == 80  # only marked
    for _ in range(12):
        index.take(3)
    assert index._taken == 39 and len(index._sorted) == 80  # 39 of 80: still marked
    assert index.take(1) == [(39,)]
    assert index._taken == 0 and len(index._sorted) == 40  # half: deleted in one go
    index.take(2)
    index.add((5,))  # below the taken ones: they are deleted first
    assert index._taken == 0 and list(index) == [(5,)] + [(i,) for i in range(42, 80)]


async def test_a_direct_insert_keeps_copies_not_the_callers_jobs() -> None:
    """Called directly (not through a queue, whose checked copies it keeps as they
    are), the backend must not keep the caller's objects: changing one afterwards
    changes nothing stored."""
    backend = MemoryBackend()
    mine = Job(id="a", job_type="t", tags=["x"])
    fresh = Job(id="b", job_type="t", tags=["y"])
    await backend.insert([mine])
    assert await backend.insert_new([fresh]) == ["b"]
    for job in (mine, fresh):
        job.tags.append("changed")
        job.job_type = "changed"
    got = await backend.get_jobs(["a", "b"])
    assert [(j.id, j.job_type, j.tags) for j in got] == [("a", "t", ["x"]), ("b", "t", ["y"])]


async def test_a_queue_enqueue_stores_its_checked_copies_not_the_callers_jobs() -> None:
    mine = Job(id="a", job_type="t", tags=["x"])
    async with PoolQueue(MemoryBackend()) as queue:
        await queue.enqueue_jobs([mine])
        await queue.enqueue_jobs([Job(id="b", job_type="t")], if_exists="ignore")
        stored = queue.backend._jobs["a"]  # type: ignore[attr-defined]
        assert stored is not mine and stored.tags is not mine.tags
        mine.tags.append("changed")
        assert (await queue.get_job("a")).tags == ["x"]


class _PositionalMoves(MemoryBackend):
    """A record store whose ``_stage_move`` takes its arguments by position only (the
    hot path's calls must not bind keywords: a search of the parameter names each)."""

    def _stage_move(
        self,
        w: None,
        record: Job,
        transition: Any,
        now: Any,
        result: bytes | None = None,
        error_message: str | None = None,
        assignee_id: str | None = None,
        scheduled_at: Any = None,
        max_attempts: int | None = None,
        /,
    ) -> Any:
        return super()._stage_move(
            w,
            record,
            transition,
            now,
            result,
            error_message,
            assignee_id,
            scheduled_at,
            max_attempts,
        )


async def test_applies_pass_the_moves_their_arguments_by_position() -> None:
    async with PoolQueue(_PositionalMoves()) as queue:
        await queue.enqueue_jobs([Job(id=f"j{i}", job_type="t", tags=["x"]) for i in range(4)])
        async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
            batch = await anext(stream)
            await queue.complete_jobs({job.id: b"ok" for job in batch})
            batch = await anext(stream)  # (claimed by the completion's refill)
            await queue.fail_jobs({job.id: "no" for job in batch})
            await queue.cancel_jobs(tags=["x"])
        stats = await queue.get_job_stats()
        assert (stats.completed_jobs, stats.stopped_jobs) == (2, 2)


class _SuspendingApplies(MemoryBackend):
    """A memory backend whose ``apply`` suspends once (as a store's thread hop does)."""

    async def apply(self, changes: Any, now: Any, refill: Any = None) -> Any:
        await asyncio.sleep(0)
        return await super().apply(changes, now, refill)


async def test_the_memory_backends_applies_are_awaited_with_no_start() -> None:
    """The memory backend's ``apply`` never suspends: a queue awaits it as it is (no
    ``start``, whose ``send`` raises StopIteration for a call that finishes: one
    exception per batch); an ``apply`` of a subclass's own, which may suspend, still
    goes through ``start`` (a task that survives its caller's cancellation)."""
    for backend, starts_per_batch in ((MemoryBackend(), 0), (_SuspendingApplies(), 1)):
        starts: list[str] = []

        def profile(frame: Any, event: str, arg: Any, seen: list[str] = starts) -> None:
            code = frame.f_code
            if event == "call" and code.co_name == "start" and "_eager" in code.co_filename:
                seen.append(code.co_filename)

        async with PoolQueue(backend) as queue:
            await queue.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in range(6)])
            async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
                batch = await anext(stream)
                sys.setprofile(profile)
                try:
                    for more in (True, True, False):
                        await queue.complete_jobs({job.id: b"ok" for job in batch})
                        batch = await anext(stream) if more else []
                finally:
                    sys.setprofile(None)
            assert len(starts) == 3 * starts_per_batch
            assert (await queue.get_job_stats()).completed_jobs == 6


async def test_a_claim_hands_out_copies_of_every_field() -> None:
    """A claim's jobs are snapshots of the records as moved (built field by field, not
    by ``Job.copy``): every field as stored, the tags a list of their own; and the
    move is ASSIGN's, from each eligible status (an attempt counted, ``started_at``
    set once, no retry counted)."""
    t = datetime(2030, 1, 1, tzinfo=UTC)
    backend = MemoryBackend()
    await backend.insert(
        [
            Job(id="new", job_type="t", job_definition=b"d", tags=["a"], priority=3),
            Job(id="retry", job_type="t", tags=["a", "b"], max_attempts=5),
            Job(id="unknown", job_type="u", created_at=t),
        ]
    )
    first = await backend.claim("w0", ["a"], 2, t)
    now = t + timedelta(seconds=5)
    outcome = await backend.apply(
        [
            Change("retry", FAIL, error_message="e", scheduled_at=None),
            Change("new", WORKER_LOST),
        ],
        now,
    )
    assert not outcome.errors
    got = await backend.claim("w1", [], 3, now + timedelta(seconds=1))
    assert {j.id for j in first} == {"new", "retry"} and len(got) == 3
    stored = {j.id: j for j in await backend.get_jobs(["new", "retry", "unknown"])}
    for job in got:
        assert dataclasses.asdict(job) == dataclasses.asdict(stored[job.id])
        assert job.tags is not backend._jobs[job.id].tags
        assert (job.status, job.assignee_id) == (JobStatus.RUNNING, "w1")
        assert job.assigned_at == now + timedelta(seconds=1)
    by_id = {j.id: j for j in got}
    assert by_id["retry"].attempts == 2 and by_id["retry"].retry_count == 1
    assert by_id["retry"].started_at == t and by_id["retry"].error_message == "e"
    assert by_id["new"].attempts == 2 and by_id["new"].retry_count == 0
    assert by_id["unknown"].attempts == 1 and by_id["unknown"].started_at == now + timedelta(
        seconds=1
    )
    stats = await backend.count_by_status([])
    assert stats == ({JobStatus.RUNNING: 3}, 1)


async def test_an_applys_outcome_has_every_field_and_its_own_containers() -> None:
    """The record store builds its ``ApplyOutcome`` on a bare instance (no dataclass
    ``__init__``): every field is set, to containers of that call's own, with a
    refill, without one, and when nothing moved."""
    from jobpool_async.backends.base import COMPLETE, ApplyOutcome, Refill

    backend = MemoryBackend()
    await backend.insert([Job(id=f"o{i}", job_type="t") for i in range(3)])
    now = datetime.now(UTC)
    [first] = await backend.claim("w", [], 1, now)
    refill = Refill("w", (), frozenset({first.id}), 0)
    done = await backend.apply([Change(first.id, COMPLETE, result=b"")], now, refill)
    missing = await backend.apply([Change("nope", COMPLETE)], now)
    plain = await backend.apply([Change(done.claimed[0].id, COMPLETE)], now)
    for outcome in (done, missing, plain):
        assert type(outcome) is ApplyOutcome
        fields = [getattr(outcome, f.name) for f in dataclasses.fields(ApplyOutcome)]
        assert [type(v) for v in fields] == [list, dict, list]
    assert [m.job_id for m in done.moved] == ["o0"] and [j.id for j in done.claimed] == ["o1"]
    assert list(missing.errors) == ["nope"] and missing.moved == [] and missing.claimed == []
    assert plain.claimed == [] and plain.errors == {}
    assert len({id(c) for o in (done, missing, plain) for c in (o.moved, o.claimed)}) == 6
