"""A stream's give-back on a store shared with another process (SPEC §4): the job a
stream never handed over may have been declared lost and claimed again by the other
process before this one hears of it. The give-back (``RELEASE``) is a compare-and-set
on the assignment in the store, so it leaves that job with its new stream: no double
run. Two ``PoolQueue`` objects on one SQLite file stand in for the two processes
(polling every 60 s: the first queue cannot have seen the other's moves).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from jobpool_async import Job, JobStatus, PoolQueue, SQLiteBackend
from jobpool_async.testing import until

from .conformance._helpers import HoldWakes

DEADLINE = 10.0
S = JobStatus


async def test_a_give_back_leaves_a_job_another_process_claimed_again(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with (
        PoolQueue(SQLiteBackend(path), poll_interval=60) as here,
        PoolQueue(SQLiteBackend(path), poll_interval=60) as there,
    ):
        await here.enqueue_jobs([Job(id="y", job_type="t"), Job(id="z", job_type="t")])
        s = here.stream_jobs("s", max_assigned_jobs=1)
        wakes = HoldWakes(here, s)
        (first,) = await asyncio.wait_for(s.__anext__(), DEADLINE)
        assert first.id == "y"
        nxt = asyncio.ensure_future(s.__anext__())
        await until(lambda: s._waiting, "s waits for a slot")
        await here.complete_job("y", b"")  # refills s with z, not handed over yet
        await until(lambda: wakes.wakes == 1, "s woke with z ready")
        assert [j.id for j in s._ready] == ["z"]
        # The other process: s's worker is lost, another stream takes z.
        assert await there.mark_worker_unresponsive("s") == 1
        async with there.stream_jobs("b") as b:
            (again,) = await asyncio.wait_for(b.__anext__(), DEADLINE)
            assert again.id == "z"
            assert here._holder("z", s._ready[0].assigned_at) is s, "here has not seen it"
            closing = asyncio.ensure_future(s.aclose())  # gives z back: must not move it
            await until(lambda: s.closed, "s closes")
            wakes.release()
            await asyncio.wait_for(closing, DEADLINE)
            nxt.cancel()
            z = await there.get_job("z")
            assert (z.status, z.assignee_id, z.assigned_at) == (
                S.RUNNING,
                "b",
                again.assigned_at,
            ), "the give-back moved a job another process had claimed again"
            await there.complete_job("z", b"by b")
