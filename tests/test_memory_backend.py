"""The memory backend: its lazily applied indexes (``_Lazy``) against a plain sorted
set, and what it keeps of the jobs it is given."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from jobpool_async import Job, PoolQueue
from jobpool_async.backends.memory import MemoryBackend, _Lazy, _Taken

# (op, value): add a value absent from the index, remove one present, or read it.
_OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "read"]), st.integers(0, 40)))


@given(_OPS)
def test_a_lazy_index_reads_as_its_changes_applied_in_order(ops: list[tuple[str, int]]) -> None:
    lazy: _Lazy[tuple[int]] = _Lazy()
    model: set[tuple[int]] = set()
    for op, value in ops:
        if op == "add" and (value,) not in model:
            lazy.add((value,))
            model.add((value,))
        elif op == "remove" and model:
            present = sorted(model)[value % len(model)]
            lazy.remove(present)
            model.discard(present)
        elif op == "read":
            assert list(lazy.sorted()) == sorted(model)
    assert list(lazy.sorted()) == sorted(model)
    assert list(lazy.sorted()) == sorted(model)  # a second read changes nothing


def test_many_removals_rebuild_the_index_and_few_remove_entry_by_entry() -> None:
    lazy: _Lazy[tuple[int]] = _Lazy()
    for value in range(100):
        lazy.add((value,))
    first = lazy.sorted()
    lazy.remove((5,))
    assert lazy.sorted() is first and list(first) == [(v,) for v in range(100) if v != 5]
    for value in range(10, 90):
        lazy.remove((value,))
    rebuilt = lazy.sorted()
    assert rebuilt is not first
    assert list(rebuilt) == [(v,) for v in range(100) if v != 5 and not 10 <= v < 90]


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
    index: _Taken[tuple[int]] = _Taken()
    index.update([(i,) for i in range(80)])
    assert index.take(3) == [(0,), (1,), (2,)]
    assert index._taken == 3 and len(index._sorted) == 80  # only marked
    for _ in range(2):
        index.take(3)
    assert index._taken == 9  # 9 of 80: more than an eighth, deleted in one go next
    index.take(1)
    assert index._taken == 0 and len(index._sorted) == 70
    index.take(2)
    index.add((5,))  # below the taken ones: they are deleted first
    assert index._taken == 0 and list(index) == [(5,)] + [(i,) for i in range(12, 80)]


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
