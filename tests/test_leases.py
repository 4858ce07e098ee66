"""Leases (SPEC §8.4) on every backend: records, renewal, expiry, rescue, forgetting.

A dead worker is modelled by its footprint in storage: a lease record of a holder
that never renews again, and jobs claimed for its assignee (exactly what a
SIGKILLed process leaves; ``tests/reliability/test_lease_kill.py`` kills real
processes). Expiry is driven by a controllable clock on memory, SQLite and
LevelDB; PostgreSQL decides expiry by the server's clock, so there the dead
lease is short and the test waits (with a deadline) until the server says it
has expired. Interleavings are forced with :attr:`Backend.rescue_hook`.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import (
    Job,
    JobStatus,
    Lease,
    MemoryBackend,
    PoolQueue,
    RetryPolicy,
    StorageError,
    Worker,
)
from jobpool_async._leases import LeaseKeeper
from jobpool_async.testing import FakeClock

from .backends import BackendFactory, postgres_dsn

S = JobStatus
DEADLINE = 20.0
#: The lease of the queues under test where a fake clock drives expiry: long, so
#: only the dead worker's (shorter) lease expires when the clock jumps.
LONG = timedelta(hours=1)
DEAD_HOLDER = "deadhost:1:00000000"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def lq(
    make_backend: BackendFactory, clock: FakeClock, backend_name: str
) -> AsyncIterator[PoolQueue]:
    """A queue with leases whose clock the test controls (PostgreSQL: the server's)."""
    queue = PoolQueue(
        make_backend(), lease=LONG if backend_name != "postgres" else 30.0, clock=clock
    )
    await queue.open()
    try:
        yield queue
    finally:
        await queue.close()


def keeper(queue: PoolQueue) -> LeaseKeeper:
    assert queue._leases is not None
    return queue._leases


def dead_lease(backend_name: str) -> timedelta:
    return timedelta(milliseconds=50) if backend_name == "postgres" else timedelta(seconds=10)


async def dead_worker(
    queue: PoolQueue, assignee: str, job_ids: list[str], lease: timedelta, now: datetime
) -> None:
    """What a SIGKILLed worker leaves: its lease record and its jobs RUNNING."""
    tag = f"for:{assignee}"
    await queue.enqueue_jobs([Job(id=i, job_type="t", tags=[tag]) for i in job_ids])
    await queue.backend.renew_leases(DEAD_HOLDER, [assignee], [], lease, now)
    claimed = await queue.backend.claim(assignee, [tag], len(job_ids), datetime.now(UTC))
    assert sorted(j.id for j in claimed) == sorted(job_ids)


async def server_now(queue: PoolQueue) -> datetime:
    pool = queue.backend._pool  # type: ignore[attr-defined]
    value: datetime = await pool.fetchval("SELECT now()")
    return value


async def lease_of(queue: PoolQueue, assignee: str) -> Lease | None:
    return next((w for w in await queue.list_workers() if w.assignee_id == assignee), None)


async def expire(queue: PoolQueue, assignee: str, clock: FakeClock, backend_name: str) -> None:
    """Bring ``now`` to the instant ``assignee``'s lease expires."""
    lease = await lease_of(queue, assignee)
    assert lease is not None
    if backend_name != "postgres":
        clock.set(lease.expires_at)
        return
    async with asyncio.timeout(DEADLINE):
        while await server_now(queue) < lease.expires_at:  # noqa: ASYNC110 - polling with a deadline
            await asyncio.sleep(0.01)


async def statuses(queue: PoolQueue, ids: list[str]) -> dict[str, JobStatus]:
    return {j.id: j.status for j in await queue.get_jobs(ids)}


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not await check():  # noqa: ASYNC110 - polling with a deadline
            await asyncio.sleep(0.01)


# --- the option --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, timedelta(0), timedelta(seconds=-5), 0.001])
def test_lease_must_be_positive(bad: object) -> None:
    with pytest.raises(ValueError, match="lease"):
        PoolQueue(MemoryBackend(), lease=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_lease_must_be_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        PoolQueue(MemoryBackend(), lease=bad)


@pytest.mark.parametrize("bad", ["30", True, [30]])
def test_lease_type(bad: object) -> None:
    with pytest.raises(TypeError, match="lease"):
        PoolQueue(MemoryBackend(), lease=bad)  # type: ignore[arg-type]


def test_lease_default_and_off() -> None:
    assert PoolQueue(MemoryBackend()).lease == timedelta(seconds=30)
    assert PoolQueue(MemoryBackend(), lease=2.5).lease == timedelta(seconds=2.5)
    assert PoolQueue(MemoryBackend(), lease=None).lease is None


# --- records -------------------------------------------------------------------------------


async def test_stream_holds_a_lease_from_its_first_claim(
    lq: PoolQueue, clock: FakeClock, backend_name: str
) -> None:
    await lq.enqueue_job(Job(id="a", job_type="t"))
    assert await lq.list_workers() == []
    async with lq.stream_jobs("w1") as stream:
        batch = await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert [j.id for j in batch] == ["a"]
        [lease] = await lq.list_workers()
    assert lease.assignee_id == "w1"
    assert lease.holders == (keeper(lq).holder,)
    assert re.fullmatch(r".+:\d+:[0-9a-f]{8}", lease.holders[0])
    assert lease.expires_at - lease.renewed_at == lq.lease
    assert lease.first_seen_at == lease.renewed_at
    if backend_name != "postgres":
        assert lease.renewed_at == clock.now()
    for value in (lease.first_seen_at, lease.renewed_at, lease.expires_at):
        assert value.tzinfo is not None and value.utcoffset() == timedelta(0)


async def test_no_job_is_assigned_without_a_lease(lq: PoolQueue) -> None:
    """If the lease record cannot be written, the stream assigns nothing."""
    await lq.enqueue_job(Job(id="a", job_type="t"))
    backend = lq.backend
    real = backend.renew_leases

    async def broken(*args: Any) -> None:
        raise StorageError("disk on fire")

    backend.renew_leases = broken  # type: ignore[method-assign,assignment]
    stream = lq.stream_jobs("w1")
    with pytest.raises(StorageError, match="disk on fire"):
        await asyncio.wait_for(stream.__anext__(), DEADLINE)
    assert (await lq.get_job("a")).status is S.INITIAL_PENDING
    backend.renew_leases = real  # type: ignore[method-assign]
    batch = await asyncio.wait_for(stream.__anext__(), DEADLINE)  # retried: now it works
    assert [j.id for j in batch] == ["a"]
    assert [w.assignee_id for w in await lq.list_workers()] == ["w1"]
    await stream.aclose()


async def test_one_renewal_write_for_many_assignees(lq: PoolQueue) -> None:
    """Streams of 20 assignees: their first claims share one lease write."""
    backend = lq.backend
    calls: list[int] = []
    real = backend.renew_leases

    async def counting(holder: str, renew: Any, release: Any, *rest: Any) -> None:
        calls.append(len(renew))
        await real(holder, renew, release, *rest)

    backend.renew_leases = counting  # type: ignore[method-assign,assignment]
    await lq.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in range(20)])
    streams = [lq.stream_jobs(f"w{i:02}") for i in range(20)]
    batches = await asyncio.wait_for(asyncio.gather(*(s.__anext__() for s in streams)), DEADLINE)
    assert sorted(j.id for b in batches for j in b) == sorted(f"j{i}" for i in range(20))
    assert calls == [20]
    assert [w.assignee_id for w in await lq.list_workers()] == [f"w{i:02}" for i in range(20)]
    for s in streams:
        await s.aclose()


