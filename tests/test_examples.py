"""Every example and the demo run as written (as subprocesses), and the ASGI service in-process."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 90


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBPOOL_")}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize(
    "name",
    ["basics.py", "basics.py leveldb", "worker.py", "asgi_service.py"],
)
def test_example_runs_as_written(name: str, tmp_path: Path) -> None:
    script, *args = name.split()
    result = run(str(EXAMPLES / script), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r": OK$", result.stdout.strip()), result.stdout
    # The only tracebacks: the Worker's WARNING for each (planned) processor failure.
    failures = re.findall(r"job '[^']*' \([^)]*\) failed: ", result.stderr)
    assert result.stderr.count("Traceback") == len(failures), result.stderr
    assert list(tmp_path.iterdir()) == []  # examples clean up after themselves


def test_worker_example_shows_retries_and_a_cancellation(tmp_path: Path) -> None:
    result = run(str(EXAMPLES / "worker.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nightly-export: cancelled while running" in result.stdout
    assert "nightly-export: STOPPED" in result.stdout
    assert re.search(r"completed after \d+ retries", result.stdout)


def _table_counts(stdout: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^([A-Z_]+|total)\s+(\d+)$", stdout, re.M)}


def test_the_demo(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    result = run("-m", "jobpool_async", "demo", "--jobs", "400", "--db", str(db))
    assert result.returncode == 0, result.stdout + result.stderr
    counts = _table_counts(result.stdout)
    assert counts["total"] == 400
    assert counts["COMPLETED"] == 392 and counts["STOPPED"] == 3 and counts["UNSCHEDULED"] == 5
    assert counts["RUNNING"] == counts["FAILED_RETRY"] == counts["INITIAL_PENDING"] == 0
    retries = int(re.search(r"^retries\s+(\d+)$", result.stdout, re.M)[1])  # type: ignore[index]
    assert retries > 0
    assert re.search(r"^throughput\s+\d+ completed jobs/s$", result.stdout, re.M)
    assert "processed 400/400 (100.0%)" in result.stderr  # the progress line
    assert db.exists()
    # a second run on the same file counts only its own jobs
    again = run("-m", "jobpool_async", "demo", "--jobs", "50", "--db", str(db), "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    assert _table_counts(again.stdout)["total"] == 50
    assert again.stderr == ""


def test_the_demo_defaults_to_a_temporary_file(tmp_path: Path) -> None:
    result = run(
        "-m",
        "jobpool_async",
        "demo",
        "--jobs",
        "60",
        "--workers",
        "1",
        "--concurrency",
        "3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 worker(s) x 3 slots" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_demo_rejects_bad_arguments() -> None:
    result = run("-m", "jobpool_async", "demo", "--jobs", "3")
    assert result.returncode == 2
    assert "--jobs must be at least" in result.stderr


# --- the ASGI service, in-process -----------------------------------------------------------


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["memory", "sqlite"])
async def client(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    service = _load("asgi_service")
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/service.db"
    app = service.create_app(url, concurrency=2)
    # httpx's ASGITransport does not run the lifespan: drive it here.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


async def _final(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Poll the status endpoint with a deadline until the job is final."""
    async with asyncio.timeout(10):
        while True:
            body: dict[str, Any] = (await client.get(f"/jobs/{job_id}")).json()
            if body["status"] in ("completed", "stopped", "unscheduled", "unknown_stopped"):
                return body
            await asyncio.sleep(0.01)


async def test_the_service_runs_jobs(client: httpx.AsyncClient) -> None:
    created = [
        (await client.post("/jobs", json={"text": text, "tags": ["t"]}))
        for text in ("a", "flaky b")
    ]
    assert [r.status_code for r in created] == [201, 201]
    first = await _final(client, created[0].json()["id"])
    second = await _final(client, created[1].json()["id"])
    assert first["status"] == "completed" and first["result"] == "A"
    assert first["retry_count"] == 0 and first["tags"] == ["t"]
    assert second["status"] == "completed" and second["result"] == "FLAKY B"
    assert second["retry_count"] == 1
    assert second["error_message"] == "flaky upstream, try again"
    stats = (await client.get("/stats")).json()
    assert stats["completed"] == 2 and sum(stats.values()) == 2


