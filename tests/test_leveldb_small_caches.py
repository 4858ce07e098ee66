"""LevelDB with its caches nearly full (reviewer, session 12).

The session's LevelDB changes lean on its caches: an enqueue's plain jobs fill the
eligible cache as far as it has room (bc57589), a write of claims and completions
updates only the active cache while it has room (d6e5d8f), a claim hands out the job
its cached record held (820f583). With the caches shrunk to a few entries, every path
around "room" and "full" runs: a random but seeded sequence of calls gives the same
outcomes and records as on the memory backend (the reference, at the same fake
instants), and the store's indexes and counters agree with its records
(``check_store``) after each round.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobpool_async import Job, JobStatus, PoolQueue
from jobpool_async.backends import MemoryBackend
from jobpool_async.testing import FakeClock, next_batch

plyvel = pytest.importorskip("plyvel")

from jobpool_async.backends import LevelDBBackend  # noqa: E402
from jobpool_async.backends import leveldb as leveldb_module  # noqa: E402

from .test_leveldb import check_store  # noqa: E402

S = JobStatus
START = datetime(2030, 1, 1, 0, 0, 0, 3, tzinfo=UTC)


def _new_jobs(rng: random.Random, round_: int, n: int) -> list[Job]:
    out = []
    for i in range(n):
        kind = rng.randrange(4)
        kwargs: dict[str, Any] = {}
        if kind == 1:
            kwargs["tags"] = rng.choice([["x"], ["x", "y"], ["y"]])
        elif kind == 2:
            kwargs["scheduled_at"] = START + timedelta(seconds=rng.choice([-5, 20, 60]))
        elif kind == 3:
            kwargs["priority"] = rng.choice([-3, 4])
            kwargs["max_attempts"] = rng.choice([1, 2])
        out.append(
            Job(id=f"r{round_}-{i}", job_type="t", created_at=START, **kwargs)  # ties: seq
        )
    return out


async def _drive(queue: PoolQueue, clock: FakeClock, seed: int, rounds: int) -> list[Any]:
    """A seeded sequence of calls; returns what each call gave (comparable)."""
    rng = random.Random(seed)
    log: list[Any] = []
    streams = [
        queue.stream_jobs("a", max_assigned_jobs=4),
        queue.stream_jobs("b", tags=["x"], max_assigned_jobs=2),
    ]
    try:
        for round_ in range(rounds):
            clock.advance(timedelta(seconds=7, microseconds=11))
            op = rng.choice(["enqueue", "claim", "claim", "complete", "fail", "cancel", "lost"])
            k = rng.randrange(2)
            stream = streams[k]
            held = sorted(stream.assigned_job_ids)  # (refills included)
            log.append((op, k, held))
            if op == "enqueue":
                jobs = _new_jobs(rng, seed * 1000 + round_, rng.randint(1, 9))
                log.append(await queue.enqueue_jobs(jobs))
            elif op == "claim":
                # refilled jobs it still holds are handed over at once; else it claims
                # if it has a free slot and a matching job is due
                ready = [j for j in stream._ready if j.id in stream._held]
                page = await queue.list_jobs(
                    statuses=[S.INITIAL_PENDING, S.FAILED_RETRY, S.UNKNOWN_RETRY],
                    tags=list(stream.tags) or None,
                    limit=1000,
                )
                now = clock.now()
                due = any(j.scheduled_at is None or j.scheduled_at <= now for j in page.jobs)
                if ready or (len(held) < stream.max_assigned_jobs and due):
                    batch = await next_batch(stream)
                    log.append(sorted(j.id for j in batch))
            elif op in ("complete", "fail"):
                mine = held[: rng.randint(1, 4)]
                if mine:
                    if op == "complete":
                        await queue.complete_jobs({i: i.encode() for i in mine})
                    else:
                        await queue.fail_jobs({i: ("no", timedelta(seconds=3)) for i in mine})
            elif op == "cancel":
                if held:
                    log.append((await queue.cancel_jobs(job_ids=held[:1])).cancelled)
                    await queue.acknowledge_cancellation({held[0]: rng.random() < 0.5})
            else:
                log.append(await queue.mark_worker_unresponsive("ab"[k]))
    finally:
        for stream in streams:
            await stream.aclose()
    page = await queue.list_jobs(limit=1000)
    log.append(("listed", page.jobs))
    log.append(("stats", await queue.get_job_stats(), await queue.get_job_stats(["x"])))
    return log


@pytest.mark.parametrize("sizes", [(3, 2), (1, 1), (6, 50)])
@pytest.mark.parametrize("seed", range(4))
async def test_small_caches_give_the_references_outcomes_and_a_sound_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, int], seed: int
) -> None:
    eligible, active = sizes
    monkeypatch.setattr(leveldb_module, "_MAX_ELIGIBLE", eligible)
    monkeypatch.setattr(leveldb_module, "_MAX_ACTIVE", active)
    path = tmp_path / "store"
    ref_clock, clock = FakeClock(START), FakeClock(START)
    async with PoolQueue(MemoryBackend(), clock=ref_clock, lease=None) as reference:
        for part in range(3):  # the store reopened for each part (its caches empty)
            want = await _drive(reference, ref_clock, seed * 10 + part, 40)
            async with PoolQueue(LevelDBBackend(str(path)), clock=clock, lease=None) as queue:
                got = await _drive(queue, clock, seed * 10 + part, 40)
            assert got == want, part
            stored = check_store(path)
            assert sorted(stored) == sorted(j.id for j in want[-2][1])