async def test_leases_off_write_nothing(make_backend: BackendFactory) -> None:
    async with PoolQueue(make_backend(), lease=None) as queue:
        await queue.enqueue_job(Job(id="a", job_type="t"))
        async with queue.stream_jobs("w1") as stream:
            assert [j.id for j in await asyncio.wait_for(stream.__anext__(), DEADLINE)] == ["a"]
            assert await queue.list_workers() == []
        assert queue._leases is None


# --- expiry and rescue --------------------------------------------------------------------


async def test_dead_workers_jobs_are_rescued_at_expiry(
    lq: PoolQueue, clock: FakeClock, backend_name: str
) -> None:
    await dead_worker(lq, "dead", ["r", "c"], dead_lease(backend_name), clock.now())
    await lq.cancel_jobs(job_ids=["c"])
    if backend_name != "postgres":  # one microsecond before expiry: alive
        lease = await lease_of(lq, "dead")
        assert lease is not None
        clock.set(lease.expires_at - timedelta(microseconds=1))
        assert await lq.rescue_expired() == 0
        assert await statuses(lq, ["r", "c"]) == {"r": S.RUNNING, "c": S.CANCELLING}
    await expire(lq, "dead", clock, backend_name)
    assert await lq.rescue_expired() == 2
    jobs = {j.id: j for j in await lq.get_jobs(["r", "c"])}
    assert jobs["r"].status is S.UNKNOWN_RETRY
    assert jobs["c"].status is S.UNKNOWN_STOPPED and jobs["c"].finalized_at is not None
    assert jobs["r"].assignee_id == jobs["c"].assignee_id == "dead"
    assert await lq.rescue_expired() == 0  # moved once
    [lease] = await lq.list_workers()  # expired, not yet forgotten
    assert lease.assignee_id == "dead" and lease.holders == (DEAD_HOLDER,)


