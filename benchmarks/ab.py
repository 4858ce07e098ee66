"""``python -m benchmarks.ab``: the standard harness on two revisions, alternately.

Answers "did a change slow any workload down?" on a shared, noisy machine: each
side's tree (a git revision checked out into a temporary worktree, or a directory
given as is) runs ``python -m benchmarks <harness arguments> --no-peers`` with its
own ``jobpool_async`` and ``benchmarks``, alternating which side runs first over
``--rounds`` rounds, and the medians per workload go into a Markdown table:

* ``after/before``: median rate after over median rate before (for ``wake``, the
  median p50 latency before over after), so below 1 is slower;
* ``share-of-floor after/before``: the same for each run's figure divided by its
  raw storage floor measured in the same run, less sensitive to the machine's load.

Example (what issue #15 asks for)::

    python -m benchmarks.ab --before 0abab17 --after main --rounds 5 \\
        --out benchmarks/results/driver-ab.md -- --workloads e2e,fanout,bulk

Everything after ``--`` goes to the harness (``--no-peers`` is added); the
PostgreSQL DSN comes from ``$JOBPOOL_BENCH_POSTGRES_DSN`` or ``--postgres-dsn``
there, as for the harness itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __main__ as harness
from ._common import Row, median
from .report import _params

__all__ = ["Side", "collect", "main", "markdown"]

REPO = Path(__file__).resolve().parent.parent
SLOWER = 0.95  # "no workload slowed by more than 5%"


@dataclass(slots=True)
class Side:
    """One side of the comparison: a tree holding ``jobpool_async`` and ``benchmarks``."""

    label: str
    spec: str
    tree: Path
    commit: str = ""
    #: Per run: the rows of our own figures (kind "ours") it measured.
    runs: list[list[Row]] = field(default_factory=list)


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@contextlib.contextmanager
def checked_out(label: str, spec: str, scratch: Path) -> Iterator[Side]:
    """``spec`` as a tree: a directory as is, else a git revision in a temporary worktree."""
    path = Path(spec)
    if path.is_dir():
        tree = path.resolve()
        commit = ""
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            commit = _git("rev-parse", "--short", "HEAD", cwd=tree)
            if _git("status", "--porcelain", "--untracked-files=no", cwd=tree):
                commit += " + uncommitted changes"
        yield Side(label, spec, tree, commit or "(not a git tree)")
        return
    try:
        commit = _git("rev-parse", "--verify", "--short", f"{spec}^{{commit}}")
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--{label}: {spec!r} is neither a directory nor a git revision") from exc
    tree = scratch / label
    _git("worktree", "add", "--detach", "--quiet", str(tree), commit)
    try:
        yield Side(label, spec, tree, commit)
    finally:
        _git("worktree", "remove", "--force", str(tree))


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def check_tree(side: Side) -> None:
    """The side's own code is what its runs import (not this checkout's)."""
    probe = "import benchmarks as b, jobpool_async as j; print(j.__file__); print(b.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=side.tree,
        env=_env(side.tree),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for file in out:
        if not Path(file).resolve().is_relative_to(side.tree):
            raise SystemExit(f"{side.label}: {file} is imported instead of {side.tree}'s own")


def run_once(side: Side, harness_args: Sequence[str], out_dir: Path, stem: str) -> list[Row]:
    """One run of the harness in ``side``'s tree; its rows of kind ``ours``."""
    cmd = [sys.executable, "-m", "benchmarks", *harness_args, "--no-peers"]
    cmd += ["--out", str(out_dir), "--stem", stem]
    done = subprocess.run(cmd, cwd=side.tree, env=_env(side.tree), capture_output=True, text=True)
    path = out_dir / f"{stem}.json"
    if not path.exists():
        raise SystemExit(f"{side.label}: the harness wrote no results:\n{done.stderr[-3000:]}")
    if done.returncode != 0:  # some figures failed: they are left out (ok is false)
        print(f"{side.label}: {done.stderr.strip()[-2000:]}", file=sys.stderr)
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = [Row(**r) for r in data["rows"]]
    return [r for r in rows if r.kind == "ours"]


def _speed(row: Row) -> float | None:
    """Higher is better: the rate, or for latency-only rows 1 / p50."""
    if not row.ok:
        return None
    if row.jobs_per_s is not None:
        return row.jobs_per_s
    p50 = row.metrics.get("p50_ms")
    return 1.0 / p50 if p50 else None


def _share(row: Row) -> float | None:
    """The run's figure as a share of its floor measured in the same run."""
    if not row.ok or row.baseline is None or row.ratio is None or row.workload == "memory":
        return None
    return row.ratio


Key = tuple[str, str, str]


