"""LevelDB moves that the performance work changed.

LevelDB formats 5 and 6 read the version 2 job records of formats 3 and 4 until their
jobs move: every kind of move of such a record must give what the same move of the
job's version 3 record gives.

The format 4 fixture (written at 1f3caf7) is opened twice: as it is (its records of
version 2, upgraded in place) and with every record rewritten as version 3. The same
calls, at the same (fake) instants, then go to both stores, which must end the same:
every job, the stats, every listing, and every index key (``check_store``).
"""

from __future__ import annotations

import json
import shutil
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import plyvel

from jobpool_async import Job, JobStatus, PoolQueue
from jobpool_async.backends.leveldb import LevelDBBackend
from jobpool_async.testing import FakeClock

from .test_leveldb import FIXTURES, _all_pages, _dump, check_store
from .test_store_upgrades import _stored_as_written

S = JobStatus
FIXTURE = FIXTURES / "v0.7-1f3caf7" / "leveldb"
#: What the code that wrote the fixture read back from it.
WANT = json.loads((FIXTURES / "v0.7-1f3caf7" / "expected.json").read_text())["leveldb"]


def _records_as_version_3(path: Path) -> None:
    """Rewrite every job record of the (closed, format 5) store at ``path`` as version 3:
    the same fields and body, the header little-endian in the order of version 3 (done
    here with ``struct`` alone, apart from the codec under test)."""
    v2, v3 = struct.Struct(">BBBQQQQQQQQhqqIIIIIII"), struct.Struct("<QQQQQQQQqqIIIIIIIhBB")
    db = plyvel.DB(str(path))
    try:
        with db.write_batch(sync=True) as wb:
            for key, raw in db.iterator(prefix=b"J"):
                assert raw[0] == 2
                _, code, flags, *times, priority, limit, attempts = v2.unpack_from(raw)[:14]
                lengths = v2.unpack_from(raw)[14:]
                head = v3.pack(*times, limit, attempts, *lengths, priority, code, flags)
                wb.put(key, b"\x03" + head + raw[v2.size :])
    finally:
        db.close()


def _versions(path: Path) -> dict[str, int]:
    return {k[1:].decode(): v[0] for k, v in _dump(path).items() if k[:1] == b"J"}


async def _every_move(path: Path) -> tuple[list[Job], list[Job], list[list[str]], object]:
    """Every kind of move, on jobs of every status the fixture holds; returns the jobs
    before and after, the listings and the stats."""
    clock = FakeClock(datetime(2031, 1, 1, tzinfo=UTC))
    async with PoolQueue(LevelDBBackend(path), clock=clock) as q:
        ids = [w["id"] for w in WANT["jobs"]]
        before = await _stored_as_written(q, ids, WANT)  # (read as the old code read it)
        clock.advance(timedelta(seconds=1))
        # A lease rescue (the fixture's RUNNING jobs are worker-b's), then by hand.
        await q.rescue_expired()
        await q.mark_worker_unresponsive("worker-b")
        clock.advance(timedelta(seconds=1))
        # UNKNOWN_RETRY jobs: each lifecycle move.
        await q.complete_jobs({"job-30": b"late"})
        await q.fail_job("job-31", "failed late")
        await q.stop_job("job-35", "stopped late")
        await q.mark_job_unknown_stopped("job-36", "gone")
        await q.discard_job("job-38", "given up")
        clock.advance(timedelta(seconds=1))
        # Cancels from INITIAL_PENDING and FAILED_RETRY; requeues; the escape hatch.
        await q.cancel_jobs(job_ids=["job-04", "job-09", "sched-later"])
        assert await q.requeue_jobs(job_ids=["job-21", "job-23"]) == ["job-21", "job-23"]
        await q.update_job_status("job-24", S.COMPLETED, result=b"x")
        await q.update_job_status("job-28", S.UNKNOWN_STOPPED, error_message="again")
        await q.update_job_status("job-10", S.UNKNOWN_STOPPED, error_message="by hand")
        clock.advance(timedelta(seconds=1))
        assert await q.delete_jobs(job_ids=["job-22", "job-39"]) == 2
        assert await q.cleanup_expired_jobs(timedelta(days=365)) == 6  # the fixture's
        clock.advance(timedelta(seconds=1))
        # Claims of old records, a cancel of a claimed one, completions and failures
        # whose refills claim more old records.
        async with q.stream_jobs("w", max_assigned_jobs=4) as stream:
            first = await stream.__anext__()
            assert len(first) == 4
            await q.cancel_jobs(job_ids=[first[0].id])
            await q.acknowledge_cancellation({first[0].id: True})
            clock.advance(timedelta(seconds=1))
            await q.complete_jobs({first[1].id: b"ok"})
            await q.fail_jobs({first[2].id: "boom", first[3].id: "bang"})
            second = await stream.__anext__()
            assert second
            clock.advance(timedelta(seconds=1))
            await q.complete_jobs({job.id: b"two" for job in second})
            third = await stream.__anext__()
            await q.complete_jobs({job.id: b"three" for job in third[:1]})
        jobs = await q.get_jobs(ids)
        listings = [await _all_pages(q, 7)]
        for status in S:
            listings.append(await _all_pages(q, 5, statuses=[status]))
        stats = await q.get_job_stats()
    return before, jobs, listings, stats


