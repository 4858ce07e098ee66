"""One arm of the drain workload on PostgreSQL, for counting the client's instructions.

``python -m benchmarks.postgres_client_instructions ARM N [--dsn DSN]`` runs ``hand``
(the hand loop) or ``worker`` (the ``Worker``) of ``benchmarks.workloads`` once for
``N`` jobs on a schema of its own (dropped afterwards), with ``lease=None``,
``self_vacuum=False`` and the once-a-second promotion probe off (under callgrind the
client runs some 50 times slower: the probe would run more often per job). Under
callgrind::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        python -m benchmarks.postgres_client_instructions hand 2000   # ... and 4000

per job: (Ir(4000) - Ir(2000)) / 2000, the enqueue's and the drain's client work
without the process's start, the imports and the store's opening. The server's side:
``benchmarks.postgres_server_instructions``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from datetime import datetime

from jobpool_async.backends.postgres import PostgresBackend

from .workloads import drain_stream, drain_worker

BODIES = {"hand": drain_stream, "worker": drain_worker}
SLOTS = 10
TIME_LIMIT = 3000.0


class _NoProbe(PostgresBackend):
    """Looks for due waiting jobs only when told to (the first claim), not once a
    second as well."""

    def _should_promote(self, now: datetime) -> bool:
        return self._probe_now


async def run(arm: str, n: int, dsn: str, no_poll: bool = False) -> None:
    if no_poll:
        _NoProbe.default_poll_interval = None
    schema = f"jp_cg_{uuid.uuid4().hex[:10]}"
    try:
        backend = _NoProbe(dsn, schema=schema, self_vacuum=False)
        out = await BODIES[arm](backend, n, SLOTS, TIME_LIMIT, lease=None)
        if out.problem:
            raise SystemExit(f"{arm}: {out.problem}")
    finally:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arm", choices=sorted(BODIES))
    parser.add_argument("jobs", type=int)
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "JOBPOOL_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument(
        "--no-poll",
        action="store_true",
        help="streams do not look at the store every second (a waiting stream's polls "
        "come with the run's time, which callgrind stretches: the Worker's consumer "
        "waits for the whole drain)",
    )
    args = parser.parse_args()
    asyncio.run(run(args.arm, args.jobs, args.dsn, args.no_poll))


if __name__ == "__main__":
    main()
