"""A tiny-size run of the benchmark harness, so CI keeps it working.

No wall-clock asserts: speed is not checked here, only that every workload runs,
that its correctness checks hold (every job delivered and completed exactly
once), that each figure carries its same-run baseline, and that the results are
written. Also checks that missing backends and peers are reported with a reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks import Options, Report, Sizes, run, runner
from benchmarks._common import check_exactly_once, percentile
from benchmarks._targets import find_targets
from benchmarks.peers import PEERS, run_peer
from benchmarks.report import markdown, write
from benchmarks.runner import WORKLOADS
from benchmarks.workloads import Outcome

pytestmark = pytest.mark.timeout(300)

LOCAL = ["memory", "sqlite", "leveldb"]


def test_exactly_once_check_catches_duplicates_and_losses() -> None:
    assert check_exactly_once(["a", "b"], ["b", "a"]) == ""
    assert "1 duplicate" in check_exactly_once(["a", "b"], ["a", "a", "b"])
    assert "1 jobs never delivered" in check_exactly_once(["a", "b"], ["a"])
    assert "1 unexpected" in check_exactly_once(["a"], ["a", "z"])


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)


def test_unavailable_backends_have_a_reason() -> None:
    (pg,) = find_targets(["postgres"], None)
    assert not pg.available
    assert "DSN" in pg.reason
    with pytest.raises(ValueError, match="unknown backend"):
        find_targets(["nosuch"], None)


async def test_unavailable_peer_has_a_reason(tmp_path: Path) -> None:
    result = await run_peer("arq", 10, 2, tmp_path, None, None, 30.0)
    assert not result.ok and result.unavailable
    assert "Redis" in result.note or "not installed" in result.note


@pytest.mark.skipif(
    importlib.util.find_spec("pgqueuer") is None or not os.environ.get("JOBPOOL_TEST_POSTGRES_DSN"),
    reason="needs pgqueuer (the bench extra) and JOBPOOL_TEST_POSTGRES_DSN",
)
@pytest.mark.parametrize("peer", ["pgqueuer", "pgqueuer-batch"])
async def test_pgqueuer_peer_runs_capped_and_uncapped(tmp_path: Path, peer: str) -> None:
    """Both pgqueuer set-ups run the workload and pass its exactly-once check."""
    dsn = os.environ["JOBPOOL_TEST_POSTGRES_DSN"]
    result = await run_peer(peer, 60, 4, tmp_path, dsn, None, 60.0)
    assert result.ok, result.note
    assert result.seconds > 0


async def test_a_failed_paired_run_of_ours_shows_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our run paired with a peer's that fails its check is a FAILED row (it was once
    dropped at debug level), and the peer's row counts only the pairs that ran."""

    async def broken(*args: Any) -> Outcome:
        return Outcome(10, 0.1, problem="3 jobs never delivered")

    monkeypatch.setattr(runner, "end_to_end_stream", broken)
    report = await run(
        Options(
            sizes=Sizes.quick(),
            backends=["memory"],
            workloads=("peers",),
            peers=("asyncio-queue",),
            workdir=tmp_path,
        )
    )
    paired = [r for r in report.rows if r.system == "jobpool_async[memory] paired"]
    assert len(paired) == Sizes.quick().peer_rounds
    assert all(not r.ok and r.note == "3 jobs never delivered" for r in paired)
    assert "**FAILED**: 3 jobs never delivered" in markdown(report)
    (peer,) = [r for r in report.rows if r.kind == "peer"]
    assert peer.ok and peer.metrics["pairs"] == 0 and peer.ratio is None