async def test_the_service_rejects_bad_requests(client: httpx.AsyncClient) -> None:
    assert (await client.get("/jobs/nope")).status_code == 404
    assert (await client.post("/jobs", content=b"{not json")).status_code == 400
    assert (await client.post("/jobs", json={"tags": []})).status_code == 400
    bad_tags = await client.post("/jobs", json={"text": "x", "tags": [""]})
    assert bad_tags.status_code == 400 and "tag" in bad_tags.json()["error"]
    assert (await client.get("/stats")).json()["initial_pending"] == 0


async def test_the_service_cancel_endpoint(client: httpx.AsyncClient) -> None:
    job_id = (await client.post("/jobs", json={"text": "done soon"})).json()["id"]
    assert (await _final(client, job_id))["status"] == "completed"
    assert (await client.post(f"/jobs/{job_id}/cancel")).json() == {"cancelled": False}
    assert (await client.post("/jobs/unknown/cancel")).json() == {"cancelled": False}


# --- the example project: an app whose lifespan builds its queue, and its tests ------------

PROJECT = EXAMPLES / "service_project"


@pytest.mark.parametrize(
    "options",
    [
        [],  # the project's own setting: pytest-asyncio strict mode, memory backend
        ["-o", "asyncio_mode=auto", "--jobpool-backend=sqlite"],
    ],
    ids=["strict", "auto-sqlite"],
)
def test_the_example_projects_tests_pass(options: list[str]) -> None:
    """Run as its user would: pytest started in the project's directory, with its config."""
    result = run("-m", "pytest", "-q", "-p", "no:cacheprovider", *options, cwd=PROJECT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^4 passed", result.stdout, re.M), result.stdout
    assert not list(PROJECT.glob("*.db*"))  # the tests never touched the app's own store


# --- the README's quickstart -------------------------------------------------------------


def _readme_block(after_heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(after_heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, f"no python block after {after_heading!r}"
    return match[1]


def test_the_readme_quickstart_runs_twice_as_written(tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(_readme_block("## Quickstart"))
    outputs = []
    for _ in range(2):
        result = run(str(script), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout)
    assert "id='job-0'" in outputs[0] and "COMPLETED" in outputs[0]
    assert [p.name for p in tmp_path.iterdir()] == ["quickstart.py"]


# --- the FastAPI service on PostgreSQL: an order and its job in one transaction -------------


def test_the_fastapi_orders_example_runs_as_written() -> None:
    from .backends import postgres_dsn

    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBPOOL_")}
    env["DATABASE_URL"] = postgres_dsn()
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "fastapi_orders.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "order teapot: shipped, its job completed" in result.stdout
    assert "rolled back -> HTTP 422" in result.stdout
    assert result.stdout.strip().endswith("fastapi_orders: OK")


async def test_an_order_and_its_job_commit_or_roll_back_together() -> None:
    from jobpool_async.backends.registry import drop_postgres_schema

    from .backends import new_schema_name, postgres_dsn

    dsn, schema = postgres_dsn(), new_schema_name()
    example = _load("fastapi_orders")
    shop = example.create_app(dsn, schema)
    try:
        async with (
            shop.router.lifespan_context(shop),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=shop), base_url="http://t") as c,
        ):
            order_id = (await c.post("/orders", json={"item": "kettle"})).json()["id"]
            body = await example.shipped(c, order_id)
            assert body == {"item": "kettle", "status": "shipped", "job": "completed"}
            declined = await c.post("/orders", json={"item": "rollback"})
            assert declined.status_code == 422
            queue = shop.state.queue
            assert (await queue.get_job_stats()).total_jobs == 1
            rows = await shop.state.pool.fetch(f'SELECT id FROM "{schema}".orders')
            assert [r["id"] for r in rows] == [order_id]
    finally:
        for name in (schema, f"{schema}_jobs"):
            await drop_postgres_schema(dsn, name)