async def test_a_job_without_attempts_left_is_rescued_to_unknown_stopped(
    make_backend: BackendFactory, clock: FakeClock, backend_name: str
) -> None:
    """SPEC §8.4: RUNNING with attempts >= max_attempts (the job's own, else the
    rescuing queue's RetryPolicy) ends UNKNOWN_STOPPED instead of running again."""
    policy = RetryPolicy(max_attempts=1)
    async with PoolQueue(make_backend(), lease=LONG, clock=clock, retry=policy) as queue:
        jobs = [
            Job(id="own-limit", job_type="t", tags=["for:dead"], max_attempts=1),
            Job(id="policy-limit", job_type="t", tags=["for:dead"]),
            Job(id="has-left", job_type="t", tags=["for:dead"], max_attempts=2),
        ]
        await queue.enqueue_jobs(jobs)
        await queue.backend.renew_leases(
            DEAD_HOLDER, ["dead"], [], dead_lease(backend_name), clock.now()
        )
        claimed = await queue.backend.claim("dead", ["for:dead"], 3, datetime.now(UTC))
        assert {j.attempts for j in claimed} == {1}
        await expire(queue, "dead", clock, backend_name)
        assert await queue.rescue_expired() == 3
        got = {j.id: j for j in await queue.get_jobs(["own-limit", "policy-limit", "has-left"])}
    assert got["own-limit"].status is S.UNKNOWN_STOPPED
    assert got["own-limit"].finalized_at is not None
    assert got["policy-limit"].status is S.UNKNOWN_STOPPED
    assert got["has-left"].status is S.UNKNOWN_RETRY and got["has-left"].finalized_at is None


async def test_rescue_wakes_a_waiting_stream(
    lq: PoolQueue, clock: FakeClock, backend_name: str
) -> None:
    await dead_worker(lq, "dead", ["j"], dead_lease(backend_name), clock.now())
    stream = lq.stream_jobs("alive", tags=["for:dead"])
    waiting = asyncio.ensure_future(stream.__anext__())
    await until(lambda: _true(keeper(lq).holds("alive")), "the stream's lease")
    await asyncio.sleep(0)
    assert not waiting.done()
    await expire(lq, "dead", clock, backend_name)
    assert await lq.rescue_expired() == 1
    batch = await asyncio.wait_for(waiting, DEADLINE)
    assert [(j.id, j.assignee_id, j.status) for j in batch] == [("j", "alive", S.RUNNING)]
    await stream.aclose()


