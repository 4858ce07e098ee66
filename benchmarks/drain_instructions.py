"""One arm of the drain workload on the in-memory backend, for counting instructions.

``python -m benchmarks.drain_instructions ARM N`` runs ``hand`` (the hand loop),
``worker`` (the ``Worker``), ``floor`` (the raw dict floor) or what each builds
before its clock (``build-jobs``: the ``Job`` objects; ``build-floor``: the floor's ids
and payloads), for ``N`` jobs, once. Under callgrind, on a machine too noisy for
wall-clock ratios (the rate of a fixed Python loop swung 2.4x there)::

    PYTHONHASHSEED=0 valgrind --tool=callgrind python -m benchmarks.drain_instructions hand 2000
    # ... and 4000; per job: (Ir(4000) - Ir(2000)) / 2000

The clocked cost of an arm per job is its figure less its build's (``hand`` and
``worker`` less ``build-jobs``, ``floor`` less ``build-floor``); the floor's over ours
is then the drain's ratio by instructions, which does not depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from jobpool_async.backends.memory import MemoryBackend

from ._common import drain_payload, drain_work
from .floors import make_floor
from .workloads import _drain_jobs, drain_stream, drain_worker

ARMS = ("hand", "worker", "floor", "build-jobs", "build-floor")
SLOTS = 10
TIME_LIMIT = 600.0


async def run(arm: str, n: int) -> None:
    """Run ``arm`` once for ``n`` jobs."""
    if arm in ("hand", "worker"):
        body = drain_stream if arm == "hand" else drain_worker
        outcome = await body(MemoryBackend(), n, SLOTS, TIME_LIMIT)
        if outcome.problem:  # a job lost or run twice: the count would mean nothing
            raise SystemExit(f"{arm}: {outcome.problem}")
    elif arm == "floor":
        floor = make_floor("raw dict", Path("."))  # the raw dict uses no directory
        await floor.open()
        try:
            _, claimed, _ = await floor.drain(n, SLOTS, drain_payload, drain_work)
        finally:
            await floor.close()
        if len(claimed) != n:
            raise SystemExit(f"the floor drained {len(claimed)} of {n} jobs")
    elif arm == "build-jobs":
        _drain_jobs(n)
    else:  # build-floor: what Floor.drain builds before its clock
        ids = [f"d000000-{i:08d}" for i in range(n)]
        {job_id: drain_payload(i) for i, job_id in enumerate(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arm", choices=ARMS)
    parser.add_argument("jobs", type=int)
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("jobs must be at least 1")
    asyncio.run(run(args.arm, args.jobs))


if __name__ == "__main__":
    main()
