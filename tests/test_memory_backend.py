"""The memory backend: its lazily applied indexes (``_Lazy``) against a plain sorted
set, and what it keeps of the jobs it is given."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jobpool_async import Job, PoolQueue
from jobpool_async.backends.memory import MemoryBackend, _Lazy

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