async def test_every_move_of_a_version_2_record_is_that_of_its_version_3_record(
    tmp_path: Path,
) -> None:
    old, new = tmp_path / "old.ldb", tmp_path / "new.ldb"
    shutil.copytree(FIXTURE, old)
    shutil.copytree(FIXTURE, new)
    async with PoolQueue(LevelDBBackend(new)):
        pass  # upgraded to format 6: its records still of version 2
    _records_as_version_3(new)
    assert set(_versions(old).values()) == {2}
    assert set(_versions(new).values()) == {3}

    got_old = await _every_move(old)
    got_new = await _every_move(new)
    assert got_old[0] == got_new[0]  # read alike
    assert got_old[1:] == got_new[1:]  # moved alike
    before, after = got_old[0], {j.id: j for j in got_old[1]}
    statuses = {j.status for j in after.values()}
    assert {S.COMPLETED, S.DISCARDED, S.STOPPED, S.UNKNOWN_STOPPED, S.FAILED_RETRY} <= statuses
    assert S.RUNNING in statuses  # the stream's last batch, handed over, still held
    assert check_store(old) == check_store(new)
    # The jobs that moved were rewritten as version 3; the others kept their records,
    # and so did those whose last move was a claim (format 6: in their ``A`` key), the
    # stream's last batch, whose records are as they were before (of either version).
    moved = {j.id for j in before if j.id in after and after[j.id] != j}
    assert len(moved) > 20
    versions = _versions(old)
    running = {i for i in moved if after[i].status is S.RUNNING}
    assert running and 2 in {versions[i] for i in running}
    assert {i for i, v in versions.items() if v == 3} - running == moved - running
    assert set(versions) == set(after)


def _scheduled_jobs(now: datetime) -> list[Job]:
    """Jobs a stream claims at ``now``: one due now, one overdue with a tag, one plain."""
    return [
        Job(id="due", job_type="t", scheduled_at=now),
        Job(id="past", job_type="t", tags=["a"], scheduled_at=now - timedelta(hours=1)),
        Job(id="plain", job_type="t"),
    ]


async def test_a_scheduled_job_claimed_then_completed_leaves_no_running_index_key(
    tmp_path: Path,
) -> None:
    """The completion of a job that has a ``scheduled_at`` (due, so claimed) removes its
    ``A`` key, whichever path stages it. At fa550ae, ``_stage_completion`` computed the
    keys to remove after setting the job COMPLETED, and a job with a schedule has its
    keys computed again each time: its COMPLETED keys were deleted instead, its ``A``
    key stayed, and the store was refused at the next open as damaged (found by
    ``test_queue_state_machine[leveldb]``: a claim, a completion, a reopen)."""
    path = tmp_path / "s.ldb"
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    now = clock.now()
    jobs = [*_scheduled_jobs(now), Job(id="cancelled", job_type="t", scheduled_at=now)]
    async with PoolQueue(LevelDBBackend(path), clock=clock) as q:
        await q.enqueue_jobs(jobs)
        async with q.stream_jobs("w", max_assigned_jobs=4) as stream:
            batch = await stream.__anext__()
            assert sorted(j.id for j in batch) == sorted(j.id for j in jobs)
            await q.cancel_jobs(job_ids=["cancelled"])  # CANCELLING, then completed
            clock.advance(timedelta(seconds=1))
            await q.complete_jobs({j.id: b"ok" for j in batch})
    stored = check_store(path)  # no A key left over, counters as the records say
    assert {j.status for j in stored.values()} == {S.COMPLETED}
    async with PoolQueue(LevelDBBackend(path), clock=clock) as q:  # opens: not damaged
        assert (await q.get_job_stats()).completed_jobs == 4


async def test_a_completion_works_out_the_keys_it_removes_from_the_job_before_it_moves(
    tmp_path: Path,
) -> None:
    """When a running job's record has no index keys kept (``keys`` is ``None``: the
    fallback of ``_stage_complete``), the completion works them out from the job as it
    was, RUNNING, not as it becomes: for a job with a schedule, computing them after
    the status changed gave its COMPLETED keys, so its ``A`` key stayed and the next
    open refused the store as damaged."""
    path = tmp_path / "s.ldb"
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    now = clock.now()
    jobs = _scheduled_jobs(now)
    backend = LevelDBBackend(path)
    async with PoolQueue(backend, clock=clock) as q:
        await q.enqueue_jobs(jobs)
        async with q.stream_jobs("w", max_assigned_jobs=3) as stream:
            batch = await stream.__anext__()
            assert sorted(j.id for j in batch) == sorted(j.id for j in jobs)
            for record in backend._active.values():
                record.keys = None  # (forget the kept keys: the fallback runs)
            clock.advance(timedelta(seconds=1))
            await q.complete_jobs({j.id: b"ok" for j in batch})
    stored = check_store(path)
    assert {j.status for j in stored.values()} == {S.COMPLETED}
    async with PoolQueue(LevelDBBackend(path), clock=clock) as q:
        assert (await q.get_job_stats()).completed_jobs == 3
