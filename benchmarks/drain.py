"""The drain workload (issue #20): the pattern users write most, beside its floors and peers.

``python -m benchmarks.drain [--backends memory,sqlite,leveldb,postgres] [--jobs 10000]
[--rounds 3]``

10,000 jobs with 100-byte JSON payloads are enqueued in one ``enqueue_jobs`` call,
then drained by one stream of 10 slots whose loop decodes each payload, awaits a
trivial coroutine, encodes a small JSON result and completes the batch with one
``complete_jobs`` (``hand loop``); and the same jobs by a ``Worker`` with 10 at once
(``Worker``). The clock covers the enqueue and the drain. Beside them, in the same
rounds (the order rotating, after one uncounted warm-up of each):

* the raw floor of the backend (``benchmarks.floors``: raw dict for memory, raw
  sqlite3 with the minimal schema, raw plyvel key moves, raw asyncpg ``FOR UPDATE
  SKIP LOCKED``), claiming and completing 10 per transaction / ``WriteBatch``, with
  the same per-job work;
* the peer the issue names: huey ``SqliteHuey`` (``synchronous=NORMAL``, 10 thread
  workers) for SQLite, pgqueuer (``batch_size=10``, uncapped) for PostgreSQL, each
  in its own process (``benchmarks._peer_child --drain``), every job enqueued
  before its consumer starts.

Before each arm's run (warm-up and rounds) a full garbage collection runs, outside
any clock: an arm leaves its closed queue and jobs to the cyclic collector, and
without it that collection fell on the next arm's clock (the raw dict floor read
12-13 µs per job after our arms instead of 10, flattering our ratios).

Ratios are of medians over the rounds. Writes ``benchmarks/results/drain.md`` and
``drain.json`` (``--out`` to change). PostgreSQL runs with ``--postgres-dsn`` or
``JOBPOOL_BENCH_POSTGRES_DSN``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._common import check_exactly_once, drain_payload, drain_work, machine_info
from ._targets import BACKEND_NAMES, Target, find_targets
from .floors import FLOOR_FOR, make_floor
from .peers import PEERS, run_peer
from .workloads import Outcome, drain_stream, drain_worker

SLOTS = 10
TIME_LIMIT = 600.0
#: The peer of each backend on this workload (issue #20).
PEER_FOR = {"sqlite": "huey-normal", "postgres": "pgqueuer-batch"}

#: One round of an arm: its rate (jobs/s) and its CPU time per job (µs; None if not
#: measured).
Run = Callable[[], Awaitable[tuple[float, float | None]]]


async def _ours(
    target: Target, workdir: Path, body: Callable[..., Awaitable[Outcome]], n: int
) -> tuple[float, float | None]:
    store = target.new_store(workdir)
    try:
        out = await body(store.backend, n, SLOTS, TIME_LIMIT)
    finally:
        await store.backend.close()
        await store.cleanup()
    if out.problem:
        raise RuntimeError(out.problem)
    return out.jobs / out.seconds, out.metrics["cpu_s"] / out.jobs * 1e6


async def _floor(name: str, workdir: Path, dsn: str | None, n: int) -> tuple[float, float | None]:
    floor = make_floor(name, workdir, dsn)
    await floor.open()
    try:
        seconds, claimed, cpu = await floor.drain(n, SLOTS, drain_payload, drain_work)
    finally:
        await floor.close()
    problem = check_exactly_once(sorted(set(claimed)), claimed) if len(claimed) == n else ""
    if len(claimed) != n or problem:
        raise RuntimeError(f"{name}: claimed {len(claimed)} of {n} {problem}")
    return n / seconds, cpu / n * 1e6


async def _peer(peer: str, workdir: Path, dsn: str | None, n: int) -> tuple[float, float | None]:
    result = await run_peer(peer, n, SLOTS, workdir, dsn, None, TIME_LIMIT, drain=True)
    if not result.ok:
        raise RuntimeError(f"{peer}: {result.note}")
    cpu = result.metrics.get("cpu_s")
    return n / result.seconds, None if cpu is None else cpu / n * 1e6


async def measure(
    target: Target, workdir: Path, n: int, rounds: int, dsn: str | None
) -> dict[str, Any]:
    """Rounds of every arm of one backend, the order rotating; medians and ratios."""
    name = target.name
    arms: dict[str, Run] = {
        "hand loop": lambda: _ours(target, workdir, drain_stream, n),
        "Worker": lambda: _ours(target, workdir, drain_worker, n),
        FLOOR_FOR[name]: lambda: _floor(FLOOR_FOR[name], workdir, dsn, n),
    }
    peer = PEER_FOR.get(name)
    notes: dict[str, str] = {}
    if peer is not None:
        arms[PEERS[peer].label] = lambda: _peer(peer, workdir, dsn, n)
    for label, run in list(arms.items()):  # warm-up, not counted; drops what cannot run
        try:
            gc.collect()
            await run()
        except Exception as exc:
            notes[label] = f"{type(exc).__name__}: {exc}"[:200]
            del arms[label]
    rates: dict[str, list[float]] = {label: [] for label in arms}
    cpus: dict[str, list[float]] = {label: [] for label in arms}
    for i in range(rounds):
        order = list(arms)[i % len(arms) :] + list(arms)[: i % len(arms)]
        for label in order:
            gc.collect()  # the last arm's garbage is not this one's cost
            rate, cpu = await arms[label]()
            rates[label].append(rate)
            if cpu is not None:
                cpus[label].append(cpu)
    med = {label: statistics.median(r) for label, r in rates.items()}
    cpu_med = {label: statistics.median(c) for label, c in cpus.items() if c}
    row: dict[str, Any] = {
        "backend": name,
        "jobs": n,
        "rounds": rounds,
        "rates": rates,
        "median": med,
        "cpu_us_per_job": cpus,
        "cpu_median": cpu_med,
        "floor": FLOOR_FOR[name],
        "peer": PEERS[peer].label if peer else None,
        "notes": notes,
    }
    print(f"  {name}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in med.items()), flush=True)
    print(f"  {name} CPU: " + ", ".join(f"{k} {v:,.1f} us/job" for k, v in cpu_med.items()))
    return row


def _ratio(row: dict[str, Any], ours: str, other: str | None) -> str:
    med = row["median"]
    if other is None or other not in med or ours not in med:
        return "-"
    return f"{med[ours] / med[other]:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Drain: enqueue first, then one consumer of 10 slots (issue #20)",
        "",
        f"Run {result['started']} UTC, `{result['command']}` at {result.get('revision', '?')}, "
        f"load before: "
        f"{result['load_before']}, after: {result['load_after']}.",
        "",
        f"{result['jobs']:,} jobs with 100-byte JSON payloads, enqueued in one call, then drained",
        "by one stream of 10 slots (hand loop: decode each payload, await a trivial coroutine,",
        "encode a small JSON result, one `complete_jobs` per batch) or by a `Worker` running",
        "10 at once with the same work. Floors and peers do the same per-job work, in the",
        "same rounds (order rotating, one uncounted warm-up each); medians of the rounds.",
        "The floors store no payload (they decode it from memory) and an empty result, but",
        "raw plyvel, the key-move loop, which stores both (one `WriteBatch` per 10 jobs).",
        "",
        "| backend | hand loop (jobs/s) | Worker (jobs/s) | floor | floor (jobs/s) "
        "| hand loop / floor | Worker / floor | peer | peer (jobs/s) | hand loop / peer "
        "| Worker / peer |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        med = row["median"]
        floor, peer = row["floor"], row["peer"]

        def fig(label: str | None, med: dict[str, float] = med) -> str:
            return f"{med[label]:,.0f}" if label is not None and label in med else "-"

        lines.append(
            f"| {row['backend']} | {fig('hand loop')} | {fig('Worker')} | {floor} | "
            f"{fig(floor)} | {_ratio(row, 'hand loop', floor)} | {_ratio(row, 'Worker', floor)} "
            f"| {peer or '-'} | {fig(peer)} | {_ratio(row, 'hand loop', peer)} | "
            f"{_ratio(row, 'Worker', peer)} |"
        )
    lines += [
        "",
        "CPU time per job (µs): the process CPU time of each arm over the same interval as",
        "its clock (every thread of the process: our storage thread, huey's consumer",
        "workers; a database server's work is not counted, so PostgreSQL's figures are",
        "the client's only). A ratio here is jobs per CPU-second of ours against the",
        "other's: it does not depend on how much of the shared machine each arm got.",
        "",
        "| backend | hand loop | Worker | floor | hand loop / floor | Worker / floor "
        "| peer | hand loop / peer | Worker / peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        cpu = row.get("cpu_median", {})
        floor, peer = row["floor"], row["peer"]

        def us(label: str | None, cpu: dict[str, float] = cpu) -> str:
            return f"{cpu[label]:,.1f}" if label is not None and label in cpu else "-"

        def per_cpu(ours: str, other: str | None, cpu: dict[str, float] = cpu) -> str:
            if other is None or other not in cpu or ours not in cpu:
                return "-"
            return f"{cpu[other] / cpu[ours]:.2f}x"

        lines.append(
            f"| {row['backend']} | {us('hand loop')} | {us('Worker')} | {us(floor)} | "
            f"{per_cpu('hand loop', floor)} | {per_cpu('Worker', floor)} | {us(peer)} | "
            f"{per_cpu('hand loop', peer)} | {per_cpu('Worker', peer)} |"
        )
    notes = [f"{r['backend']}: {k}: {v}" for r in result["rows"] for k, v in r["notes"].items()]
    notes += [f"{k}: unavailable ({v})" for k, v in result["unavailable"].items()]
    if notes:
        lines += ["", "Not run:", "", *[f"* {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _revision() -> str:
    """The checkout's commit (``+changes`` if its tracked files differ from it)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def run_info(module: str, argv: list[str] | None) -> dict[str, Any]:
    """What a result file says of its run: when, the command, the revision, the machine
    and its load before (``finish`` adds the load after and writes the files)."""
    return {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "command": f"python -m {module} " + " ".join(argv or []),
        "revision": _revision(),
        "machine": machine_info(),
        "load_before": _load(),
    }


def finish(result: dict[str, Any], out: Path, markdown: Callable[[dict[str, Any]], str]) -> None:
    """Note the load after the run; write ``out``'s ``.json`` and ``.md``; print the latter."""
    result["load_after"] = _load()
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drain")
    parser.add_argument("--backends", default=",".join(BACKEND_NAMES))
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres-dsn", default=os.environ.get("JOBPOOL_BENCH_POSTGRES_DSN"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "drain"))
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        **run_info("benchmarks.drain", argv),
        "jobs": args.jobs,
        "rows": [],
        "unavailable": {},
    }
    with tempfile.TemporaryDirectory(prefix="jp-drain-") as tmp:
        workdir = Path(tmp)
        for target in find_targets(args.backends.split(","), args.postgres_dsn):
            if not target.available:
                result["unavailable"][target.name] = target.reason
                print(f"  {target.name}: unavailable ({target.reason})")
                continue
            row = await measure(target, workdir, args.jobs, args.rounds, args.postgres_dsn)
            result["rows"].append(row)
    finish(result, Path(args.out), markdown)


if __name__ == "__main__":
    import sys

    asyncio.run(main(sys.argv[1:]))