async def test_quick_run_every_workload_correct(tmp_path: Path) -> None:
    # asyncio-queue (a reference adapter, always installed) takes the path every peer
    # takes: a child process running benchmarks/_peer_child.py.
    peers: tuple[str, ...] = ("asyncio-queue",)
    if importlib.util.find_spec("litequeue"):
        peers += ("litequeue",)
    messages: list[str] = []
    report = await run(
        Options(
            sizes=Sizes.quick(),
            backends=LOCAL,
            peers=peers,
            workdir=tmp_path,
            progress=messages.append,
        )
    )
    available = [t.name for t in find_targets(LOCAL, None) if t.available]
    assert "memory" in available
    for name in set(LOCAL) - set(available):
        assert report.unavailable[f"jobpool_async[{name}]"]  # a reason, not a crash

    failed = [(r.workload, r.system, r.note) for r in report.rows if not r.ok]
    assert failed == []
    for backend in available:
        ours = {r.workload for r in report.rows if r.backend == backend and r.kind == "ours"}
        assert ours >= set(WORKLOADS) - {"peers", "worker"}, backend
        e2e = [r for r in report.rows if r.backend == backend and r.workload == "e2e"]
        floors = [r for r in e2e if r.kind == "floor"]
        stream = [r for r in e2e if r.kind == "ours" and "Worker" not in r.system]
        assert len(stream) == len(Sizes.quick().e2e_slots)
        assert floors and all(r.jobs_per_s for r in floors)
        for row in stream:  # each figure beside its same-run floor, as a ratio
            assert row.baseline is not None and row.ratio is not None and row.ratio > 0
            assert row.jobs == Sizes.quick().e2e_jobs
        wake = next(
            r
            for r in report.rows
            if r.backend == backend and r.workload == "wake" and r.kind == "ours"
        )
        assert wake.metrics["samples"] == Sizes.quick().wake_samples
        assert wake.metrics["p99_ms"] >= wake.metrics["p50_ms"] >= 0
        scale = [r for r in report.rows if r.backend == backend and r.workload == "scale"]
        assert [r.params["completed_in_store"] for r in scale] == list(Sizes.quick().scale_levels)
        memory = next(r for r in report.rows if r.backend == backend and r.workload == "memory")
        assert memory.metrics["samples"] >= 2 and memory.metrics["rss_end_mb"] > 0
    for peer in peers:
        (row,) = [r for r in report.rows if r.kind == "peer" and r.system == PEERS[peer].label]
        assert row.ok and row.jobs_per_s and row.metrics["enqueue_s"] > 0, peer
        if PEERS[peer].compare_with in available:  # paired with ours, every round
            assert row.metrics["pairs"] == Sizes.quick().peer_rounds and row.ratio, peer

    _check_written(report, tmp_path / "results")


def _check_written(report: Report, out: Path) -> None:
    paths = write(report, out)
    data = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    assert data["machine"]["cpu_count"] == os.cpu_count()
    assert data["machine"]["libraries"]["jobpool_async"]
    assert len(data["rows"]) == len(report.rows)
    text = markdown(report)
    assert "## End to end" in text and "raw dict" in text
    if importlib.util.find_spec("matplotlib"):
        assert Path(paths["chart"]).stat().st_size > 0
    else:
        assert "matplotlib" in str(paths["chart_skipped"])


@pytest.mark.skipif(
    not os.environ.get("JOBPOOL_TEST_POSTGRES_DSN"),
    reason="no PostgreSQL server configured: set JOBPOOL_TEST_POSTGRES_DSN",
)
async def test_quick_run_postgres(tmp_path: Path) -> None:
    report = await run(
        Options(
            sizes=Sizes.quick(),
            backends=["postgres"],
            postgres_dsn=os.environ["JOBPOOL_TEST_POSTGRES_DSN"],
            workloads=("e2e", "wake"),
            peers=(),
            workdir=tmp_path,
        )
    )
    if "jobpool_async[postgres]" in report.unavailable:
        pytest.skip(f"postgres backend: {report.unavailable['jobpool_async[postgres]']}")
    assert [(r.system, r.note) for r in report.rows if not r.ok] == []
    assert any(r.system == "raw asyncpg" for r in report.rows)
    assert any(r.kind == "ours" and r.ratio for r in report.rows if r.workload == "e2e")
    (across,) = [r for r in report.rows if "from another queue" in r.system]
    assert across.metrics["samples"] == Sizes.quick().wake_samples
    assert across.metrics["p99_ms"] >= across.metrics["p50_ms"] > 0
    assert across.baseline == "jobpool_async[postgres]" and across.ratio  # same run, one queue


def test_listing_benchmark_runs_at_tiny_sizes(tmp_path: Path) -> None:
    from benchmarks import listing

    out = tmp_path / "listing.md"
    args = ["--backends", "sqlite", "--sizes", "300,600", "--calls", "1", "--out", str(out)]
    assert listing.main([*args, "--workdir", str(tmp_path / "w")]) == 0
    text = out.read_text()
    assert "| newest 100 |" in text and "| tag rare (0.1%) |" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["sqlite"]) == {"300", "600"}
    assert set(data["sqlite"]["600"]) == set(listing.QUERIES)