def collect(side: Side) -> dict[Key, tuple[Row, list[float], list[float]]]:
    """Per (workload, system, params): a sample row, the speeds and the shares of floor."""
    out: dict[Key, tuple[Row, list[float], list[float]]] = {}
    for rows in side.runs:
        for row in rows:
            key = (row.workload, row.system, json.dumps(row.params, sort_keys=True))
            _, speeds, shares = out.setdefault(key, (row, [], []))
            speed, share = _speed(row), _share(row)
            if speed is not None:
                speeds.append(speed)
            if share is not None:
                shares.append(share)
    return out


def _ratio(after: list[float], before: list[float]) -> float:
    if not after or not before:
        return math.nan
    return median(after) / median(before)


def _fmt(value: float, digits: int = 3) -> str:
    return "" if math.isnan(value) else f"{value:,.{digits}f}"


def markdown(before: Side, after: Side, meta: dict[str, Any]) -> str:
    b, a = collect(before), collect(after)
    lines = [
        f"# A/B: {after.spec} against {before.spec}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- before: `{before.spec}` ({before.commit}); after: `{after.spec}` ({after.commit})",
        f"- harness: `python -m benchmarks {' '.join(meta['harness_args'])} --no-peers`, "
        "each side its own checkout (code and harness)",
        f"- {meta['rounds']} rounds, alternating which side runs first; "
        f"{meta['started']} to {meta['finished']} UTC",
        f"- load average (1 min) at the start {meta['load_start']:.2f}, "
        f"at the end {meta['load_end']:.2f}, on {os.cpu_count()} cores",
        "",
        "after/before: median rate after over median rate before (wake: median p50 "
        "latency before over after); share-of-floor after/before: the same for each "
        "run's figure over its raw storage floor in the same run. Below 1 is slower; "
        f"rows below {SLOWER} on both are marked.",
        "",
        "| workload | system | params | runs | before | after | after/before "
        "| share-of-floor after/before | |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for key in sorted(set(b) | set(a)):
        row, b_speed, b_share = b.get(key, (a[key][0], [], []))
        _, a_speed, a_share = a.get(key, (row, [], []))
        speed = _ratio(a_speed, b_speed)
        share = _ratio(a_share, b_share)
        unit = "1/p50 ms" if row.jobs_per_s is None else "jobs/s"
        slower = speed < SLOWER and (math.isnan(share) or share < SLOWER)
        lines.append(
            f"| {row.workload} | {row.system} | {_params(row)} "
            f"| {len(b_speed)}/{len(a_speed)} "
            f"| {_fmt(median(b_speed), 0 if unit == 'jobs/s' else 3)} "
            f"| {_fmt(median(a_speed), 0 if unit == 'jobs/s' else 3)} "
            f"| {_fmt(speed)} | {_fmt(share)} | {'slower' if slower else ''} |"
        )
    lines.append("")
    marked = sum(1 for line in lines if line.endswith("| slower |"))
    lines.append(
        f"{marked} row(s) slower by more than {round((1 - SLOWER) * 100)}% on both measures."
    )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    ours, theirs = args[:split], args[split + 1 :]
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="git revision or directory (the baseline)")
    p.add_argument("--after", default=str(REPO), help="git revision or directory (default: here)")
    p.add_argument("--rounds", type=int, default=5, help="runs per side (default 5)")
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "ab.md", help="Markdown file"
    )
    ns = p.parse_args(ours)
    if ns.rounds < 1:
        p.error("--rounds must be at least 1")
    for banned in ("--out", "--stem", "--no-peers"):
        if any(a == banned or a.startswith(banned + "=") for a in theirs):
            p.error(f"{banned} is set by benchmarks.ab; leave it out of the harness arguments")
    harness.parse_args(theirs)  # the harness's own check of its arguments, before any run
    return ns, theirs


def main(argv: Sequence[str] | None = None) -> int:
    ns, harness_args = parse_args(argv)
    meta: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.ab", *(sys.argv[1:] if argv is None else argv)]),
        "harness_args": harness_args,
        "rounds": ns.rounds,
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="jobpool-ab-") as tmp:
        scratch = Path(tmp)
        with (
            checked_out("before", ns.before, scratch) as before,
            checked_out("after", ns.after, scratch) as after,
        ):
            for side in (before, after):
                check_tree(side)
            for i in range(ns.rounds):
                order = (before, after) if i % 2 == 0 else (after, before)
                for side in order:
                    print(f"round {i + 1}/{ns.rounds}: {side.label} ({side.commit})", flush=True)
                    side.runs.append(run_once(side, harness_args, scratch, f"{side.label}-{i}"))
            meta["finished"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
            meta["load_end"] = os.getloadavg()[0]
            text = markdown(before, after, meta)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(text, encoding="utf-8")
    print(text)
    print(f"markdown: {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