@pytest.mark.parametrize("backend_name", ["postgres"])
async def test_postgres_rescue_wakes_another_process_by_notify(
    make_backend: BackendFactory, clock: FakeClock, backend_name: str
) -> None:
    """The waiting stream polls only every 60 s: it is woken by the rescue's NOTIFY."""
    async with (
        PoolQueue(make_backend(), clock=clock) as rescuer,
        PoolQueue(make_backend(), poll_interval=60) as other,
    ):
        await dead_worker(rescuer, "dead", ["j"], dead_lease("postgres"), clock.now())
        stream = other.stream_jobs("alive", tags=["for:dead"])
        waiting = asyncio.ensure_future(stream.__anext__())
        await until(lambda: _true(keeper(other).holds("alive")), "the stream's lease")
        await expire(rescuer, "dead", clock, "postgres")
        assert await rescuer.rescue_expired() == 1
        batch = await asyncio.wait_for(waiting, DEADLINE)
        assert [(j.id, j.assignee_id) for j in batch] == [("j", "alive")]
        await stream.aclose()


async def _true(value: bool) -> bool:
    return value


async def test_rescue_never_overwrites_a_completion(
    lq: PoolQueue, clock: FakeClock, backend_name: str
) -> None:
    """river#1302: the completion commits between the rescue's read and its write."""
    await dead_worker(lq, "dead", ["done", "lost"], dead_lease(backend_name), clock.now())
    await expire(lq, "dead", clock, backend_name)
    calls = 0

    async def complete_meanwhile() -> None:
        nonlocal calls
        calls += 1
        await lq.complete_job("done", b"result")  # a slow worker's late completion

    lq.backend.rescue_hook = complete_meanwhile
    try:
        assert await lq.rescue_expired() == 1
    finally:
        lq.backend.rescue_hook = None
    assert calls == 1
    jobs = {j.id: j for j in await lq.get_jobs(["done", "lost"])}
    assert jobs["done"].status is S.COMPLETED and jobs["done"].result == b"result"
    assert jobs["lost"].status is S.UNKNOWN_RETRY


async def test_rescue_skips_a_job_assigned_again(
    lq: PoolQueue, clock: FakeClock, backend_name: str
) -> None:
    """Same status, same assignee, new assignment: the compare-and-set sees assigned_at."""
    await dead_worker(lq, "dead", ["again", "lost"], dead_lease(backend_name), clock.now())
    before = await lq.get_job("again")
    await expire(lq, "dead", clock, backend_name)

    async def reassign_meanwhile() -> None:
        await lq.fail_job("again", "boom")
        [job] = await lq.backend.claim("dead", ["for:dead"], 1, datetime.now(UTC))
        assert job.id == "again"

    lq.backend.rescue_hook = reassign_meanwhile
    try:
        assert await lq.rescue_expired() == 1
    finally:
        lq.backend.rescue_hook = None
    again = await lq.get_job("again")
    assert again.status is S.RUNNING and again.assignee_id == "dead"
    assert again.assigned_at != before.assigned_at
    assert (await lq.get_job("lost")).status is S.UNKNOWN_RETRY


async def test_rescue_skips_an_assignee_renewed_meanwhile(
    lq: PoolQueue, clock: FakeClock, backend_name: str
) -> None:
    """A paused worker that renews just after the read keeps its job."""
    lease = dead_lease(backend_name)
    await dead_worker(lq, "slow", ["j"], lease, clock.now())
    await expire(lq, "slow", clock, backend_name)

    async def renew_meanwhile() -> None:
        await lq.backend.renew_leases(DEAD_HOLDER, ["slow"], [], timedelta(minutes=5), clock.now())

    lq.backend.rescue_hook = renew_meanwhile
    try:
        assert await lq.rescue_expired() == 0
    finally:
        lq.backend.rescue_hook = None
    assert (await lq.get_job("j")).status is S.RUNNING


