"""Concurrency stress: many streams, enqueuers and cancellers at once, tasks cancelled
at random, on every backend.

Invariants checked while it runs and at the end:

* no job is delivered to a second stream while a consumer still holds it;
* no stream ever holds more than ``max_assigned_jobs`` jobs (its own view, and the
  RUNNING/CANCELLING count per assignee in storage);
* after every stream is closed, every RUNNING/CANCELLING job is one that was handed
  to a consumer that still owns it (nothing stranded inside a stream);
* every job enqueued is still there, completed jobs carry their result.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from jobpool_async import InvalidTransitionError, Job, JobPoolError, JobStatus, JobStream, PoolQueue

from ..backends import BackendFactory
from .conftest import scaled

ACTIVE = {JobStatus.RUNNING, JobStatus.CANCELLING}
ELIGIBLE = {JobStatus.INITIAL_PENDING, JobStatus.FAILED_RETRY, JobStatus.UNKNOWN_RETRY}
SEED_ENV = "JOBPOOL_STRESS_SEED"


@dataclass
class Consumer:
    name: str
    stream: JobStream
    slots: int
    task: asyncio.Task[None] | None = None


@dataclass
class World:
    """What the test knows: who holds which job, and every violation seen."""

    rng: random.Random
    queue: PoolQueue
    ids: list[str] = field(default_factory=list)
    #: job id → (consumer, assigned_at) for jobs handed to a consumer that still owns them.
    owned: dict[str, tuple[str, datetime | None]] = field(default_factory=dict)
    #: jobs whose move was interrupted by a cancellation: their owner may still hold them.
    uncertain: set[str] = field(default_factory=set)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    delivered: int = 0
    next_consumer: int = 0


async def _consume(world: World, me: Consumer) -> None:
    rng, queue = world.rng, world.queue
    async with me.stream as stream:
        async for batch in stream:
            if not batch:
                world.violations.append(f"{me.name}: empty batch")
            held = stream.assigned_job_ids
            if len(held) > me.slots:
                world.violations.append(f"{me.name}: holds {len(held)} > {me.slots} slots")
            for job in batch:
                world.delivered += 1
                if job.status is not JobStatus.RUNNING:
                    world.violations.append(f"{job.id} delivered in status {job.status}")
                other = world.owned.get(job.id)
                if other is not None:
                    world.violations.append(f"{job.id} delivered to {me.name}, held by {other[0]}")
                world.owned[job.id] = (me.name, job.assigned_at)
            for job in batch:
                await asyncio.sleep(rng.random() * 0.002)
                roll = rng.random()
                if roll < 0.03:
                    continue  # abandoned: stays RUNNING, owned by this consumer forever
                world.owned.pop(job.id, None)
                world.uncertain.add(job.id)
                try:
                    await _finish(queue, job, roll)
                except JobPoolError as exc:
                    world.violations.append(f"{me.name}: finishing {job.id}: {exc!r}")
                world.uncertain.discard(job.id)


async def _finish(queue: PoolQueue, job: Job, roll: float) -> None:
    """Complete, fail (bounded retries) or stop a job; acknowledge it if it was cancelled."""
    try:
        if roll < 0.25 and job.retry_count < 2:
            await queue.fail_job(job.id, "transient")
        elif roll < 0.3:
            await queue.stop_job(job.id, "gave up")
        else:
            await queue.complete_job(job.id, b"done:" + job.id.encode())
    except InvalidTransitionError as exc:
        if exc.current is not JobStatus.CANCELLING:
            raise
        await queue.acknowledge_cancellation({job.id: True})


def _start_consumer(world: World) -> Consumer:
    slots = world.rng.randint(1, 4)
    name = f"c{world.next_consumer}"
    world.next_consumer += 1
    tags = world.rng.choice([[], [], ["x"], ["y"]])
    stream = world.queue.stream_jobs(name, tags=tags, max_assigned_jobs=slots)
    me = Consumer(name, stream, slots)
    me.task = asyncio.create_task(_consume(world, me), name=name)
    world.consumers[name] = me
    return me


async def _enqueue(world: World, prefix: str, count: int) -> None:
    rng = world.rng
    made = 0
    while made < count:
        n = min(rng.randint(1, 5), count - made)
        jobs = [
            Job(f"{prefix}-{made + k}", "t", tags=rng.choice([[], ["x"], ["y"], ["x", "y"]]))
            for k in range(n)
        ]
        world.ids.extend(j.id for j in jobs)  # before the call: it may complete any moment
        await world.queue.enqueue_jobs(jobs)
        made += n
        await asyncio.sleep(rng.random() * 0.003)


async def _cancel(world: World, stop: asyncio.Event) -> None:
    rng = world.rng
    while not stop.is_set():
        await asyncio.sleep(rng.random() * 0.01)
        if world.ids:
            picks = rng.sample(world.ids, min(len(world.ids), rng.randint(1, 3)))
            await world.queue.cancel_jobs(job_ids=picks)


async def _chaos(world: World, stop: asyncio.Event) -> None:
    """Cancel a random consumer task now and then, and start a fresh one in its place."""
    rng = world.rng
    while not stop.is_set():
        await asyncio.sleep(rng.random() * 0.02)
        live = [c for c in world.consumers.values() if c.task is not None and not c.task.done()]
        if live:
            victim = rng.choice(live)
            assert victim.task is not None
            victim.task.cancel()
            _start_consumer(world)


async def _monitor(world: World, stop: asyncio.Event) -> None:
    """Storage never shows more active jobs for an assignee than its stream's slots."""
    while not stop.is_set():
        jobs = await world.queue.get_jobs(list(world.ids))
        active = Counter(j.assignee_id for j in jobs if j.status in ACTIVE)
        for name, n in active.items():
            consumer = world.consumers[name]
            abandoned = sum(1 for c, _ in world.owned.values() if c == name)
            # A closed consumer's abandoned jobs stay RUNNING (owned); an open one holds
            # at most its slots, including those abandoned while it still runs.
            limit = consumer.slots if not consumer.stream.closed else abandoned + len(world.uncertain)
            if n > max(limit, consumer.slots if consumer.stream.closed else 0):
                world.violations.append(f"{name}: {n} active jobs in storage > {limit}")
        for consumer in world.consumers.values():
            if len(consumer.stream.assigned_job_ids) > consumer.slots:
                world.violations.append(f"{consumer.name}: stream view exceeds its slots")
        await asyncio.sleep(0.005)


