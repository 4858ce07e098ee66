"""Where the SQLite backend's time goes on the drain workload (issue #20, item 3).

``python -m benchmarks.sqlite_profile [--jobs 10000] [--rounds 3]``

Two parts, both on fresh stores of ``--jobs`` drain jobs (100-byte JSON payloads):

* **The storage thread's own work**, without the event loop: the backend's thread
  functions called directly in this thread, in the order the queue calls them on the
  drain (one ``insert`` of every job, one claim, then one call per batch that
  completes the 10 jobs and claims the next 10 in one transaction). Reported per job:
  the CPU time of the whole cycle (user and system) and of each statement, the
  statements per batch as SQLite's trace reports them (a trigger's program counts as
  one each time it runs), the VM instructions per job of each statement, and the
  WAL frames each commit writes, by table and index (``dbstat``).
* **End to end**: the hand loop and the ``Worker`` of ``benchmarks.drain``, with the
  process CPU time per job split into the storage thread's (aiosqlite's thread, read
  from its CPU clock) and the rest (the event loop), and the cost of one no-op hop to
  the storage thread and back.

Writes ``benchmarks/results/sqlite-profile.md`` and ``.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import resource
import sqlite3
import statistics
import struct
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobpool_async import Job
from jobpool_async.backends import sqlite as sq
from jobpool_async.backends.base import COMPLETE, Change, Refill

from ._common import drain_payload
from .drain import finish, run_info
from .workloads import Outcome, drain_stream, drain_worker

SLOTS = 10
#: A claim's rows begin with the job's id (the backend's select list, checked here).
if not sq.CLAIM_SQL.split(" RETURNING ")[1].startswith("id, "):
    raise RuntimeError("the claim no longer returns the id first")
RESULT = b'{"n": 1, "ok": true}'


class _Rows(list[Any]):
    def fetchall(self) -> list[Any]:
        return self

    def fetchone(self) -> Any:
        return self[0] if self else None


class _Timed:
    """A connection whose ``execute`` (with the fetch after it) is timed per statement
    (this thread's CPU time: a loaded machine inflates wall times, not this)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.ns: collections.Counter[str] = collections.Counter()

    def execute(self, sql: str, params: Any = ()) -> _Rows:
        t0 = time.thread_time_ns()
        rows = _Rows(self.conn.execute(sql, params).fetchall())
        self.ns[_name(sql)] += time.thread_time_ns() - t0
        return rows

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def rollback(self) -> None:
        self.conn.rollback()


def _name(sql: str) -> str:
    if sql.startswith("WITH c("):
        return "completion (UPDATE ... FROM VALUES ... RETURNING)"
    if sql.startswith(sq.CLAIM_SQL.split("?")[0]):  # the trace gives it with values
        return "claim (UPDATE ... RETURNING)"
    return sql.split("(")[0].strip()[:40]


def _open(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    sq._open_store(conn, path, "NORMAL", 5000)
    return conn


def _insert_jobs(conn: Any, n: int) -> None:
    jobs = [
        Job(id=f"j{i:08d}", job_type="bench", job_definition=drain_payload(i)) for i in range(n)
    ]
    sq._transaction(conn, sq._insert, jobs)


def _claim_cycle(conn: Any) -> int:
    """Claim 10, then complete them and claim the next 10 in one transaction until no
    job is left, as the queue does on the drain. Returns the batches."""
    rows = sq._claim(conn, "bench", (), SLOTS, sq._us(datetime.now(UTC)), True)
    batches = 0
    while rows:
        ids = [row[0] for row in rows]
        changes = [Change(i, COMPLETE, result=RESULT) for i in ids]
        refill = Refill("bench", (), frozenset(ids))
        now = sq._us(datetime.now(UTC))
        moved, errors, rows, _ = sq._transaction(conn, sq._apply, changes, now, refill)
        if errors or len(moved) != len(ids):
            raise RuntimeError(f"batch {batches}: {errors}")
        batches += 1
    return batches


def thread_work(workdir: Path, n: int, rounds: int) -> dict[str, Any]:
    user: list[float] = []
    system: list[float] = []
    statement_us: dict[str, list[float]] = collections.defaultdict(list)
    for r in range(rounds):
        path = str(workdir / f"thread-{r}.db")
        conn = _open(path)
        _insert_jobs(conn, n)
        timed = _Timed(conn)
        before = resource.getrusage(resource.RUSAGE_THREAD)
        _claim_cycle(timed)
        after = resource.getrusage(resource.RUSAGE_THREAD)
        user.append((after.ru_utime - before.ru_utime) / n * 1e6)
        system.append((after.ru_stime - before.ru_stime) / n * 1e6)
        for name, ns in timed.ns.items():
            statement_us[name].append(ns / n / 1e3)
        conn.close()
    # statements per batch (trace) and VM instructions per job (progress handler)
    path = str(workdir / "count.db")
    conn = _open(path)
    traced: collections.Counter[str] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    counting = [0]

    def step() -> int:
        counting[0] += 1
        return 0

    class Counted(_Timed):
        def execute(self, sql: str, params: Any = ()) -> _Rows:
            counting[0] = 0
            rows = _Rows(self.conn.execute(sql, params).fetchall())
            steps[_name(sql)] += counting[0]
            return rows

    jobs_n = min(n, 3000)
    _insert_jobs(conn, jobs_n)
    conn.set_trace_callback(lambda s: traced.update([_name(s)]))
    conn.set_progress_handler(step, 1)
    batches = _claim_cycle(Counted(conn))
    conn.set_progress_handler(None, 0)
    conn.set_trace_callback(None)
    conn.close()
    frames = _wal_frames(workdir / "frames.db", jobs_n)
    return {
        "cpu_user_us_per_job": statistics.median(user),
        "cpu_system_us_per_job": statistics.median(system),
        "statement_cpu_us_per_job": {k: statistics.median(v) for k, v in statement_us.items()},
        "statements_per_batch": {k: v / batches for k, v in traced.items()},
        "vm_steps_per_job": {k: v / jobs_n for k, v in steps.items()},
        "wal_frames_per_commit": frames,
    }


def _wal_frames(path: Path, n: int) -> dict[str, float]:
    """WAL frames per commit of the claim cycle, by the b-tree each page belongs to."""
    conn = _open(str(path))
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # keep every frame of the cycle
    _insert_jobs(conn, n)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    batches = _claim_cycle(conn)
    data = Path(f"{path}-wal").read_bytes()
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    owner = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
    conn.close()
    counts: collections.Counter[str] = collections.Counter()
    for off in range(32, len(data) - 24, 24 + size):
        page = struct.unpack(">I", data[off : off + 4])[0]
        counts["page 1 (database header)" if page == 1 else owner.get(page, "other")] += 1
    return {k: v / batches for k, v in counts.most_common()}


class _Clocked(sq.SQLiteBackend):
    """A SQLite backend that reads its connection thread's CPU clock (aiosqlite's
    thread), last just before it closes (the thread ends then)."""

    cpu_at_close = 0.0

    def thread_cpu(self) -> float:
        thread = getattr(self._db, "_thread", None)
        if not isinstance(thread, threading.Thread) or thread.ident is None:
            raise RuntimeError("cannot find the SQLite connection thread")
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))

    async def close(self) -> None:
        if self._db is not None:
            self.cpu_at_close = self.thread_cpu()
        await super().close()


