"""Other job queues on the same end-to-end workload, each in its own process.

A peer whose package is not installed (they are benchmark-only dependencies, in
the ``bench`` extra) or whose server is not configured is reported as
unavailable with the reason; one that fails while running is reported failed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PEERS", "PeerResult", "PeerSpec", "run_peer"]

_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True, slots=True)
class PeerSpec:
    label: str
    module: str
    #: "sqlite", "postgres", "redis" or "memory": what it stores in (and which server
    #: it needs).
    storage: str
    #: Our backend whose figure on the same workload it is compared with.
    compare_with: str
    params: dict[str, Any] = field(default_factory=dict)
    #: Jobs it holds in flight per unit of the workload's concurrency; ours is paired
    #: with that many slots per unit, so both hold as many jobs at once.
    in_flight: int = 1


PEERS: dict[str, PeerSpec] = {
    "huey-normal": PeerSpec(
        "huey SqliteHuey (synchronous=NORMAL)",
        "huey",
        "sqlite",
        "sqlite",
        {"synchronous": "NORMAL"},
    ),
    "huey-default": PeerSpec(
        "huey SqliteHuey (default: FULL)", "huey", "sqlite", "sqlite", {"synchronous": "FULL"}
    ),
    "persist-queue": PeerSpec("persist-queue SQLiteAckQueue", "persistqueue", "sqlite", "sqlite"),
    "litequeue": PeerSpec("litequeue", "litequeue", "sqlite", "sqlite"),
    "procrastinate": PeerSpec("procrastinate", "procrastinate", "postgres", "postgres"),
    # pgqueuer's batch_size bounds one fetch, not the jobs in flight: with batch_size=c
    # and no max_concurrent_tasks it held 2c jobs picked at once (measured). Capped at
    # c in flight it needs batch_size <= c/2 (its rule: cap >= 2 x batch).
    "pgqueuer": PeerSpec(
        "pgqueuer (at most c in flight)",
        "pgqueuer",
        "postgres",
        "postgres",
        {"batch_size": "c/2", "max_concurrent_tasks": "c"},
    ),
    "pgqueuer-batch": PeerSpec(
        "pgqueuer (batch_size=c, uncapped: 2c in flight)",
        "pgqueuer",
        "postgres",
        "postgres",
        {"batch_size": "c", "ours_slots": "2c"},
        in_flight=2,
    ),
    "arq": PeerSpec("arq (Redis)", "arq", "redis", "sqlite"),
    # A reference, not a job queue: nothing stored or acknowledged (see _peer_child).
    "asyncio-queue": PeerSpec(
        "asyncio.Queue (reference: in memory, nothing stored)", "asyncio", "memory", "memory"
    ),
    "saq": PeerSpec("saq (Redis)", "saq", "redis", "sqlite"),
}


@dataclass(slots=True)
class PeerResult:
    ok: bool
    seconds: float = 0.0
    note: str = ""
    #: True when it could not run here at all (not installed, no server).
    unavailable: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def availability(peer: str, postgres_dsn: str | None, redis_url: str | None) -> str:
    """``""`` when the peer can run here, else why not."""
    spec = PEERS[peer]
    if importlib.util.find_spec(spec.module) is None:
        return f"{spec.module} is not installed (pip install 'jobpool_async[bench]')"
    if spec.storage == "postgres" and not postgres_dsn:
        return "no PostgreSQL DSN (JOBPOOL_BENCH_POSTGRES_DSN or --postgres-dsn)"
    if spec.storage == "redis" and not redis_url:
        return "no Redis URL (JOBPOOL_BENCH_REDIS_URL or --redis-url)"
    return ""


async def run_peer(
    peer: str,
    n: int,
    concurrency: int,
    workdir: Path,
    postgres_dsn: str | None,
    redis_url: str | None,
    time_limit: float,
    *,
    drain: bool = False,
) -> PeerResult:
    """Run one peer in a child process and read its one-line JSON answer
    (``drain``: on the drain workload of ``benchmarks.drain``)."""
    why = availability(peer, postgres_dsn, redis_url)
    if why:
        return PeerResult(False, note=why, unavailable=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix=f"peer-{peer}-", dir=workdir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks._peer_child",
            peer,
            "--jobs",
            str(n),
            "--concurrency",
            str(concurrency),
            "--workdir",
            tmp,
            "--postgres-dsn",
            postgres_dsn or "",
            "--redis-url",
            redis_url or "",
            "--timeout",
            str(time_limit),
            *(["--drain"] if drain else []),
        ]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=_ROOT
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), time_limit + 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return PeerResult(False, note=f"timed out after {time_limit:.0f} s")
    lines = out.decode(errors="replace").strip().splitlines()
    if not lines:
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        return PeerResult(False, note=f"peer process exited {proc.returncode}: {tail}")
    data = json.loads(lines[-1])
    metrics = {str(k): float(v) for k, v in data.get("metrics", {}).items()}
    return PeerResult(bool(data["ok"]), float(data["seconds"]), str(data["note"]), False, metrics)
