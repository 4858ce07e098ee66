"""The ``jobpool`` command through its real entry point, in subprocesses, against real
SQLite and PostgreSQL stores: exit codes, ``--json`` parsed back, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .backends import drop_postgres_schema, new_schema_name, postgres_dsn

JOBPOOL = shutil.which("jobpool", path=str(Path(sys.executable).parent))


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert JOBPOOL, "the jobpool console script is installed beside this Python"
    return subprocess.run(
        [JOBPOOL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        input=stdin,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cli.db'}"
        return
    dsn = postgres_dsn()
    schema = new_schema_name()
    sep = "&" if "?" in dsn else "?"
    yield f"{dsn}{sep}schema={schema}"
    import asyncio

    asyncio.run(drop_postgres_schema(schema))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result.stdout


def test_enqueue_list_show_cancel_delete_round_trip(url: str) -> None:
    for i in range(3):
        ok(
            run(
                "enqueue",
                "--url",
                url,
                "--type",
                "mail",
                "--id",
                f"j{i}",
                "--tag",
                "t",
                "--payload",
                json.dumps({"n": i}),
            )
        )
    out = json.loads(ok(run("jobs", "--url", url, "--json", "--limit", "2")))
    assert [j["id"] for j in out["jobs"]] == ["j2", "j1"] and out["next_after"]
    rest = json.loads(ok(run("jobs", "--url", url, "--json", "--after", out["next_after"])))
    assert [j["id"] for j in rest["jobs"]] == ["j0"] and rest["next_after"] is None
    shown = json.loads(ok(run("show", "j1", "--url", url, "--json")))
    assert shown["status"] == "initial_pending" and shown["tags"] == ["t"]
    assert json.loads(__import__("base64").b64decode(shown["job_definition"])) == {"n": 1}
    text = ok(run("show", "j1", "--url", url))
    assert '"n": 1' in text and "(8 bytes, json)" in text
    stats = json.loads(ok(run("stats", "--url", url, "--json")))
    assert stats["by_status"]["initial_pending"] == 3
    cancelled = json.loads(ok(run("cancel", "j0", "j1", "nope", "--url", url, "--json")))
    assert sorted(cancelled["cancelled"]) == ["j0", "j1"] and cancelled["unknown"] == ["nope"]
    listed = json.loads(ok(run("jobs", "--url", url, "--json", "--status", "unscheduled")))
    assert sorted(j["id"] for j in listed["jobs"]) == ["j0", "j1"]
    refused = run("delete", "j2", "--url", url)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "JobsNotFinalError" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert run("delete", "--tag", "t", "--url", url).returncode == 1, "j2 (tag t) is not final"
    assert json.loads(ok(run("delete", "j0", "j1", "--url", url, "--json"))) == {"deleted": 2}
    assert json.loads(ok(run("cleanup", "--ttl", "1h", "--url", url, "--json"))) == {"deleted": 0}
    assert json.loads(ok(run("workers", "--url", url, "--json"))) == []


def test_env_url_and_tables(url: str) -> None:
    env = {"JOBPOOL_URL": url}
    job_id = ok(run("enqueue", "--type", "x", env=env)).strip()
    assert len(job_id) == 32
    table = ok(run("jobs", env=env))
    assert table.splitlines()[0].split()[:3] == ["id", "type", "status"] and job_id in table
    assert "initial_pending  1" in ok(run("stats", env=env))


def test_failures_are_one_line_and_exit_1(tmp_path: Path) -> None:
    for args in (
        ["stats", "--url", "nosuch://x"],
        ["stats", "--url", f"sqlite:///{tmp_path}/no/such/dir/x.db"],
        ["show", "missing", "--url", f"sqlite:///{tmp_path / 'a.db'}"],
        ["demo", "--db", "/no/such/dir/x.db"],
    ):
        r = run(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_broken_processor_module_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def process(job:\n")
    db = f"sqlite:///{tmp_path / 'p.db'}"
    for spec in ("broken:process", "nosuchmodule:f", "json:nosuchattr"):
        r = run("worker", spec, "--url", db, cwd=tmp_path)
        assert r.returncode == 1, (spec, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    for args in (
        ["show", "--url", db],  # missing argument
        ["stats"],  # no store given
        ["jobs", "--url", db, "--status", "nope"],
        ["jobs", "--url", db, "--limit", "0"],
        ["cancel", "--url", db],  # neither ids nor tags
        ["worker", "no_colon", "--url", db],
        ["no-such-command"],
    ):
        r = run(*args, env={"JOBPOOL_URL": ""})
        assert r.returncode == 2, (args, r.returncode, r.stderr)


def test_help_shows_an_example_per_command() -> None:
    commands = [
        "requeue",
        "worker",
        "stats",
        "jobs",
        "show",
        "enqueue",
        "cancel",
        "delete",
        "cleanup",
        "workers",
        "dashboard",
    ]
    top = ok(run("--help"))
    for name in [*commands, "demo"]:
        assert name in top
    for name in commands:
        assert "Example: jobpool " + name in ok(run(name, "--help")), name
    assert "--jobs" in ok(run("demo", "--help"))


def test_python_dash_m_is_the_same_command(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "jobpool_async", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "worker" in r.stdout


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    assert JOBPOOL
    return subprocess.Popen(
        [JOBPOOL, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_running(url: str, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while json.loads(ok(run("show", job_id, "--url", url, "--json")))["status"] != "running":
        assert time.monotonic() < deadline, f"{job_id} never ran"
        time.sleep(0.1)


def test_worker_runs_jobs_and_stops_gracefully_on_sigterm(url: str, tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(
        textwrap.dedent("""
        import asyncio
        import pathlib
        import time

        async def process(job):
            if job.job_type == "slow":  # runs until the test releases it (at most 60 s)
                deadline = time.monotonic() + 60
                while not pathlib.Path("release").exists() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            return b"done " + job.job_definition
    """)
    )
    for i in range(5):
        ok(run("enqueue", "--url", url, "--type", "fast", "--id", f"f{i}", "--payload", str(i)))
    proc = start(
        [
            "worker",
            "tasks:process",
            "--url",
            url,
            "--concurrency",
            "3",
            "--assignee",
            "cli-w",
        ],
        tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = json.loads(ok(run("stats", "--url", url, "--json")))
            if stats["completed_jobs"] == 5:
                break
            time.sleep(0.2)
        assert stats["completed_jobs"] == 5
        ok(run("enqueue", "--url", url, "--type", "slow", "--id", "s1"))
        wait_running(url, "s1")
        workers = json.loads(ok(run("workers", "--url", url, "--json")))
        (me,) = [w for w in workers if w["assignee_id"] == "cli-w"]
        assert me["running"] == 1 and me["lease"]["live"] is True, me
        proc.send_signal(signal.SIGTERM)  # graceful: the running job may finish
        assert proc.stderr is not None
        said: list[str] = []
        for line in proc.stderr:  # the worker says it is stopping while s1 still runs
            said.append(line)
            if "SIGTERM: stopping" in line:
                break
        (tmp_path / "release").touch()
        _, rest = proc.communicate(timeout=30)
        err = "".join(said) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM: stopping" in err and "stopped" in err
    done = json.loads(ok(run("show", "s1", "--url", url, "--json")))
    assert done["status"] == "completed" and done["assignee_id"] == "cli-w"


def test_worker_second_signal_stops_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    (tmp_path / "hang.py").write_text(
        "import asyncio\nasync def process(job):\n    await asyncio.sleep(60)\n    return b''\n"
    )
    ok(run("enqueue", "--url", url, "--type", "t", "--id", "h"))
    proc = start(["worker", "hang:process", "--url", url, "--grace", "60"], tmp_path)
    try:
        wait_running(url, "h")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "the first signal waits for the running job (grace 60 s)"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopping now" in err
    job = json.loads(ok(run("show", "h", "--url", url, "--json")))
    assert job["status"] == "failed_retry", "stopped at once: the job goes back to be retried"


def test_requeue(url: str) -> None:
    import asyncio

    from jobpool_async import JobStatus, PoolQueue, open_backend
    from jobpool_async.testing import job_in

    async def prepare() -> str:
        async with PoolQueue(open_backend(url)) as queue:
            return await job_in(queue, JobStatus.STOPPED, "rq")

    asyncio.run(prepare())
    ok(run("enqueue", "--url", url, "--type", "t", "--id", "pending"))
    out = json.loads(ok(run("requeue", "rq", "pending", "--url", url, "--json", "--in", "1h")))
    assert out == {"requeued": ["rq"], "not_requeued": ["pending"]}
    job = json.loads(ok(run("show", "rq", "--url", url, "--json")))
    assert job["status"] == "failed_retry" and job["scheduled_at"] is not None
    assert run("requeue", "rq", "--url", url, "--in", "soon").returncode == 2


def test_a_postgres_url_names_its_schema() -> None:
    pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg")
    from jobpool_async import open_backend

    backend = open_backend("postgresql://u@h/db?application_name=x&schema=app_jobs")
    assert backend.schema == "app_jobs"  # type: ignore[attr-defined]
    assert "schema" not in backend._dsn and "application_name=x" in backend._dsn  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="twice"):
        open_backend("postgresql://u@h/db?schema=a", schema="b")
    with pytest.raises(ValueError, match="twice"):
        open_backend("postgresql://u@h/db?schema=a&schema=b")