@pytest.mark.skipif(
    not os.environ.get("JOBPOOL_TEST_POSTGRES_DSN"),
    reason="no PostgreSQL server configured: set JOBPOOL_TEST_POSTGRES_DSN",
)
def test_listing_benchmark_counts_postgres_buffers(tmp_path: Path) -> None:
    from benchmarks import listing

    out = tmp_path / "listing.md"
    args = ["--backends", "postgres", "--sizes", "300,600", "--buffers", "--out", str(out)]
    assert listing.main(args) == 0
    assert "shared buffers its statement reads" in out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["postgres"]["600"]) == set(listing.QUERIES)
    counts = [v for size in data["postgres"].values() for v in size.values()]
    assert all(v >= 1 and v == int(v) for v in counts), counts
    with pytest.raises(SystemExit):  # buffers are PostgreSQL's
        listing.main(["--backends", "sqlite", "--buffers", "--out", str(out)])


async def test_schedules_benchmark_runs_at_tiny_sizes(tmp_path: Path) -> None:
    from benchmarks import schedules

    out = tmp_path / "schedules"
    args = ["--backends", "memory,sqlite", "--jobs", "200", "--pairs", "1"]
    await schedules.main([*args, "--future", "300", "--samples", "5", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["backend"] for r in data["mixed"]] == ["memory", "sqlite"]
    assert all(r["ratio"] > 0 for r in data["mixed"])
    assert [r["backend"] for r in data["latency"]] == ["memory", "sqlite"]
    assert all(0 <= r["p50_ms"] <= r["p99_ms"] for r in data["latency"])
    assert [(r["backend"], r["future_jobs"]) for r in data["future"]] == [("sqlite", 300)]
    assert "| memory | 200 | 1 |" in out.with_suffix(".md").read_text()


def test_sqlite_listing_benchmark_counts_steps_that_do_not_grow(tmp_path: Path) -> None:
    from benchmarks import sqlite_listing

    out = tmp_path / "listing"
    sqlite_listing.main(["--sizes", "1000,2000", "--out", str(out)])
    after = json.loads(out.with_suffix(".json").read_text())["sides"]["after"]
    for kind in ("plain", "mixed"):
        small, large = after[kind]["1000"], after[kind]["2000"]
        assert small["newest 100"] == large["newest 100"] > 0
        assert small["status COMPLETED (90%)"] > 0 and large["status COMPLETED (90%)"] > 0
    assert "| after | mixed | status COMPLETED (90%) |" in out.with_suffix(".md").read_text()


def test_sqlite_frames_benchmark_runs_at_tiny_sizes(tmp_path: Path) -> None:
    """Every workload runs through (each job once, else it raises); the claim cycle's
    frames are counted by b-tree, and a priority-ordered claim touches few table pages."""
    from benchmarks import sqlite_frames

    out = tmp_path / "frames"
    sqlite_frames.main(["--jobs", "300", "--rounds", "1", "--future", "500", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    after = data["sides"]["after"]
    assert set(after) == {"revision", "plain", "mixed", "plain + future"}
    for workload in ("plain", "mixed", "plain + future"):
        frames = after[workload]["frames_per_commit"]
        assert frames["jobs"] > 0 and frames["jobs_list_prio"] > 0
    assert after["mixed"]["frames_per_commit"]["jobs"] < 5
    assert "| after | mixed | **all** |" in out.with_suffix(".md").read_text()


async def test_leases_benchmark_runs_at_tiny_sizes(tmp_path: Path) -> None:
    from benchmarks import leases

    out = tmp_path / "leases"
    await leases.main(
        ["--backends", "memory,sqlite", "--jobs", "60", "--pairs", "1", "--out", str(out)]
    )
    data = json.loads(out.with_suffix(".json").read_text())
    assert {(r["backend"], r["workload"]) for r in data["throughput"]} == {
        (b, w) for b in ("memory", "sqlite") for w in leases._workloads(60)
    }
    assert all(r["ratio"] > 0 for r in data["throughput"])
    assert [r["backend"] for r in data["rescue"]] == ["memory", "sqlite"]
    assert "one statement per queue" in out.with_suffix(".md").read_text()


async def test_drain_benchmark_runs_at_tiny_sizes(tmp_path: Path) -> None:
    """Every arm runs and is checked (each job once); huey joins where it is installed."""
    from benchmarks import drain

    out = tmp_path / "drain"
    args = ["--backends", "memory,sqlite,leveldb", "--jobs", "50", "--rounds", "1"]
    await drain.main([*args, "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == {"memory", "sqlite", "leveldb"}
    for name, row in rows.items():
        assert {"hand loop", "Worker", row["floor"]} <= set(row["median"]), (name, row)
        # the CPU time of each arm's timed interval, per job, beside its rate
        assert set(row["median"]) - {row["peer"]} <= set(row["cpu_median"]), (name, row)
        assert all(v > 0 for v in row["cpu_median"].values()), (name, row)
    if importlib.util.find_spec("huey"):
        assert rows["sqlite"]["peer"] in rows["sqlite"]["median"], rows["sqlite"]["notes"]
        assert rows["sqlite"]["peer"] in rows["sqlite"]["cpu_median"]
    text = out.with_suffix(".md").read_text()
    assert "| memory |" in text and "raw plyvel" in text
    assert "CPU time per job" in text and f"at {data['revision']}," in text


def test_drain_payload_is_100_bytes_of_json() -> None:
    import asyncio

    from benchmarks._common import drain_payload, drain_work

    for i in (0, 7, 9_999, 1_000_000):
        payload = drain_payload(i)
        assert len(payload) == 100 and json.loads(payload)["n"] == i
        assert json.loads(asyncio.run(drain_work(payload))) == {"n": i, "ok": True}


def _row(workload: str, rate: float | None, share: float | None, **metrics: float) -> Any:
    from benchmarks._common import Row

    return Row(
        workload,
        "jobpool_async[memory]",
        "ours",
        "memory",
        {"jobs": 10, "slots": 2},
        jobs_per_s=rate,
        metrics=dict(metrics),
        baseline=None if share is None else "raw dict",
        ratio=share,
    )


def test_ab_table_compares_medians_and_marks_slowdowns(tmp_path: Path) -> None:
    from benchmarks import ab

    before = ab.Side("before", "old", tmp_path, "aaa")
    after = ab.Side("after", "new", tmp_path, "bbb")
    before.runs = [
        [_row("e2e", r, r / 1000), _row("wake", None, 0.5, p50_ms=p)]
        for r, p in [(100.0, 1.0), (110.0, 1.0), (90.0, 1.2)]
    ]
    after.runs = [
        [_row("e2e", r, r / 1000), _row("wake", None, 0.5, p50_ms=p)]
        for r, p in [(80.0, 0.5), (85.0, 0.5), (500.0, 0.5)]
    ]
    meta = {
        "command": "c",
        "harness_args": ["--quick"],
        "rounds": 3,
        "started": "s",
        "finished": "f",
        "load_start": 1.0,
        "load_end": 2.0,
    }
    text = ab.markdown(before, after, meta)
    e2e = next(line for line in text.splitlines() if line.startswith("| e2e"))
    wake = next(line for line in text.splitlines() if line.startswith("| wake"))
    # medians 100 before, 85 after: 0.85, and the shares of floor alike: slower
    assert "| 3/3 | 100 | 85 | 0.850 | 0.850 | slower |" in e2e
    # latency: p50 1.0 ms before, 0.5 ms after, so twice as fast
    assert "| 2.000 | 1.000 |  |" in wake
    assert "1 row(s) slower by more than 5%" in text


def test_ab_refuses_arguments_it_sets_itself() -> None:
    from benchmarks import ab

    with pytest.raises(SystemExit):
        ab.parse_args(["--before", "HEAD", "--", "--out", "x"])
    with pytest.raises(SystemExit):
        ab.parse_args(["--before", "HEAD", "--", "--workloads", "nosuch"])
    ns, rest = ab.parse_args(["--before", "HEAD", "--rounds", "2", "--", "--quick"])
    assert (ns.before, ns.rounds, rest) == ("HEAD", 2, ["--quick"])


def test_ab_runs_the_harness_on_two_trees(tmp_path: Path) -> None:
    from benchmarks import ab

    here = str(ab.REPO)
    out = tmp_path / "ab.md"
    harness = ["--quick", "--workloads", "e2e", "--backends", "memory"]
    assert (
        ab.main(
            ["--before", here, "--after", here, "--rounds", "2", "--out", str(out), "--", *harness]
        )
        == 0
    )
    text = out.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| e2e |")]
    assert len(rows) == 2 and all("| 2/2 |" in line for line in rows), text


@pytest.mark.skipif(
    not os.environ.get("JOBPOOL_TEST_POSTGRES_DSN"),
    reason="no PostgreSQL server configured: set JOBPOOL_TEST_POSTGRES_DSN",
)
def test_postgres_cpu_benchmark_runs_at_tiny_sizes(tmp_path: Path) -> None:
    """Every arm runs and is checked; the server's CPU is read from its processes."""
    from benchmarks import postgres_cpu

    out = tmp_path / "cpu.md"
    arms = (
        "hand,worker,floor,hand-noidle,worker-notrace,hand-future,plain,mixed,priorities,scheduled"
    )
    dsn = os.environ["JOBPOOL_TEST_POSTGRES_DSN"]
    sizes = ["--jobs", "200", "--rounds", "1", "--future", "300"]
    postgres_cpu.main([*sizes, "--arms", arms, "--postgres-dsn", dsn, "--out", str(out)])
    rows = [line.split("|") for line in out.read_text().splitlines() if line.startswith("| ")]
    figures = {r[1].strip(): [float(x.replace(",", "")) for x in r[2:6]] for r in rows[1:]}
    assert set(figures) == set(arms.split(","))
    for arm, (rate, client, server, _wal) in figures.items():
        assert rate > 0 and client > 0 and server >= 0, (arm, figures)
    assert "held 300 jobs scheduled a day ahead" in out.read_text()


async def test_sqlite_profile_runs_at_tiny_sizes(tmp_path: Path) -> None:
    """The storage thread's work of the drain, measured apart, and end to end."""
    from benchmarks import sqlite_profile

    out = tmp_path / "profile"
    await sqlite_profile.main(["--jobs", "60", "--rounds", "1", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    thread = data["thread"]
    per_batch = thread["statements_per_batch"]
    # one call per batch: BEGIN, the completion, the refill's claim, COMMIT
    assert per_batch["BEGIN IMMEDIATE"] == per_batch["COMMIT"] == 1
    assert thread["statement_cpu_us_per_job"]["claim (UPDATE ... RETURNING)"] > 0
    assert thread["vm_steps_per_job"]["completion (UPDATE ... FROM VALUES ... RETURNING)"] > 0
    assert thread["wal_frames_per_commit"]["jobs"] > 0
    for label in ("hand loop", "Worker"):
        row = data["end_to_end"][label]
        assert 0 < row["storage_thread_cpu_us_per_job"] < row["process_cpu_us_per_job"]
    assert "where the time goes" in out.with_suffix(".md").read_text()


def test_sqlite_cost_runs_each_phase_at_tiny_sizes() -> None:
    """benchmarks.sqlite_cost (counted under callgrind) runs both phases of both
    workloads; its claim cycle raises unless every job went through."""
    from benchmarks import sqlite_cost

    for kind in ("plain", "mixed"):
        for phase in ("enqueue", "cycle"):
            sqlite_cost.main([kind, phase, "--jobs", "120"])


@pytest.mark.parametrize("arm", ["hand", "worker", "floor", "build-jobs", "build-floor"])
async def test_drain_instructions_runs_each_arm_at_tiny_sizes(arm: str) -> None:
    """benchmarks.drain_instructions (counted under callgrind) runs each arm; the hand
    loop and the Worker check every job ran exactly once, the floor that all drained."""
    from benchmarks import drain_instructions

    await drain_instructions.run(arm, 50)


def test_leveldb_threads_reports_each_thread_at_tiny_sizes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """benchmarks.leveldb_threads runs the hand loop (it raises unless every job was
    delivered once) and the bare hop, and names the event loop and the storage thread
    (or the hop's worker thread) in what it prints."""
    from benchmarks import leveldb_threads

    leveldb_threads.main(["--mode", "stream", "--jobs", "60"])
    out = capsys.readouterr().out
    assert "event loop: user" in out and "storage thread: user" in out
    assert "all threads" in out and "us/job" in out
    leveldb_threads.main(["--mode", "hop", "--jobs", "30"])
    out = capsys.readouterr().out
    assert "event loop: user" in out and "worker thread: user" in out and "us/hop" in out
