"""A caller cancelled at every suspension of a storage call, on every backend whose
calls suspend (LevelDB, SQLite, PostgreSQL): the call is wrapped so that the test
sees each future it awaits, in order, and cancels the caller ``hops`` loop callbacks
after the ``k``-th one got its outcome (``hops`` = -1: as soon as the call awaits it,
before any outcome), for every ``k`` the call reaches. Unlike ``test_carry_cancel``
(which taps LevelDB's and SQLite's storage thread) this needs no hook inside the
backend, so PostgreSQL's calls (asyncpg's protocol futures, its pool's) are cut at
every step too, whether the queue carries them (``_eager.carry``) or runs them in a
task of their own.

Whatever the moment, SPEC §4 holds: a write happened once or not at all; a move that
was written is seen (the slot frees, the waiting stream wakes); claimed jobs are
handed over or given back; no slot is leaked; and a job that an enqueue wrote reaches
the stream waiting for it without any other event (pushed waking: memory and LevelDB
never poll, and the queues here poll once an hour).

(Reviewer, session 13.)
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import Backend, Job, JobStatus, PoolQueue
from jobpool_async.testing import DEADLINE, next_batch

from .backends import backend_factory, drop_postgres_schema, new_schema_name
from .test_carry_cancel import _nothing_stranded, _outcome, _slots_fill_again

S = JobStatus
HOPS = [-1, 0, 1, 2, 3]
#: The methods whose calls the hook sees.
WRAPPED = ("insert", "insert_new", "claim", "apply", "apply_selected")
#: No backend call here awaits this many futures; a sweep reaching it is a bug.
MAX_STEPS = 64


class CancelAtStep:
    """Wraps a backend's storage calls; once armed, cancels ``target`` at the ``k``-th
    future (from 0) that the next wrapped call awaits: ``hops`` loop callbacks after
    that future's outcome, or at once when it is awaited (``hops`` = -1). The hook's
    callback is added before the awaiting task's (or ``carry``'s) own, so ``hops`` = 0
    lands between the outcome and the awaiting task's wake-up."""

    def __init__(self, backend: Backend) -> None:
        self._armed: tuple[asyncio.Future[Any], int, int] | None = None
        self.fired = asyncio.Event()
        self.steps = -1  # futures awaited by the armed call, once it ended
        for name in WRAPPED:
            self._wrap(backend, name)

    def arm(self, target: asyncio.Future[Any], k: int, hops: int) -> None:
        self._armed = (target, k, hops)
        self.fired.clear()
        self.steps = -1

    def _wrap(self, backend: Backend, name: str) -> None:
        inner = getattr(backend, name)

        def wrapped(*args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
            armed, self._armed = self._armed, None
            return self._run(inner(*args, **kwargs), armed)

        setattr(backend, name, wrapped)

    async def _run(
        self, coro: Coroutine[Any, Any, Any], armed: tuple[asyncio.Future[Any], int, int] | None
    ) -> Any:
        return await _drive(self, coro, armed)

    @staticmethod
    def _later(loop: asyncio.AbstractEventLoop, n: int, fire: Callable[[], None]) -> None:
        if n > 0:
            loop.call_soon(CancelAtStep._later, loop, n - 1, fire)
        else:
            fire()


@types.coroutine
def _drive(
    hook: CancelAtStep,
    coro: Coroutine[Any, Any, Any],
    armed: tuple[asyncio.Future[Any], int, int] | None,
) -> Generator[Any, Any, Any]:
    """``yield from coro`` by hand, seeing each future it awaits."""
    loop = asyncio.get_running_loop()
    step = 0
    sent: Any = None
    error: BaseException | None = None
    while True:
        try:
            value = coro.throw(error) if error is not None else coro.send(sent)
        except StopIteration as stop:
            if armed is not None:
                hook.steps = step
            return stop.value
        except BaseException:
            if armed is not None:
                hook.steps = step
            raise
        error = None
        if armed is not None and getattr(value, "_asyncio_future_blocking", False):
            target, k, hops = armed
            if step == k:

                def fire(target: asyncio.Future[Any] = target) -> None:
                    target.cancel()
                    hook.fired.set()

                if hops < 0:
                    loop.call_soon(fire)
                else:
                    value.add_done_callback(
                        lambda _, hops=hops, fire=fire: CancelAtStep._later(loop, hops, fire)
                    )
            step += 1
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            sent, error = None, exc


@pytest.fixture(params=["leveldb", "sqlite", "postgres"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Backend]]:
    name = str(request.param)
    if name == "leveldb":
        pytest.importorskip("plyvel")
    schema = new_schema_name() if name == "postgres" else None
    yield backend_factory(name, tmp_path, schema)
    if schema is not None:
        await drop_postgres_schema(schema)


async def _open(store: Callable[[], Backend]) -> tuple[PoolQueue, CancelAtStep]:
    backend = store()
    # No lease, and polls once an hour: every wake-up here is pushed.
    queue = PoolQueue(backend, lease=None, poll_interval=3600)
    await queue.open()
    return queue, CancelAtStep(backend)


def _on_postgres(queue: PoolQueue) -> bool:
    return type(queue.backend).__name__ == "PostgresBackend"


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not check():  # noqa: ASYNC110 - polling with a deadline
            await asyncio.sleep(0)


async def _settled(queue: PoolQueue, ids: list[str]) -> list[Job]:
    """The jobs once none is RUNNING (polled, with a deadline)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            jobs = await queue.get_jobs(ids)
            if S.RUNNING not in {j.status for j in jobs}:
                return jobs
            await asyncio.sleep(0)


async def _status_becomes(queue: PoolQueue, job_id: str, status: JobStatus) -> None:
    async with asyncio.timeout(DEADLINE):
        while (await queue.get_job(job_id)).status is not status:  # noqa: ASYNC110
            await asyncio.sleep(0)


async def _sweep(hook: CancelAtStep, one: Callable[[int], Coroutine[Any, Any, bool]]) -> int:
    """``one(k)`` for k = 0, 1, ... until the armed call awaited at most k futures
    (``one`` returns whether the hook fired); returns how many steps were cut."""
    for k in range(MAX_STEPS):
        if not await one(k):
            assert k > 0, "the call never suspended"
            return k
    raise AssertionError(f"a call awaited {MAX_STEPS} futures or more")


@pytest.mark.parametrize("hops", HOPS)
@pytest.mark.parametrize("if_exists", ["error", "ignore"])
async def test_a_written_enqueue_whose_caller_is_cancelled_wakes_the_waiting_stream(
    store: Callable[[], Backend], hops: int, if_exists: str
) -> None:
    """Found a defect (reviewer, session 13; fixed in ac1766e): the enqueue published
    nothing when its caller was cut after (or while) the write."""
    queue, hook = await _open(store)
    try:

        async def one(k: int) -> bool:
            tag, job_id = f"e{k}", f"e{k}-job"
            stream = queue.stream_jobs(f"w{k}", tags=[tag], max_assigned_jobs=1)
            waiting = asyncio.ensure_future(stream.__anext__())
            await _until(lambda: stream._waiting)
            enqueuing = asyncio.ensure_future(
                queue.enqueue_jobs(
                    [Job(id=job_id, job_type="t", tags=[tag])],
                    if_exists=if_exists,  # type: ignore[arg-type]
                )
            )
            hook.arm(enqueuing, k, hops)
            await _outcome(enqueuing)
            fired = hook.fired.is_set()
            if fired and not enqueuing.cancelled():
                assert enqueuing.result() == [job_id]
            if not await queue.get_jobs([job_id]):
                # not written yet: the stream takes it once it is. (On PostgreSQL
                # asyncpg raises the cancellation at once, while the server may still
                # commit the insert: it may appear later, so "ignore".)
                await queue.enqueue_jobs(
                    [Job(id=job_id, job_type="t", tags=[tag])], if_exists="ignore"
                )
            # written: pushed to the waiting stream, with no other event
            batch = await asyncio.wait_for(waiting, DEADLINE)
            assert [j.id for j in batch] == [job_id]
            assert (await queue.get_job(job_id)).status is S.RUNNING
            await queue.complete_job(job_id, b"")
            await asyncio.wait_for(stream.aclose(), DEADLINE)
            return fired

        await _sweep(hook, one)
    finally:
        await queue.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("hops", HOPS)
async def test_a_bulk_enqueue_cancelled_at_each_step_is_all_or_nothing_and_wakes(
    store: Callable[[], Backend], hops: int
) -> None:
    """A batch of 1,200 new jobs without tags or history (PostgreSQL writes these with a
    binary ``COPY`` and a ``NOTIFY`` in one transaction, session 14): cut at each step,
    it is stored whole or not at all (never a part), and once stored it reaches the
    stream waiting for it with no other event."""
    queue, hook = await _open(store)
    n = 1200
    try:

        async def one(k: int) -> bool:
            ids = [f"b{k}-{hops}-{i}" for i in range(n)]
            stream = queue.stream_jobs(f"w{k}", max_assigned_jobs=3)
            waiting = asyncio.ensure_future(stream.__anext__())
            await _until(lambda: stream._waiting)
            enqueuing = asyncio.ensure_future(
                queue.enqueue_jobs([Job(id=i, job_type="t") for i in ids])
            )
            hook.arm(enqueuing, k, hops)
            await _outcome(enqueuing)
            fired = hook.fired.is_set()
            if fired and not enqueuing.cancelled():
                assert enqueuing.result() == ids
            stored = len(await queue.get_jobs(ids))
            assert stored in (0, n), f"{stored} of {n} jobs stored"
            if not stored:  # (PostgreSQL: the server may still commit it: "ignore")
                await queue.enqueue_jobs(
                    [Job(id=i, job_type="t") for i in ids[:5]], if_exists="ignore"
                )
            batch = await asyncio.wait_for(waiting, DEADLINE)
            assert len(batch) == 3 and {j.id for j in batch} <= set(ids)
            await queue.complete_jobs({j.id: b"" for j in batch})
            await asyncio.wait_for(stream.aclose(), DEADLINE)
            # none left eligible for the next round's stream
            await queue.cancel_jobs(job_ids=ids)
            assert len(await queue.get_jobs(ids)) in (5, n)
            return fired

        await _sweep(hook, one)
    finally:
        await queue.close()


@pytest.mark.parametrize("hops", HOPS)
async def test_a_refilling_completion_cancelled_at_each_step(
    store: Callable[[], Backend], hops: int
) -> None:
    queue, hook = await _open(store)
    try:

        async def one(k: int) -> bool:
            tag = f"r{k}"
            ids = [f"{tag}-{i}" for i in range(4)]
            await queue.enqueue_jobs([Job(id=i, job_type="t", tags=[tag]) for i in ids])
            stream = queue.stream_jobs(f"w{k}", tags=[tag], max_assigned_jobs=2)
            first = await next_batch(stream)
            handed = {j.id for j in first}
            completing = asyncio.ensure_future(queue.complete_jobs({j.id: b"" for j in first}))
            hook.arm(completing, k, hops)
            await _outcome(completing)
            fired = hook.fired.is_set()
            # the completion was written, once, whatever the moment; its slots were
            # freed and refilled: the refilled jobs are the stream's next batch. On
            # LevelDB and SQLite the call ran to its end in the storage thread before
            # any later call; on PostgreSQL a call cut on its way goes on in a task of
            # its own (and commits on its connection), so a read on another pooled
            # connection may come first: there it is seen once that commits.
            if _on_postgres(queue):
                for job_id in handed:
                    await _status_becomes(queue, job_id, S.COMPLETED)
            assert {j.status for j in await queue.get_jobs(sorted(handed))} == {S.COMPLETED}
            nxt = await asyncio.wait_for(next_batch(stream), DEADLINE)
            assert len(nxt) == 2 and not handed & {j.id for j in nxt}, nxt
            handed |= {j.id for j in nxt}
            assert sorted(stream.assigned_job_ids) == sorted(j.id for j in nxt)
            await queue.complete_jobs({j.id: b"" for j in nxt})
            handed |= await _slots_fill_again(queue, stream, tag)
            await asyncio.wait_for(stream.aclose(), DEADLINE)
            _nothing_stranded(await queue.get_jobs(ids), handed)
            stats = await queue.get_job_stats([tag])
            assert (stats.completed_jobs, stats.running_jobs) == (4, 2), stats
            return fired

        await _sweep(hook, one)
    finally:
        await queue.close()


@pytest.mark.parametrize("hops", HOPS)
async def test_a_claim_cancelled_at_each_step(store: Callable[[], Backend], hops: int) -> None:
    queue, hook = await _open(store)
    try:

        async def one(k: int) -> bool:
            tag = f"c{k}"
            ids = [f"{tag}-{i}" for i in range(3)]
            await queue.enqueue_jobs([Job(id=i, job_type="t", tags=[tag]) for i in ids])
            stream = queue.stream_jobs(f"w{k}", tags=[tag], max_assigned_jobs=3)
            waiting = asyncio.ensure_future(stream.__anext__())
            hook.arm(waiting, k, hops)
            batch = await _outcome(waiting)
            fired = hook.fired.is_set()
            handed = {j.id for j in batch} if batch else set()
            completed = set(handed)
            if handed:
                assert handed == set(ids)
                await queue.complete_jobs(dict.fromkeys(ids, b""))
            else:
                # claimed or not: jobs it claimed come back as the stream gives them
                # back (the claim may still be going on in a task of its own)
                jobs = await _settled(queue, ids)
                await _until(lambda: not stream.assigned_job_ids)
                _nothing_stranded(jobs, handed)
                assert len({j.status for j in jobs}) == 1, jobs  # all or nothing
            handed |= await _slots_fill_again(queue, stream, tag)
            await asyncio.wait_for(stream.aclose(), DEADLINE)
            _nothing_stranded(await queue.get_jobs(ids), handed)
            stats = await queue.get_job_stats([tag])
            assert stats.running_jobs == len(handed - completed), stats
            return fired

        await _sweep(hook, one)
    finally:
        await queue.close()


@pytest.mark.parametrize("hops", HOPS)
async def test_a_plain_move_cancelled_at_each_step_frees_the_slot(
    store: Callable[[], Backend], hops: int
) -> None:
    """Another task's moves (a cancel, its acknowledgement, a fail) are cut at each
    step: each written move is seen, so the waiting stream takes the next job."""
    queue, hook = await _open(store)
    try:

        async def one(k: int) -> bool:
            tag = f"p{k}"
            ids = [f"{tag}-{i}" for i in range(3)]
            await queue.enqueue_jobs([Job(id=i, job_type="t", tags=[tag]) for i in ids])
            stream = queue.stream_jobs(f"w{k}", tags=[tag], max_assigned_jobs=1)
            (first,) = await next_batch(stream)
            stream._refills = False  # (not the consumer: plain observed applies)
            waiting = asyncio.ensure_future(stream.__anext__())
            await _until(lambda: stream._waiting)
            fired = False
            for call, after in (
                (lambda: queue.cancel_jobs(job_ids=[first.id]), S.CANCELLING),
                (lambda: queue.acknowledge_cancellation({first.id: True}), S.STOPPED),
            ):
                task = asyncio.ensure_future(call())
                hook.arm(task, k, hops)
                await _outcome(task)
                fired |= hook.fired.is_set()
                # a started move goes on (in a task of its own) if its caller is cut
                await _status_becomes(queue, first.id, after)
            (second,) = await asyncio.wait_for(waiting, DEADLINE)
            assert second.id == ids[1]
            # a fail (a retry: it wakes streams too) cut likewise
            failing = asyncio.ensure_future(queue.fail_job(second.id, "boom"))
            hook.arm(failing, k, hops)
            await _outcome(failing)
            fired |= hook.fired.is_set()
            await _status_becomes(queue, second.id, S.FAILED_RETRY)
            (third,) = await asyncio.wait_for(next_batch(stream), DEADLINE)
            assert third.id in (ids[1], ids[2])
            await asyncio.wait_for(stream.aclose(), DEADLINE)
            return fired

        await _sweep(hook, one)
    finally:
        await queue.close()