async def end_to_end(workdir: Path, n: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, body in (("hand loop", drain_stream), ("Worker", drain_worker)):
        rates, process, storage = [], [], []
        for r in range(rounds):
            backend = _Clocked(workdir / f"e2e-{label[0]}-{r}.db")
            await backend.open()
            s0 = backend.thread_cpu()
            result: Outcome = await body(backend, n, SLOTS, 600.0)  # closes the backend
            if result.problem:
                raise RuntimeError(result.problem)
            rates.append(n / result.seconds)
            process.append(result.metrics["cpu_s"] / n * 1e6)
            # (the store check after the drain counts here too: one small read)
            storage.append((backend.cpu_at_close - s0) / n * 1e6)
        out[label] = {
            "jobs_per_s": statistics.median(rates),
            "process_cpu_us_per_job": statistics.median(process),
            "storage_thread_cpu_us_per_job": statistics.median(storage),
        }
    plain = sq.SQLiteBackend(workdir / "hop.db")
    await plain.open()
    hops = 2000
    walls, cpus = [], []
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(hops):
            await plain._run(_noop)
        walls.append((time.perf_counter() - w0) / hops * 1e6)
        cpus.append((time.process_time() - c0) / hops * 1e6)
    await plain.close()
    out["no-op hop"] = {
        "wall_us": statistics.median(walls),
        "process_cpu_us": statistics.median(cpus),
    }
    return out


def _noop(conn: sqlite3.Connection) -> None:
    return None


def markdown(result: dict[str, Any]) -> str:
    t, e = result["thread"], result["end_to_end"]
    lines = [
        "# SQLite on the drain workload: where the time goes (issue #20, item 3)",
        "",
        f"Run {result['started']} UTC, `{result['command']}` at {result['revision']}, "
        f"load before: {result['load_before']}, after: {result['load_after']}; "
        f"{result['jobs']:,} jobs, medians of {result['rounds']} rounds.",
        "",
        "## The storage thread's own work (no event loop)",
        "",
        "Per job of the claim cycle (one call per batch of 10: complete them and claim the "
        "next 10, in one transaction):",
        "",
        f"* CPU: {t['cpu_user_us_per_job']:.1f} µs user + "
        f"{t['cpu_system_us_per_job']:.1f} µs system",
        "",
        "| statement | CPU µs per job | VM instructions per job |",
        "|---|---:|---:|",
    ]
    for name, us in sorted(t["statement_cpu_us_per_job"].items(), key=lambda kv: -kv[1]):
        if us >= 0.05:
            lines.append(f"| {name} | {us:.1f} | {t['vm_steps_per_job'].get(name, 0):.0f} |")
    lines += [
        "",
        "Statement runs per batch as SQLite's trace reports them: a statement once, and "
        "once more for each row a trigger's program runs for (`jobs_tag_eligibility` runs "
        "for every row a claim or a completion moves, even when its `WHEN` is false, "
        "untagged jobs: SQLite checks the `WHEN` inside the program):",
        "",
        "| statement | per batch |",
        "|---|---:|",
    ]
    for name, k in sorted(t["statements_per_batch"].items(), key=lambda kv: -kv[1]):
        if k >= 0.05:
            lines.append(f"| {name} | {k:.2f} |")
    lines += [
        "",
        "WAL frames (pages) written per commit, by the table or index the page belongs to:",
        "",
        "| b-tree | frames per commit |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in t["wal_frames_per_commit"].items()]
    lines += [
        f"| total | {sum(t['wal_frames_per_commit'].values()):.2f} |",
        "",
        "## End to end",
        "",
        "| consumer | jobs/s | process CPU µs/job | storage thread | event loop (the rest) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in ("hand loop", "Worker"):
        row = e[label]
        proc, store = row["process_cpu_us_per_job"], row["storage_thread_cpu_us_per_job"]
        lines.append(
            f"| {label} | {row['jobs_per_s']:,.0f} | {proc:.1f} | {store:.1f} "
            f"| {proc - store:.1f} |"
        )
    hop = e["no-op hop"]
    lines += [
        "",
        f"One no-op call to the storage thread and back: {hop['wall_us']:.0f} µs wall, "
        f"{hop['process_cpu_us']:.0f} µs process CPU (one per batch of 10 on this workload).",
    ]
    return "\n".join(lines) + "\n"


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_profile")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sqlite-profile"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        **run_info("benchmarks.sqlite_profile", argv),
        "jobs": args.jobs,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="jp-sqlprof-") as tmp:
        result["thread"] = thread_work(Path(tmp), args.jobs, args.rounds)
        result["end_to_end"] = await end_to_end(Path(tmp), args.jobs, args.rounds)
    finish(result, Path(args.out), markdown)


if __name__ == "__main__":
    import sys

    asyncio.run(main(sys.argv[1:]))