async def _eligible_left(queue: PoolQueue) -> int:
    stats = await queue.get_job_stats()
    return stats.pending_jobs + stats.by_status[JobStatus.FAILED_RETRY] + stats.by_status[
        JobStatus.UNKNOWN_RETRY
    ]


async def test_streams_enqueuers_cancellers_and_chaos(make_backend: BackendFactory) -> None:
    seed = int(os.environ.get(SEED_ENV, "20261129"))
    rng = random.Random(seed)
    queue = PoolQueue(make_backend())
    await queue.open()
    world = World(rng, queue)
    stop = asyncio.Event()
    per_enqueuer = scaled(80, 600)
    try:
        for _ in range(6):
            _start_consumer(world)
        enqueuers = [asyncio.create_task(_enqueue(world, f"e{k}", per_enqueuer)) for k in range(3)]
        helpers = [
            asyncio.create_task(coro)
            for coro in (_cancel(world, stop), _cancel(world, stop), _chaos(world, stop), _monitor(world, stop))
        ]
        await asyncio.gather(*enqueuers)
        stop.set()
        await asyncio.gather(*helpers)
        # A stream that takes everything, so jobs whose tags no live consumer matches finish too.
        world.consumers["final"] = me = Consumer("final", queue.stream_jobs("final", max_assigned_jobs=8), 8)
        me.task = asyncio.create_task(_consume(world, me))
        async with asyncio.timeout(120):
            while await _eligible_left(queue):
                await asyncio.sleep(0.01)
        for consumer in list(world.consumers.values()):
            await consumer.stream.aclose()
        results = await asyncio.gather(
            *(c.task for c in world.consumers.values() if c.task is not None), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        assert errors == [], f"seed {seed}: consumer errors {errors!r}"
        assert world.violations == [], f"seed {seed}: {world.violations[:10]}"

        jobs = await queue.get_jobs(world.ids)
        assert sorted(j.id for j in jobs) == sorted(world.ids), "every enqueued job is present"
        for job in jobs:
            if job.status in ACTIVE:
                owner = world.owned.get(job.id)
                assert job.id in world.uncertain or (
                    owner is not None and owner[1] == job.assigned_at
                ), f"seed {seed}: {job.id} stranded in {job.status} (assigned {job.assigned_at})"
            if job.status is JobStatus.COMPLETED:
                assert job.result == b"done:" + job.id.encode()
            assert job.status not in ELIGIBLE, f"{job.id} left {job.status}"
        assert world.delivered >= len(world.ids)
    finally:
        stop.set()
        await queue.close()
