"""``python -m benchmarks.listing``: the cost of a ``list_jobs`` page as the store grows.

For each backend and store size, the store is filled (not timed) with jobs of four
types, ten common tags (10% each) and one rare tag (0.1%), 90% of them COMPLETED
and 10% waiting; then each query shape (no filter, one filter of each kind, a deep
page) is asked ``--calls`` times for a page of 100 and the median is reported. The
ratio to the smallest size (same query, same run) is the number that matters: an
index-served page costs the same however many jobs are stored.

Default sizes 10,000 and 100,000; ``--full`` adds 1,000,000. Results go to
``benchmarks/results/listing.md`` (and ``.json``).

``--buffers`` (PostgreSQL only) counts instead of timing: the shared buffers each
query's statement reads (``EXPLAIN (ANALYZE, BUFFERS)`` of the statement ``list_jobs``
sent, with its arguments, run twice on one pooled connection and the second counted:
the first also reads the catalogs), after ``VACUUM ANALYZE``. It does not move with the
machine's load, so it shows whether a page's cost grows with the store where the
milliseconds cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jobpool_async import Job, JobPage, JobStatus, PoolQueue
from jobpool_async.backends.base import COMPLETE, Change

from ._targets import BACKEND_NAMES, find_targets

RESULTS = Path(__file__).resolve().parent / "results"
T0 = datetime(2025, 1, 1, tzinfo=UTC)

Query = Callable[[PoolQueue, str | None], Awaitable[JobPage]]

QUERIES: dict[str, Query] = {
    "newest 100": lambda q, _: q.list_jobs(limit=100),
    "deep page (cursor at the middle)": lambda q, mid: q.list_jobs(limit=100, after=mid),
    "status COMPLETED (90%)": lambda q, _: q.list_jobs(statuses=[JobStatus.COMPLETED], limit=100),
    "status INITIAL_PENDING (10%)": lambda q, _: q.list_jobs(
        statuses=[JobStatus.INITIAL_PENDING], limit=100
    ),
    "statuses RUNNING+FAILED_RETRY (none)": lambda q, _: q.list_jobs(
        statuses=[JobStatus.RUNNING, JobStatus.FAILED_RETRY], limit=100
    ),
    "tag t3 (10%)": lambda q, _: q.list_jobs(tags=["t3"], limit=100),
    "tag rare (0.1%)": lambda q, _: q.list_jobs(tags=["rare"], limit=100),
    "job_type type2 (25%)": lambda q, _: q.list_jobs(job_type="type2", limit=100),
}


async def fill(queue: PoolQueue, start: int, stop: int, chunk: int = 10_000) -> None:
    """Add jobs ``start`` … ``stop - 1`` through the backend; nine in ten COMPLETED.

    The waiting tenth carry a far-future ``last_retry_at`` (their selection key), so
    the claims that complete the others never take them.
    """
    backend = queue.backend
    prefix = uuid.uuid4().hex[:6]
    later = datetime(9999, 1, 1, tzinfo=UTC)
    for lo in range(start, stop, chunk):
        hi = min(stop, lo + chunk)
        jobs = [
            Job(
                id=f"{prefix}-{i:08d}",
                job_type=f"type{i % 4}",
                tags=[f"t{i % 10}"] + (["rare"] if i % 1000 == 0 else []),
                created_at=T0 + timedelta(milliseconds=i),
                last_retry_at=later if i % 10 == 0 else None,
            )
            for i in range(lo, hi)
        ]
        await backend.insert(jobs)
        done = {j.id for j in jobs if j.last_retry_at is None}
        claimed = await backend.claim("fill", (), len(done), datetime.now(UTC))
        if {j.id for j in claimed} != done:
            raise RuntimeError("fill claimed other jobs than those it meant to complete")
        outcome = await backend.apply(
            [Change(i, COMPLETE, result=b"") for i in done], datetime.now(UTC)
        )
        if outcome.errors:
            raise RuntimeError(f"fill failed: {list(outcome.errors.items())[:3]}")


class _Capturing:
    """Stands in for a PostgreSQL backend's pool, keeping the last ``fetch``'s
    statement and arguments (what ``list_jobs`` sent)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.last: tuple[str, tuple[Any, ...]] = ("", ())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def fetch(self, statement: str, *args: Any) -> Any:
        self.last = (statement, args)
        return await self.pool.fetch(statement, *args)