@pytest.mark.parametrize("backend_name", ["memory", "sqlite", "postgres"])
async def test_concurrent_rescues_move_each_job_once(
    make_backend: BackendFactory, clock: FakeClock, backend_name: str
) -> None:
    """Two queues read the same expired jobs before either writes."""
    queues = [PoolQueue(make_backend(), lease=LONG, clock=clock) for _ in range(2)]
    for q in queues:
        await q.open()
    try:
        ids = [f"j{i}" for i in range(50)]
        await dead_worker(queues[0], "dead", ids, dead_lease(backend_name), clock.now())
        await expire(queues[0], "dead", clock, backend_name)
        arrived = 0
        both = asyncio.Event()

        async def barrier() -> None:
            nonlocal arrived
            arrived += 1
            if arrived == 2:
                both.set()
            await asyncio.wait_for(both.wait(), DEADLINE)

        for q in queues:
            q.backend.rescue_hook = barrier
        counts = await asyncio.gather(*(q.rescue_expired() for q in queues))
        assert arrived == 2
        assert sum(counts) == 50
        assert set((await statuses(queues[0], ids)).values()) == {S.UNKNOWN_RETRY}
    finally:
        for q in queues:
            q.backend.rescue_hook = None
        for q in queues:
            await q.close()


async def test_expired_leases_are_forgotten_after_ten_leases(
    make_backend: BackendFactory, clock: FakeClock, backend_name: str
) -> None:
    lease = timedelta(milliseconds=30) if backend_name == "postgres" else timedelta(minutes=1)
    async with PoolQueue(make_backend(), lease=lease, clock=clock) as queue:
        await dead_worker(queue, "dead", ["j"], dead_lease(backend_name), clock.now())
        await queue.backend.renew_leases(
            DEAD_HOLDER, ["idle"], [], dead_lease(backend_name), clock.now()
        )
        await expire(queue, "dead", clock, backend_name)
        assert await queue.rescue_expired() == 1
        assert [w.assignee_id for w in await queue.list_workers()] == ["dead", "idle"]
        if backend_name == "postgres":

            async def forgotten() -> bool:
                await queue.rescue_expired()
                return await queue.list_workers() == []

            await until(forgotten, "forgetting")
            return
        dead = await lease_of(queue, "dead")
        assert dead is not None
        clock.set(dead.expires_at + 10 * lease - timedelta(microseconds=1))
        assert await queue.rescue_expired() == 0
        assert len(await queue.list_workers()) == 2
        clock.set(dead.expires_at + 10 * lease + timedelta(microseconds=1))
        assert await queue.rescue_expired() == 0
        assert await queue.list_workers() == []


async def test_an_expired_assignee_with_jobs_is_not_forgotten(
    lq: PoolQueue, clock: FakeClock, backend_name: str
) -> None:
    """Jobs claimed for it after its rescue (by a queue with leases off) keep it listed."""
    if backend_name == "postgres":
        pytest.skip("needs the clock far past the expiry; the server's clock is not ours")
    await dead_worker(lq, "dead", ["j"], dead_lease(backend_name), clock.now())
    dead = await lease_of(lq, "dead")
    assert dead is not None
    clock.set(dead.expires_at)

    async def claim_meanwhile() -> None:
        await lq.enqueue_job(Job(id="k", job_type="t", tags=["late"]))
        await lq.backend.claim("dead", ["late"], 1, datetime.now(UTC))

    lq.backend.rescue_hook = claim_meanwhile
    clock.set(dead.expires_at + 11 * LONG)
    try:
        assert await lq.rescue_expired() == 1  # "j"; "k" was not read
    finally:
        lq.backend.rescue_hook = None
    assert [w.assignee_id for w in await lq.list_workers()] == ["dead"]
    assert await lq.rescue_expired() == 1  # "k", and then it is forgotten
    assert await lq.list_workers() == []


# --- keeping and releasing ---------------------------------------------------------------


