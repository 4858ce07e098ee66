"""Shared pieces of the benchmark harness: sizes, result rows, timing helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

__all__ = [
    "Row",
    "Sizes",
    "check_exactly_once",
    "drain_payload",
    "drain_work",
    "machine_info",
    "percentile",
    "rate",
]


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each workload is. ``default()`` is the documented run; ``quick()`` is for CI."""

    label: str
    bulk_jobs: int
    bulk_batch: int
    e2e_jobs: int
    e2e_slots: tuple[int, ...]
    e2e_rounds: int
    enqueue_batch: int
    fanout_jobs: int
    fanout_streams: int
    fanout_slots: int
    fanout_tags: int
    wake_samples: int
    scale_levels: tuple[int, ...]
    scale_jobs: int
    scale_rounds: int
    scale_slots: int
    stats_calls: int
    memory_jobs: int
    memory_batch: int
    peer_jobs: int
    peer_concurrency: int
    #: Each peer runs this many times, each run right after one of ours on the same
    #: storage; its ratio is the median of those pairs (drift cancels out).
    peer_rounds: int
    timeout: float

    @classmethod
    def default(cls) -> Sizes:
        return cls(
            label="default",
            bulk_jobs=100_000,
            bulk_batch=1_000,
            e2e_jobs=20_000,
            e2e_slots=(10, 100),
            e2e_rounds=3,
            enqueue_batch=1_000,
            fanout_jobs=20_000,
            fanout_streams=50,
            fanout_slots=4,
            fanout_tags=10,
            wake_samples=1_000,
            scale_levels=(0, 100_000),
            scale_jobs=5_000,
            scale_rounds=3,
            scale_slots=100,
            stats_calls=10,
            memory_jobs=200_000,
            memory_batch=10_000,
            peer_jobs=10_000,
            peer_concurrency=10,
            peer_rounds=3,
            timeout=600.0,
        )

    @classmethod
    def full(cls) -> Sizes:
        """The sizes the issue names: 1,000,000 completed jobs for scale and memory."""
        return dataclasses.replace(
            cls.default(),
            label="full",
            scale_levels=(0, 100_000, 1_000_000),
            memory_jobs=1_000_000,
            timeout=1800.0,
        )

    @classmethod
    def quick(cls) -> Sizes:
        """Tiny sizes: checks that every workload runs and is correct, not how fast."""
        return cls(
            label="quick",
            bulk_jobs=400,
            bulk_batch=100,
            e2e_jobs=300,
            e2e_slots=(10, 100),
            e2e_rounds=1,
            enqueue_batch=100,
            fanout_jobs=300,
            fanout_streams=10,
            fanout_slots=4,
            fanout_tags=5,
            wake_samples=20,
            scale_levels=(0, 500),
            scale_jobs=200,
            scale_rounds=2,
            scale_slots=20,
            stats_calls=3,
            memory_jobs=2_000,
            memory_batch=500,
            peer_jobs=100,
            peer_concurrency=10,
            peer_rounds=1,
            timeout=60.0,
        )


@dataclass(slots=True)
class Row:
    """One measured figure, with the baseline it is compared to.

    ``kind`` is ``"ours"``, ``"floor"`` (raw storage doing the minimal work) or
    ``"peer"`` (another job queue). ``ratio`` is ours/floor (fraction of the floor's
    speed) for our rows, and ours/peer (times faster) for peer rows; ``None`` where
    no baseline applies. ``ok`` is false when the run failed or its correctness
    check did not hold; ``note`` says why.
    """

    workload: str
    system: str
    kind: str
    backend: str
    params: dict[str, Any]
    jobs: int = 0
    seconds: float = 0.0
    jobs_per_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    baseline: str | None = None
    ratio: float | None = None
    ok: bool = True
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rate(jobs: int, seconds: float) -> float:
    return jobs / seconds if seconds > 0 else math.inf


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; ``nan`` for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def check_exactly_once(expected: Iterable[str], delivered: Sequence[str]) -> str:
    """``""`` when every expected id was delivered exactly once, else what went wrong."""
    want = set(expected)
    seen: set[str] = set()
    dups = 0
    for job_id in delivered:
        if job_id in seen:
            dups += 1
        seen.add(job_id)
    missing = len(want - seen)
    extra = len(seen - want)
    problems = []
    if dups:
        problems.append(f"{dups} duplicate deliveries")
    if missing:
        problems.append(f"{missing} jobs never delivered")
    if extra:
        problems.append(f"{extra} unexpected jobs delivered")
    return "; ".join(problems)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


_LIBRARIES = (
    "jobpool_async",
    "aiosqlite",
    "anyio",
    "plyvel",
    "asyncpg",
    "huey",
    "persist-queue",
    "litequeue",
    "procrastinate",
    "pgqueuer",
    "arq",
    "saq",
    "redis",
    "psycopg",
    "matplotlib",
)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: cores, Python, library versions."""
    import sqlite3

    info: dict[str, Any] = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "sqlite_library": sqlite3.sqlite_version,
        "libraries": {name: _version(name) for name in _LIBRARIES},
    }
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def now() -> float:
    return time.perf_counter()


# --- the drain workload (issue #20): the same per-job work for ours, floors and peers ---


def drain_payload(i: int) -> bytes:
    """Job ``i``'s payload: a JSON object of exactly 100 bytes."""
    head = json.dumps({"n": i, "kind": "resize", "pad": ""}, separators=(",", ":"))
    return head.replace('"pad":""', '"pad":"' + "x" * (100 - len(head)) + '"').encode()


async def _trivial() -> None:
    """The coroutine each job awaits (a real call would do I/O here)."""


async def drain_work(payload: bytes) -> bytes:
    """One job's work in the drain workload: decode, await, encode a small result."""
    data = json.loads(payload)
    await _trivial()
    return json.dumps({"n": data["n"], "ok": True}).encode()