async def buffers_read(queue: PoolQueue, query: Query, mid: str | None) -> float:
    """Shared buffers the statement of ``query`` reads (see ``--buffers``)."""
    backend: Any = queue.backend
    pool = backend._pool
    capturing = _Capturing(pool)
    backend._pool = capturing
    try:
        await query(queue, mid)
    finally:
        backend._pool = pool
    statement, args = capturing.last
    async with pool.acquire() as conn:
        explain = await conn.prepare("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement)
        await explain.fetchval(*args)
        plan = json.loads(await explain.fetchval(*args))[0]["Plan"]
    return float(plan["Shared Hit Blocks"] + plan["Shared Read Blocks"])


async def measure(queue: PoolQueue, calls: int, buffers: bool = False) -> dict[str, float]:
    page = await queue.list_jobs(limit=100)
    mid = page.next_after
    total = (await queue.get_job_stats()).total_jobs
    walked = 0
    while mid is not None and walked < min(total // 2, 5_000):  # a cursor some way in
        page = await queue.list_jobs(limit=1000, after=mid)
        walked += len(page.jobs)
        mid = page.next_after
    out: dict[str, float] = {}
    if buffers:
        backend: Any = queue.backend
        await backend._pool.execute(f'VACUUM ANALYZE "{backend.schema}".jobs')
        for name, query in QUERIES.items():
            out[name] = await buffers_read(queue, query, mid)
        return out
    for name, query in QUERIES.items():
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            await query(queue, mid)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1000
    return out


async def run(
    backends: list[str], sizes: list[int], calls: int, workdir: Path, buffers: bool = False
) -> dict[str, Any]:
    await asyncio.to_thread(workdir.mkdir, exist_ok=True)
    results: dict[str, Any] = {}
    # (the benchmarks' variable, as its "unavailable" message says; the tests' too)
    dsn = os.environ.get("JOBPOOL_BENCH_POSTGRES_DSN") or os.environ.get(
        "JOBPOOL_TEST_POSTGRES_DSN"
    )
    for target in find_targets(backends, dsn):
        name = target.name
        if not target.available:
            print(f"{name}: unavailable ({target.reason})", file=sys.stderr)
            continue
        store = target.new_store(workdir)
        try:
            async with PoolQueue(store.backend) as queue:
                have = 0
                per_size: dict[str, dict[str, float]] = {}
                for size in sorted(sizes):
                    t = time.perf_counter()
                    await fill(queue, have, size)
                    have = size
                    print(f"{name}: filled {size:,} in {time.perf_counter() - t:.0f} s", flush=True)
                    per_size[str(size)] = await measure(queue, calls, buffers)
                    print(json.dumps(per_size[str(size)], indent=1), flush=True)
                results[name] = per_size
        finally:
            await store.cleanup()
    return results


def write(results: dict[str, Any], sizes: list[int], path: Path, buffers: bool = False) -> None:
    small = str(min(sizes))
    what = "shared buffers its statement reads" if buffers else "median ms"
    lines = [
        f"# list_jobs: a page of 100 ({what}) as the store grows",
        "",
        f"Written by `python -m benchmarks.listing` at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "Ratio: the same query at the largest size over the smallest (1.0: no growth).",
        "",
    ]
    for backend, per_size in results.items():
        cols = [str(s) for s in sorted(sizes)]
        lines += [f"## {backend}", ""]
        lines.append("| query | " + " | ".join(f"{int(c):,} jobs" for c in cols) + " | ratio |")
        lines.append("|---|" + "---:|" * (len(cols) + 1))
        for q in QUERIES:
            vals = [per_size[c][q] for c in cols]
            ratio = per_size[cols[-1]][q] / per_size[small][q]
            shown = " | ".join(f"{v:.0f}" if buffers else f"{v:.2f}" for v in vals)
            lines.append(f"| {q} | {shown} | {ratio:.2f} |")
        lines.append("")
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.listing", description=__doc__)
    parser.add_argument("--full", action="store_true", help="add 1,000,000 jobs")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--sizes", default="", help="comma-separated store sizes")
    parser.add_argument("--calls", type=int, default=21)
    parser.add_argument(
        "--buffers", action="store_true", help="PostgreSQL: count buffers read, not ms"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "listing.md")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".bench-listing"),
        help="where SQLite stores are made (removed after)",
    )
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in BACKEND_NAMES:
            parser.error(f"unknown backend {b!r}")
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = [10_000, 100_000] + ([1_000_000] if args.full else [])
    if args.buffers and backends != ["postgres"]:
        parser.error("--buffers counts PostgreSQL's buffers: use it with --backends postgres")
    results = asyncio.run(run(backends, sizes, args.calls, args.workdir, args.buffers))
    write(results, sizes, args.out, args.buffers)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
