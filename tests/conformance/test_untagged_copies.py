"""A queue's checked copy of a job without tags shares one empty tuple as its ``tags``
(``NO_TAGS``: no list per job for the garbage collector to track) where the backend
takes it (``Backend._takes_no_tags``: memory, which keeps the copies as its records).
On every backend, every job handed out has a list of its own: a claim's, a refill's,
a read's. (Queue lane, session 14.)"""

from __future__ import annotations

from jobpool_async import Job, PoolQueue
from jobpool_async.backends.base import NO_TAGS, check_new_job
from jobpool_async.testing import next_batch


def _tags(job: Job, listed: bool) -> object:
    return check_new_job(job, listed).tags


def test_an_untagged_checked_copy_shares_the_empty_tuple_where_the_backend_takes_it() -> None:
    assert _tags(Job(id="a", job_type="t"), False) is NO_TAGS
    assert _tags(Job(id="a", job_type="t", tags=[]), False) is NO_TAGS
    # (the full checks, for a job the fast path does not take)
    assert _tags(Job(id="c", job_type="tä"), False) is NO_TAGS
    for job in (Job(id="a", job_type="t"), Job(id="c", job_type="tä")):  # listed: a list
        assert _tags(job, True) == [] and type(_tags(job, True)) is list
    tags = ["x", "y"]
    for listed in (False, True):
        copy = _tags(Job(id="b", job_type="t", tags=tags), listed)
        assert copy == ["x", "y"] and type(copy) is list and copy is not tags


def _own_list(job: Job) -> None:
    assert type(job.tags) is list and job.tags == [], job.tags
    job.tags.append("changed by the caller")  # a snapshot's own: nothing stored changes


async def test_an_untagged_jobs_snapshots_have_lists_of_their_own(queue: PoolQueue) -> None:
    await queue.enqueue_jobs([Job(id=f"u{i}", job_type="t") for i in range(4)])
    async with queue.stream_jobs("w", max_assigned_jobs=2) as stream:
        first = await next_batch(stream)
        for job in first:
            _own_list(job)
        await queue.complete_jobs({job.id: b"" for job in first})  # refills the rest
        second = await next_batch(stream)
        for job in second:
            _own_list(job)
        await queue.complete_jobs({job.id: b"" for job in second})
    for job in await queue.get_jobs([f"u{i}" for i in range(4)]):
        _own_list(job)
    for job in await queue.get_jobs([f"u{i}" for i in range(4)]):  # unchanged stored
        assert job.tags == []
