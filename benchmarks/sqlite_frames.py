"""What SQLite writes for the schedules benchmark's mixed workload, by b-tree.

``python -m benchmarks.sqlite_frames [--jobs 5000] [--rounds 3] [--before DIR]
[--out benchmarks/results/sqlite-frames]``

Runs the SQLite backend's storage-thread functions directly on a plain ``sqlite3``
connection (no event loop, no thread hops): ``--jobs`` jobs enqueued in batches of
1,000, plain (priority 0, no schedule) or mixed as in :mod:`benchmarks.schedules`
(random priorities -100 … 100, 20% scheduled up to 50 ms in the past), then the
claim cycle of one 10-slot stream: each commit completes 10 jobs and claims the next
10 for the stream (the refill), the first claim promoting the scheduled jobs.

Per commit of the cycle it reports the WAL frames written, by the b-tree each page
belongs to (``dbstat``; the same on every run for a seed, whatever the machine's
load), and the thread's CPU time per job, user and system (the system part is
mostly writing those frames). With ``--before DIR`` the same runs use the code in
``DIR`` too (a checkout of another revision), alternating, each in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BATCH = 1000
SLOTS = 10


def _jobs(n: int, mixed: bool, rng: random.Random, now: datetime) -> list[Any]:
    from jobpool_async import Job
    from jobpool_async.backends.base import check_new_job

    prefix = uuid.uuid4().hex[:6]
    scheduled = set(rng.sample(range(n), n // 5)) if mixed else set()
    jobs = []
    for i in range(n):
        if not mixed:
            job = Job(id=f"{prefix}-{i}", job_type="bench", created_at=now)
        else:
            at = now - timedelta(milliseconds=rng.uniform(0, 50)) if i in scheduled else None
            priority = rng.randint(-100, 100)
            job = Job(
                id=f"{prefix}-{i}", job_type="bench", created_at=now, priority=priority,
                scheduled_at=at,
            )  # fmt: skip
        jobs.append(check_new_job(job))
    return jobs


def _fill_future(conn: sqlite3.Connection, n: int, at: datetime) -> None:
    from jobpool_async import Job
    from jobpool_async.backends import sqlite as sq
    from jobpool_async.backends.base import check_new_job

    for start in range(0, n, 10_000):
        later = [
            check_new_job(Job(id=f"later-{i}", job_type="later", scheduled_at=at))
            for i in range(start, min(n, start + 10_000))
        ]
        sq._transaction(conn, sq._insert, later)


#: Stores of up to this many pages map a commit's pages to b-trees after each commit;
#: larger ones (``--future``) once after the cycle, since ``dbstat`` reads every page
#: (a page freed by then counts as "(free)").
MAP_EACH_COMMIT = 20_000


def _pages(wal: Path, start: int, page: int) -> list[int]:
    """The page numbers of the WAL frames written from offset ``start`` on."""
    with wal.open("rb") as f:
        f.seek(start)
        data = f.read()
    return [struct.unpack(">I", data[k : k + 4])[0] for k in range(0, len(data), page + 24)]


def _owners(conn: sqlite3.Connection, pages: list[int]) -> list[str]:
    """The b-tree each of ``pages`` belongs to now."""
    owner = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
    return [owner.get(p, "(free)") for p in pages]


def run_once(kind: str, n: int, seed: int, future: int = 0) -> dict[str, Any]:
    """One store, one workload: frames per commit by b-tree, CPU µs per job. With
    ``future``, the store first receives that many jobs scheduled a day ahead."""
    from jobpool_async.backends import sqlite as sq
    from jobpool_async.backends.base import COMPLETE, Change, Refill

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="jp-frames-") as tmp:
        path = Path(tmp) / "store.db"
        conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
        sq._open_store(conn, str(path), "NORMAL", 5000)
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        wal = path.with_name(path.name + "-wal")
        now = datetime.now(UTC)
        _fill_future(conn, future, now + timedelta(days=1))
        jobs = _jobs(n, kind == "mixed", rng, now)
        before = resource.getrusage(resource.RUSAGE_THREAD)
        for start in range(0, n, BATCH):
            sq._transaction(conn, sq._insert, jobs[start : start + BATCH])
        after = resource.getrusage(resource.RUSAGE_THREAD)
        insert = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # every frame stays countable
        at = sq._us(now) + 1_000_000
        user = system = 0.0
        before = resource.getrusage(resource.RUSAGE_THREAD)
        rows, _ = sq._claim_promoting(conn, "bench", (), SLOTS, at, True, True)
        owners: Counter[str] = Counter()
        each = conn.execute("PRAGMA page_count").fetchone()[0] <= MAP_EACH_COMMIT
        later: list[int] = []
        commits = done = 0
        while rows:
            ids = [row[0] for row in rows]  # a claim's rows begin with the id
            done += len(ids)
            at += 1000  # each commit its own time, as a running queue's
            changes = [Change(i, COMPLETE, result=b"") for i in ids]
            refill = Refill("bench", (), frozenset(ids))
            offset = wal.stat().st_size
            rows = sq._transaction(conn, sq._apply, changes, at, refill, False)[2]
            after = resource.getrusage(resource.RUSAGE_THREAD)
            user += after.ru_utime - before.ru_utime
            system += after.ru_stime - before.ru_stime
            commits += 1
            pages = _pages(wal, offset, page)  # not timed
            if each:
                owners.update(_owners(conn, pages))
            else:
                later += pages
            before = resource.getrusage(resource.RUSAGE_THREAD)
        owners.update(_owners(conn, later))
        conn.close()
    if done != n:
        raise RuntimeError(f"only {done} of {n} jobs went through")
    return {
        "kind": kind,
        "commits": commits,
        "frames_per_commit": {k: v / commits for k, v in owners.items()},
        "user_us_per_job": user / n * 1e6,
        "sys_us_per_job": system / n * 1e6,
        "insert_us_per_job": insert / n * 1e6,
    }


def _child(tree: Path, kind: str, n: int, seed: int, future: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = (
        "import json, sys; from benchmarks_sqlite_frames import run_once; "
        "print(json.dumps(run_once(sys.argv[1], *map(int, sys.argv[2:]))))"
    )
    here = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        # This module under a name of its own, so the tree's benchmarks package (if
        # any) does not shadow it; the jobpool_async imported is the tree's.
        (Path(tmp) / "benchmarks_sqlite_frames.py").write_text(here.read_text())
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{tmp}"
        out = subprocess.run(
            [sys.executable, "-c", code, kind, str(n), str(seed), str(future)],
            env=env,
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = sorted({k for r in runs for k in r["frames_per_commit"]})
    return {
        "frames_per_commit": {
            k: statistics.median(r["frames_per_commit"].get(k, 0.0) for r in runs) for k in names
        },
        "user_us_per_job": statistics.median(r["user_us_per_job"] for r in runs),
        "sys_us_per_job": statistics.median(r["sys_us_per_job"] for r in runs),
        "insert_us_per_job": statistics.median(r["insert_us_per_job"] for r in runs),
    }


def _markdown(result: dict[str, Any]) -> str:
    sides = list(result["sides"])
    lines = [
        "# SQLite: WAL frames per commit of the claim cycle, by b-tree",
        "",
        f"Run {result['started']} UTC, `{result['command']}`; load average "
        f"{result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end.",
        "",
        f"{result['jobs']:,} jobs enqueued in batches of {BATCH:,}, then one {SLOTS}-slot "
        "stream's claim cycle (each commit completes 10 jobs and claims the next 10), run "
        "on the backend's storage-thread functions with a plain `sqlite3` connection. "
        "Plain: priority 0, no schedule; mixed: random priorities -100 … 100, 20% "
        "scheduled up to 50 ms in the past (as `benchmarks.schedules`). Frames are the same "
        "on every run for a seed; CPU is the thread's time per job over the cycle (median "
        f"of {result['rounds']} rounds, alternating; system time is mostly the WAL writes)."
        + (
            " Plain + future: the plain workload on a store that first received "
            f"{result['future']:,} jobs scheduled a day ahead (a claim must not touch them; "
            f"a store over {MAP_EACH_COMMIT:,} pages has its pages mapped to b-trees once, "
            "after the cycle, so pages that changed hands meanwhile count for their last "
            "owner)."
            if result["future"]
            else ""
        ),
        "",
    ]
    for side in sides:
        lines.append(f"* {side}: {result['sides'][side]['revision']}")
    lines += ["", "| code | workload | b-tree | frames per commit |", "|---|---|---|---:|"]
    for side in sides:
        for kind in result["workloads"]:
            m = result["sides"][side][kind]
            frames = m["frames_per_commit"]
            for name, value in sorted(frames.items(), key=lambda kv: -kv[1]):
                if value >= 0.05:
                    lines.append(f"| {side} | {kind} | {name} | {value:.2f} |")
            lines.append(f"| {side} | {kind} | **all** | **{sum(frames.values()):.2f}** |")
    lines += [
        "",
        "Claim cycle: the thread's CPU time per job over the cycle's commits; enqueue: over "
        "the inserts (user + system).",
        "",
        "| code | workload | cycle user µs/job | cycle system µs/job | cycle / plain "
        "| enqueue µs/job | enqueue / plain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        plain = result["sides"][side]["plain"]
        total = plain["user_us_per_job"] + plain["sys_us_per_job"]
        for kind in result["workloads"]:
            m = result["sides"][side][kind]
            ratio = _ratio(m["user_us_per_job"] + m["sys_us_per_job"], total)
            enqueue = _ratio(m["insert_us_per_job"], plain["insert_us_per_job"])
            lines.append(
                f"| {side} | {kind} | {m['user_us_per_job']:.1f} | {m['sys_us_per_job']:.1f} "
                f"| {ratio} | {m['insert_us_per_job']:.1f} | {enqueue} |"
            )
    return "\n".join(lines) + "\n"


def _ratio(value: float, base: float) -> str:
    """``value / base`` to two places; "-" when the base measured no CPU time at all
    (tiny runs: the thread's clock has a coarse tick)."""
    return f"{value / base:.2f}" if base > 0 else "-"


def _revision(tree: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return str(tree)
    return f"`{out.stdout.strip()[:90]}` ({tree})"


def render(json_path: Path) -> None:
    """Rewrite the Markdown beside a result file from it (after editing this module)."""
    result = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(_markdown(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_frames")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--future", type=int, default=0, help="plain + future: jobs a day ahead")
    parser.add_argument("--before", type=Path, help="a tree of the code to compare with")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sqlite-frames"))
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    trees = {"after": here} if args.before is None else {"before": args.before, "after": here}
    workloads = {"plain": ("plain", 0), "mixed": ("mixed", 0)}
    if args.future:
        workloads["plain + future"] = ("plain", args.future)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {w: [] for w in workloads} for s in trees
    }
    load0 = os.getloadavg()[0]
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for side in order:
            for name in list(workloads) if r % 2 == 0 else list(workloads)[::-1]:
                kind, future = workloads[name]
                one = _child(trees[side], kind, args.jobs, args.seed + r, future)
                runs[side][name].append(one)
                print(side, name, round(sum(one["frames_per_commit"].values()), 2), flush=True)
    result = {
        "started": started,
        "command": "python -m benchmarks.sqlite_frames "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "load": [load0, os.getloadavg()[0]],
        "jobs": args.jobs,
        "rounds": args.rounds,
        "future": args.future,
        "workloads": list(workloads),
        "sides": {
            side: {
                "revision": _revision(trees[side]),
                **{name: _median_runs(runs[side][name]) for name in workloads},
            }
            for side in trees
        },
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
