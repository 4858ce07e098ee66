"""What leases cost (SPEC §8.4): leases on (the default) against off, in the same run.

``python -m benchmarks.leases [--backends memory,sqlite,leveldb,postgres] [--pairs 9]``

* **Throughput.** The end-to-end workload (one stream, and the ``Worker``) and the
  fan-out workload (many streams, one assignee each), run in rounds: leases on,
  off, and off again (an A/A control), on a fresh store each, the order rotating,
  after one uncounted warm-up run. The ratio is the median rate on / the median
  rate off; the control's off/off ratio shows the noise of the machine.
  A renewal costs one statement per queue every ``lease / 3`` whatever the number
  of streams, and claims and completions never wait for it, so the ratio should
  be 1 within noise (target: ≥ 0.97).
* **Renewal.** One ``renew_leases`` call for 1 and for 100 assignees (one
  statement, or one short transaction, either way).
* **Rescue.** 10,000 ``RUNNING`` jobs of one dead assignee, moved back by one
  ``rescue_expired()`` (one transaction); target < 1 s on SQLite and PostgreSQL.

Writes ``benchmarks/results/leases.md`` and ``leases.json`` (``--out`` to change).
PostgreSQL runs with ``--postgres-dsn`` or ``JOBPOOL_BENCH_POSTGRES_DSN``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jobpool_async import Job, PoolQueue

from ._targets import BACKEND_NAMES, Store, Target, find_targets
from .workloads import Outcome, end_to_end_stream, end_to_end_worker, fan_out

ON = timedelta(seconds=30)
RESCUE_JOBS = 10_000

Workload = Callable[[Store, timedelta | None], Awaitable[Outcome]]


def _workloads(jobs: int) -> dict[str, Workload]:
    return {
        "e2e stream (10 slots)": lambda st, lease: end_to_end_stream(
            st.backend, jobs, 10, 1000, 300, lease=lease
        ),
        "e2e Worker (10 slots)": lambda st, lease: end_to_end_worker(
            st.backend, jobs, 10, 1000, 300, lease=lease
        ),
        "fan-out (50 streams)": lambda st, lease: fan_out(
            st.backend, jobs, 50, 4, 10, 1000, 300, lease=lease
        ),
    }


async def _rate(
    target: Target, workdir: Path, body: Workload, lease: timedelta | None
) -> tuple[float, float]:
    """Jobs per second (wall clock) and this process's CPU seconds per 1,000 jobs
    (every thread: SQLite's and LevelDB's work too; PostgreSQL's server work is not)."""
    store = target.new_store(workdir)
    cpu = time.process_time()
    try:
        out = await body(store, lease)
        cpu = time.process_time() - cpu
    finally:
        await store.backend.close()
        await store.cleanup()
    if out.problem:
        raise RuntimeError(out.problem)
    return out.jobs / out.seconds, cpu / out.jobs * 1000


async def throughput(target: Target, workdir: Path, jobs: int, pairs: int) -> list[dict[str, Any]]:
    """Rounds of three runs: leases on, off, and off again (an A/A control: the
    off/off ratio shows what this machine's noise alone does to a ratio), the
    order rotating each round."""
    rows = []
    for name, body in _workloads(jobs).items():
        arms: dict[str, list[tuple[float, float]]] = {"on": [], "off": [], "off2": []}
        leases = {"on": ON, "off": None, "off2": None}
        await _rate(target, workdir, body, ON)  # warm-up (imports, caches), not counted
        for i in range(pairs):
            order = list(arms)[i % 3 :] + list(arms)[: i % 3]
            for arm in order:
                arms[arm].append(await _rate(target, workdir, body, leases[arm]))
        rate = {a: statistics.median(r for r, _ in runs) for a, runs in arms.items()}
        cpu = {a: statistics.median(c for _, c in runs) for a, runs in arms.items()}
        row = {
            "backend": target.name,
            "workload": name,
            "jobs": jobs,
            "pairs": pairs,
            "on_jobs_per_s": rate["on"],
            "off_jobs_per_s": rate["off"],
            "ratio": rate["on"] / rate["off"],
            "control_ratio": rate["off2"] / rate["off"],
            "on_cpu_ms_per_1000": cpu["on"] * 1000,
            "off_cpu_ms_per_1000": cpu["off"] * 1000,
            "cpu_ratio": cpu["on"] / cpu["off"],
            "control_cpu_ratio": cpu["off2"] / cpu["off"],
        }
        rows.append(row)
        print(
            f"  {target.name:<9} {name:<24} rate on/off = {row['ratio']:.3f} "
            f"(off/off {row['control_ratio']:.3f}), CPU per job on/off = "
            f"{row['cpu_ratio']:.3f} (off/off {row['control_cpu_ratio']:.3f})",
            flush=True,
        )
    return rows


async def renewal_and_rescue(target: Target, workdir: Path) -> dict[str, Any]:
    store = target.new_store(workdir)
    backend = store.backend
    try:
        async with PoolQueue(backend, lease=ON) as queue:
            now = datetime.now(UTC)
            renew: dict[str, float] = {}
            for n in (1, 100):
                names = [f"w{i:03}" for i in range(n)]
                await backend.renew_leases("bench:1:0", names, [], ON, now)  # create
                t0 = time.perf_counter()
                for _ in range(20):
                    await backend.renew_leases("bench:1:0", names, [], ON, datetime.now(UTC))
                renew[f"renew_{n}_ms"] = (time.perf_counter() - t0) / 20 * 1000
            await backend.renew_leases("bench:1:0", [], [f"w{i:03}" for i in range(100)], ON, now)
            jobs = [Job(id=f"r{i:06}", job_type="t", tags=["dead"]) for i in range(RESCUE_JOBS)]
            for k in range(0, RESCUE_JOBS, 1000):
                await queue.enqueue_jobs(jobs[k : k + 1000])
            short = timedelta(milliseconds=50)
            await backend.renew_leases("dead:1:0", ["dead"], [], short, datetime.now(UTC))
            claimed = await backend.claim("dead", ["dead"], RESCUE_JOBS, datetime.now(UTC))
            assert len(claimed) == RESCUE_JOBS
            await asyncio.sleep(0.2)  # the dead lease expires (server clock on PostgreSQL)
            t0 = time.perf_counter()
            moved = await queue.rescue_expired()
            seconds = time.perf_counter() - t0
            if moved != RESCUE_JOBS:
                raise RuntimeError(f"rescued {moved} of {RESCUE_JOBS}")
            stats = await queue.get_job_stats()
            assert stats.failed_jobs == RESCUE_JOBS, stats
        row = {"backend": target.name, "rescue_jobs": RESCUE_JOBS, "rescue_s": seconds, **renew}
        print(
            f"  {target.name:<9} rescue of {RESCUE_JOBS:,} jobs: {seconds:.3f} s; renewal "
            f"{renew['renew_1_ms']:.2f} ms (1 assignee), {renew['renew_100_ms']:.2f} ms (100)",
            flush=True,
        )
        return row
    finally:
        await store.cleanup()


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Leases: on (default, 30 s) against off, same run",
        "",
        f"Run {result['started']} UTC, `{result['command']}`. Ratio = median rate with",
        "leases on / median rate with leases off, over rounds on fresh stores",
        "(after one uncounted warm-up run). Single runs on this shared 2-core machine vary",
        "by ±30%; the medians of many rounds are what the ratio compares.",
        "A renewal costs one statement per queue (one short transaction on SQLite, one",
        "write batch on LevelDB) every lease / 3, whatever the number of streams;",
        "claims and completions never wait for it.",
        "",
        "The CPU column is this process's CPU time per job (all its threads; not the",
        "PostgreSQL server's), on/off: steadier than wall-clock rates on a shared machine.",
        "",
        "Each round runs leases on, off, and off again; the off/off columns are an A/A",
        "control (the same code twice): how far noise alone moves a ratio here.",
        "",
        "| backend | workload | jobs | rounds | on (jobs/s) | off (jobs/s) | rate on/off "
        "| rate off/off | CPU/job on/off | CPU/job off/off |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["throughput"]:
        lines.append(
            f"| {r['backend']} | {r['workload']} | {r['jobs']:,} | {r['pairs']} | "
            f"{r['on_jobs_per_s']:,.0f} | {r['off_jobs_per_s']:,.0f} | {r['ratio']:.3f} | "
            f"{r['control_ratio']:.3f} | {r['cpu_ratio']:.3f} | {r['control_cpu_ratio']:.3f} |"
        )
    lines += [
        "",
        f"| backend | rescue of {RESCUE_JOBS:,} jobs (one transaction) | renewal, 1 assignee | "
        "renewal, 100 assignees |",
        "|---|---:|---:|---:|",
    ]
    for r in result["rescue"]:
        lines.append(
            f"| {r['backend']} | {r['rescue_s'] * 1000:,.0f} ms | {r['renew_1_ms']:.2f} ms | "
            f"{r['renew_100_ms']:.2f} ms |"
        )
    return "\n".join(lines) + "\n"


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.leases")
    parser.add_argument("--backends", default=",".join(BACKEND_NAMES))
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=9, help="rounds")
    parser.add_argument("--postgres-dsn", default=os.environ.get("JOBPOOL_BENCH_POSTGRES_DSN"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "leases"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": "python -m benchmarks.leases " + " ".join(argv or []),
        "throughput": [],
        "rescue": [],
        "unavailable": {},
    }
    with tempfile.TemporaryDirectory(prefix="jp-leases-") as tmp:
        workdir = Path(tmp)
        for target in find_targets(args.backends.split(","), args.postgres_dsn):
            if not target.available:
                result["unavailable"][target.name] = target.reason
                print(f"  {target.name}: unavailable ({target.reason})")
                continue
            result["throughput"] += await throughput(target, workdir, args.jobs, args.pairs)
            result["rescue"].append(await renewal_and_rescue(target, workdir))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    import sys

    asyncio.run(main(sys.argv[1:]))
