"""What a ``list_jobs`` page costs SQLite, in VM steps, as the store grows.

``python -m benchmarks.sqlite_listing [--sizes 10000,100000] [--before DIR]
[--out benchmarks/results/sqlite-listing]``

The store is filled as :mod:`benchmarks.listing` fills it (90% COMPLETED, 10% waiting,
four types, ten common tags and a rare one), with every job at priority 0 ("plain")
or at a random priority -100 … 100 ("mixed"); then each of that benchmark's queries
asks for a page of 100 and the SQLite VM instructions its statements execute are
counted (a progress handler called on every step). Unlike the time a page takes,
this does not depend on the machine's load; a page served by an index walk costs
the same number at every size. With ``--before DIR`` the same runs use the code in
``DIR`` too (a checkout of another revision), each in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


async def _fill(queue: Any, start: int, stop: int, mixed: bool) -> None:
    """Jobs ``start`` … ``stop - 1`` as benchmarks.listing's (nine in ten COMPLETED), at
    random priorities if ``mixed``; the tenth wait for a schedule far ahead (so no
    claim takes them, whatever their priority; benchmarks.listing's wait behind a
    far-future retry time instead, which a higher priority would overtake)."""
    from jobpool_async import Job

    from .listing import T0

    rng = random.Random(start)
    later = datetime(9999, 1, 1, tzinfo=UTC)
    jobs = [
        Job(
            id=f"j-{i:08d}",
            job_type=f"type{i % 4}",
            tags=[f"t{i % 10}"] + (["rare"] if i % 1000 == 0 else []),
            created_at=T0 + timedelta(milliseconds=i),
            scheduled_at=later if i % 10 == 0 else None,
            priority=rng.randint(-100, 100) if mixed else 0,
        )
        for i in range(start, stop)
    ]
    await queue.enqueue_jobs(jobs)
    while taken := await queue.backend.claim("fill", (), 9_000, datetime.now(UTC)):
        await queue.complete_jobs({j.id: b"" for j in taken})
    stats = await queue.get_job_stats()
    if stats.completed_jobs != stop - (stop + 9) // 10:  # every tenth waits
        raise RuntimeError(f"fill completed {stats.completed_jobs} jobs of {stop}")


async def _steps(queue: Any, query: Any, mid: str | None) -> int:
    """VM steps of one call of ``query``."""
    count = [0]

    def step() -> int:
        count[0] += 1
        return 0

    def on(conn: Any) -> None:
        conn.set_progress_handler(step, 1)

    def off(conn: Any) -> None:
        conn.set_progress_handler(None, 0)

    await queue.backend._run(on)
    try:
        await query(queue, mid)
    finally:
        await queue.backend._run(off)
    return count[0]


async def measure(sizes: list[int], mixed: bool) -> dict[str, dict[str, int]]:
    from jobpool_async import PoolQueue
    from jobpool_async.backends.sqlite import SQLiteBackend

    from .listing import QUERIES

    out: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="jp-listing-") as tmp:
        async with PoolQueue(SQLiteBackend(Path(tmp) / "store.db")) as queue:
            have = 0
            for size in sorted(sizes):
                await _fill(queue, have, size, mixed)
                have = size
                page = await queue.list_jobs(limit=100)
                mid = page.next_after
                for _ in range(min(size // 2, 5_000) // 1000):  # a cursor some way in
                    mid = (await queue.list_jobs(limit=1000, after=mid)).next_after
                out[str(size)] = {name: await _steps(queue, q, mid) for name, q in QUERIES.items()}
    return out


def _side(tree: Path, sizes: list[int]) -> dict[str, Any]:
    """Both workloads measured with the code in ``tree`` (a subprocess)."""
    # ``tree``'s jobpool_async and benchmarks package, this file's code (loaded as
    # benchmarks.sqlite_listing, which the other tree may not have)
    code = (
        "import asyncio, importlib.util, json, sys\n"
        "import benchmarks\n"
        "spec = importlib.util.spec_from_file_location('benchmarks.sqlite_listing', sys.argv[2])\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "sizes = json.loads(sys.argv[1])\n"
        "print(json.dumps({k: asyncio.run(mod.measure(sizes, k == 'mixed')) "
        "for k in ('plain', 'mixed')}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(sizes), str(Path(__file__).resolve())],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    rev = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    result["revision"] = rev.stdout.strip()[:100]
    return result


def markdown(data: dict[str, Any], command: str) -> str:
    sizes = data["sizes"]
    lines = [
        "# SQLite: VM steps of a `list_jobs` page of 100 as the store grows",
        "",
        f"Run {data['started']} UTC, `{command}`. "
        + "; ".join(f"{label}: `{side['revision']}`" for label, side in data["sides"].items())
        + ".",
        "",
        "The store of `benchmarks.listing` (90% COMPLETED, 10% waiting), every job at "
        "priority 0 (plain) or at a random priority -100 … 100 (mixed); the SQLite VM "
        "instructions one page executes (the same on every run, whatever the load). "
        "Ratio: the largest size over the smallest.",
        "",
        "| code | workload | query | " + " | ".join(f"{s:,} jobs" for s in sizes) + " | ratio |",
        "|---|---|---|" + "---:|" * (len(sizes) + 1),
    ]
    for label, side in data["sides"].items():
        for kind in ("plain", "mixed"):
            per = side[kind]
            for query in per[str(sizes[0])]:
                vals = [per[str(s)][query] for s in sizes]
                ratio = vals[-1] / vals[0] if vals[0] else float("nan")
                lines.append(
                    f"| {label} | {kind} | {query} | "
                    + " | ".join(f"{v:,}" for v in vals)
                    + f" | {ratio:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_listing")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--before", type=Path, help="a tree of the code to compare with")
    parser.add_argument("--out", default=str(RESULTS / "sqlite-listing"))
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    here = Path(__file__).resolve().parent.parent
    sides = {}
    if args.before is not None:
        sides["before"] = _side(args.before.resolve(), sizes)
    sides["after"] = _side(here, sizes)
    data = {"started": f"{datetime.now(UTC):%Y-%m-%d %H:%M}", "sizes": sizes, "sides": sides}
    command = "python -m benchmarks.sqlite_listing " + " ".join(argv or sys.argv[1:])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(data, command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
