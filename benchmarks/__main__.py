"""``python -m benchmarks``: run the benchmark suite and write results/latest.{json,md,png}."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path

from ._common import Sizes
from ._targets import BACKEND_NAMES
from .peers import PEERS
from .report import write
from .runner import WORKLOADS, Options, run

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _list(value: str, choices: tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in choices]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(bad)}; choose from {', '.join(choices)}"
        )
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark jobpool_async per backend, beside raw storage floors and peers.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (checks the harness works)")
    size.add_argument(
        "--full", action="store_true", help="1,000,000 completed jobs for scale and memory"
    )
    p.add_argument(
        "--backends",
        type=lambda v: _list(v, BACKEND_NAMES, "backend"),
        default=BACKEND_NAMES,
        help=f"comma-separated, default all ({','.join(BACKEND_NAMES)})",
    )
    p.add_argument(
        "--workloads",
        type=lambda v: _list(v, WORKLOADS, "workload"),
        default=WORKLOADS,
        help=f"comma-separated, default all ({','.join(WORKLOADS)})",
    )
    p.add_argument(
        "--peers",
        type=lambda v: _list(v, list(PEERS), "peer"),
        default=tuple(PEERS),
        help=f"comma-separated, default all ({','.join(PEERS)})",
    )
    p.add_argument("--no-peers", action="store_true", help="skip the peer job queues")
    p.add_argument(
        "--postgres-dsn",
        default=os.environ.get("JOBPOOL_BENCH_POSTGRES_DSN", ""),
        help="PostgreSQL server for the postgres backend, floor and peers "
        "(default: $JOBPOOL_BENCH_POSTGRES_DSN); each run uses its own schemas, dropped after",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("JOBPOOL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis for the arq and saq peers (default: $JOBPOOL_BENCH_REDIS_URL or "
        "redis://127.0.0.1:6379/0; pass '' to skip them)",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory ({DEFAULT_OUT})"
    )
    p.add_argument("--stem", default="latest", help="output file name stem (latest)")
    p.add_argument("--workdir", type=Path, default=None, help="where temporary stores go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes.full() if args.full else Sizes.default()
    options = Options(
        sizes=sizes,
        backends=list(args.backends),
        postgres_dsn=args.postgres_dsn or None,
        redis_url=args.redis_url or None,
        workloads=args.workloads,
        peers=() if args.no_peers else args.peers,
        workdir=args.workdir,
        progress=lambda msg: print(msg, flush=True),
    )
    given = list(argv if argv is not None else sys.argv[1:])
    shown: list[str] = []
    for arg in given:  # a DSN may hold a password: record that one was given, not which
        if shown and shown[-1] == "--postgres-dsn":
            shown[-1] = "--postgres-dsn=…"
        elif arg.startswith("--postgres-dsn="):
            shown.append("--postgres-dsn=…")
        else:
            shown.append(arg)
    env = (
        ["JOBPOOL_BENCH_POSTGRES_DSN=…"]
        if options.postgres_dsn and not any(a.startswith("--postgres-dsn") for a in shown)
        else []
    )
    command = " ".join([*env, shlex.join(["python", "-m", "benchmarks", *shown])])
    report = asyncio.run(run(options, command))
    paths = write(report, args.out, args.stem)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    failed = [r for r in report.rows if not r.ok and r.system not in report.unavailable]
    if failed:
        print(f"{len(failed)} figure(s) failed their run or correctness check:", file=sys.stderr)
        for r in failed:
            print(f"  {r.workload} {r.system}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