async def test_live_stream_keeps_its_job_three_leases_long(
    make_backend: BackendFactory, backend_name: str
) -> None:
    """A processor running 3 times the lease: renewals keep the job; nobody rescues it.
    (A 1 s lease: at 0.6 s, one renewal late by a lease under a loaded machine's
    scheduling got the job rescued, once in session 12's soak.)"""
    lease = 1.0
    async with PoolQueue(make_backend(), lease=lease) as queue:
        await queue.enqueue_job(Job(id="long", job_type="t"))
        release = asyncio.Event()

        async def processor(job: Job) -> bytes:
            await release.wait()
            return b"ok"

        async with Worker(queue, processor) as worker:
            await until(lambda: _true(bool(worker.running_jobs)), "the job to start")
            assignee = worker.assignee_id
            first = await lease_of(queue, assignee)
            assert first is not None
            while True:
                assert await queue.rescue_expired() == 0
                job = await queue.get_job("long")
                assert (job.status, job.assignee_id) == (S.RUNNING, assignee)
                now = await lease_of(queue, assignee)
                assert now is not None
                if now.renewed_at - first.renewed_at >= timedelta(seconds=3 * lease):
                    break
                await asyncio.sleep(0.05)
            release.set()
            await until(lambda: _status_is(queue, "long", S.COMPLETED), "the job to complete")
        assert (await queue.get_job("long")).result == b"ok"


async def _status_is(queue: PoolQueue, job_id: str, status: JobStatus) -> bool:
    return (await queue.get_job(job_id)).status is status


async def test_lease_kept_until_handed_jobs_finish(
    make_backend: BackendFactory, backend_name: str
) -> None:
    """A closed stream's assignee keeps its lease while a job it handed over runs,
    even if another process finishes that job; then the record goes."""
    async with PoolQueue(make_backend(), lease=0.3) as queue:
        await queue.enqueue_job(Job(id="a", job_type="t"))
        async with queue.stream_jobs("w1") as stream:
            await asyncio.wait_for(stream.__anext__(), DEADLINE)
        k = keeper(queue)
        seen = k.renewals
        await until(lambda: _true(k.renewals >= seen + 2), "two renewals")
        assert [w.assignee_id for w in await queue.list_workers()] == ["w1"]
        if backend_name in ("sqlite", "postgres"):  # finished by another process
            async with PoolQueue(make_backend(), lease=None) as other:
                await other.complete_job("a", b"")
        else:
            await queue.complete_job("a", b"")

        async def released() -> bool:
            return await queue.list_workers() == []

        await until(released, "the lease to be released")


async def test_closed_streams_are_not_kept_beside_an_open_one() -> None:
    """Short-lived streams of an assignee whose long-lived stream stays open are
    forgotten when they close (nothing of theirs still runs): no growth."""
    async with PoolQueue(MemoryBackend()) as queue:
        long_lived = queue.stream_jobs("w", tags=["never"])
        for _ in range(100):
            async with queue.stream_jobs("w", tags=["never-either"]):
                pass
        assert keeper(queue)._streams == {"w": {long_lived}}
        await long_lived.aclose()
        assert keeper(queue)._streams == {"w": set()}


async def test_close_releases_idle_leases_and_leaves_busy_ones(
    make_backend: BackendFactory, backend_name: str
) -> None:
    queue = PoolQueue(make_backend())
    await queue.enqueue_jobs([Job(id="a", job_type="t", tags=["x"])])
    idle = queue.stream_jobs("idle", tags=["nothing"])
    busy = queue.stream_jobs("busy", tags=["x"])
    waiting = asyncio.ensure_future(idle.__anext__())
    await asyncio.wait_for(busy.__anext__(), DEADLINE)  # "a" is handed over, stays RUNNING
    await until(lambda: _true(keeper(queue).holds("idle")), "both leases")
    await queue.close()
    with pytest.raises(StopAsyncIteration):
        await waiting
    async with PoolQueue(make_backend(), lease=None) as after:
        assert [w.assignee_id for w in await after.list_workers()] == ["busy"]
        assert (await after.get_job("a")).status is S.RUNNING


# --- storage ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
async def test_store_without_lease_table_is_upgraded_in_place(
    make_backend: BackendFactory, backend_name: str, tmp_path: Path
) -> None:
    """A store written before leases (no table) gets it on open; its jobs stay."""
    async with PoolQueue(make_backend(), lease=None) as queue:
        await queue.enqueue_jobs([Job(id=f"j{i}", job_type="t") for i in range(3)])
        backend: Any = queue.backend
        if backend_name == "postgres":
            await backend._pool.execute(f"DROP TABLE {backend._s}.leases")
    if backend_name == "sqlite":
        conn = sqlite3.connect(tmp_path / "jobs.db")
        conn.execute("DROP TABLE leases")
        conn.commit()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.close()
        from jobpool_async.backends.sqlite import SCHEMA_VERSION

        assert version == SCHEMA_VERSION  # the table needs no version change
    async with PoolQueue(make_backend()) as queue:
        assert (await queue.get_job_stats()).pending_jobs == 3
        async with queue.stream_jobs("w") as stream:
            await asyncio.wait_for(stream.__anext__(), DEADLINE)
            assert [w.assignee_id for w in await queue.list_workers()] == ["w"]


async def test_long_assignee_ids_and_holders(lq: PoolQueue) -> None:
    """Assignee ids longer than an index entry may be (PostgreSQL: hashed keys)."""
    long_id = "w" * 5000 + "é\u2603"
    await lq.enqueue_job(Job(id="a", job_type="t"))
    async with lq.stream_jobs(long_id) as stream:
        await asyncio.wait_for(stream.__anext__(), DEADLINE)
        assert [w.assignee_id for w in await lq.list_workers()] == [long_id]


# --- the Worker ---------------------------------------------------------------------------


async def test_worker_default_assignee_is_unique() -> None:
    async with PoolQueue(MemoryBackend()) as queue:
        a = Worker(queue, _noop)
        b = Worker(queue, _noop)
        assert re.fullmatch(r".+:\d+:[0-9a-f]{8}", a.assignee_id)
        assert a.assignee_id != b.assignee_id
        await queue.enqueue_job(Job(id="j", job_type="t"))
        async with a:
            await until(lambda: _status_is(queue, "j", S.COMPLETED), "the job")
        assert (await queue.get_job("j")).assignee_id == a.assignee_id


async def _noop(job: Job) -> bytes:
    return b""


# --- PostgreSQL: a killed connection ------------------------------------------------------


async def test_postgres_connection_killed_during_renewal_keeps_the_lease(
    tmp_path: Path,
) -> None:
    """pg_terminate_backend on every connection of the queue just as a renewal starts:
    the pool reconnects within the lease, the lease never lapses, nobody rescues."""
    import asyncpg

    from jobpool_async.backends.postgres import PostgresBackend

    from .backends import drop_postgres_schema, new_schema_name

    dsn = postgres_dsn()
    schema = new_schema_name()
    # Long enough that a loaded machine (load 11 once failed it at 0.9 s) still
    # reconnects within one lease; the claim is "within the lease", not "fast".
    lease = 2.0
    backend = PostgresBackend(dsn, schema=schema)
    rescuer = PoolQueue(PostgresBackend(dsn, schema=schema), lease=lease)
    killer = await asyncpg.connect(dsn)
    try:
        async with PoolQueue(backend, lease=lease) as queue:
            await queue.enqueue_job(Job(id="j", job_type="t"))
            stream = queue.stream_jobs("w")
            await asyncio.wait_for(stream.__anext__(), DEADLINE)
            real = backend.renew_leases
            killed: list[int] = []

            async def kill_then_renew(*args: Any) -> None:
                if not killed:
                    killed.extend(
                        await killer.fetchval(
                            "SELECT array_agg(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = $1",
                            backend.application_name,
                        )
                        or []
                    )
                await real(*args)

            backend.renew_leases = kill_then_renew  # type: ignore[method-assign,assignment]
            before = await lease_of(queue, "w")
            assert before is not None
            await until(lambda: _true(bool(killed)), "the kill")
            assert killed and all(killed)
            end = before.renewed_at + timedelta(seconds=2 * lease)
            async with rescuer:
                rescuer_stream = rescuer.stream_jobs("r", tags=["none"])
                while True:
                    assert await rescuer.rescue_expired() == 0
                    assert (await rescuer.get_job("j")).status is S.RUNNING
                    current = await lease_of(rescuer, "w")
                    assert current is not None and current.expires_at > await server_now(rescuer)
                    if current.renewed_at >= end:
                        break
                    await asyncio.sleep(0.05)
                await rescuer_stream.aclose()
            await stream.aclose()
    finally:
        await killer.close()
        await drop_postgres_schema(schema)
