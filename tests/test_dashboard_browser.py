"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

The dashboard runs as ``jobpool dashboard`` in its own process on a SQLite store
that this test also opens; the test enqueues a job and watches the overview's
count change without a reload, filters the job list, opens a job, cancels it
through the UI and finds it UNSCHEDULED in the store. Screenshots of each page go
to the test's tmp dir; with ``JOBPOOL_UPDATE_SCREENSHOT=1`` the overview's is also
written to ``docs/dashboard.png`` (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from jobpool_async import Job, JobStatus, PoolQueue
from jobpool_async.backends.sqlite import SQLiteBackend

CHROMIUM = os.environ.get("JOBPOOL_CHROMIUM", "/usr/bin/chromium")
DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A ``jobpool dashboard`` process on a fresh SQLite store: (base URL, store path)."""
    db = tmp_path / "dash.db"
    port = free_port()
    jobpool = shutil.which("jobpool", path=str(Path(sys.executable).parent))
    assert jobpool
    proc = subprocess.Popen(
        [jobpool, "dashboard", "--url", f"sqlite:///{db}", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the dashboard did not come up"
            time.sleep(0.1)
        yield base, db
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _fill(queue: PoolQueue) -> None:
    """A store with some history, so the pages (and the screenshot) show something."""
    jobs = [
        Job(
            id=f"report-{i:03d}",
            job_type="report",
            tags=["red" if i % 3 else "blue"],
            job_definition=b'{"pages": %d}' % i,
        )
        for i in range(24)
    ]
    await queue.enqueue_jobs(jobs)
    async with queue.stream_jobs("browser-test-worker", max_assigned_jobs=14) as stream:
        batch = await stream.__anext__()
    await queue.complete_jobs({j.id: b"ok" for j in batch[:9]})
    await queue.fail_jobs({j.id: "upstream timed out" for j in batch[9:12]})


async def test_the_dashboard_in_chromium(dashboard: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    base, db = dashboard
    shots = tmp_path / "shots"
    shots.mkdir()
    async with PoolQueue(SQLiteBackend(db)) as queue, async_playwright() as pw:
        await _fill(queue)
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            await page.goto(base + "/")
            pending = page.locator('[data-count="initial_pending"]')
            before = int(await pending.inner_text())
            await queue.enqueue_job(Job(id="live-one", job_type="mail", tags=["red"]))
            # no reload: the page's polling brings the new count
            await expect(pending).to_have_text(str(before + 1), timeout=10_000)
            await page.screenshot(path=shots / "overview.png", full_page=True)
            if os.environ.get("JOBPOOL_UPDATE_SCREENSHOT") == "1":
                await page.screenshot(path=DOCS_SHOT, full_page=True)

            await page.click("header >> text=Jobs")
            await page.fill('#filters input[name="type"]', "mail")
            await page.click("#filters button")
            await expect(page).to_have_url(f"{base}/jobs?tag=&type=mail&limit=50")
            rows = page.locator("#jobs tr td a")
            await expect(rows).to_have_count(1)
            await page.screenshot(path=shots / "jobs.png", full_page=True)

            await rows.first.click()
            await expect(page.locator("h1")).to_have_text("Job live-one")
            await expect(page.locator('[data-field="status"]')).to_have_text("initial_pending")
            await page.screenshot(path=shots / "job.png", full_page=True)

            await page.click("text=Cancel")
            await expect(page.locator("h1")).to_have_text("Confirm: Cancel")
            await page.screenshot(path=shots / "confirm.png", full_page=True)
            await page.click("#confirm")
            await expect(page.locator("#outcome")).to_contain_text("Cancelled 1: live-one.")
            await page.screenshot(path=shots / "done.png", full_page=True)
        finally:
            await browser.close()
        job = await queue.get_job("live-one")
        assert job.status is JobStatus.UNSCHEDULED
        assert job.finalized_at is not None and job.finalized_at - job.created_at < timedelta(
            minutes=5
        )
    for name in ("overview", "jobs", "job", "confirm", "done"):
        assert (shots / f"{name}.png").stat().st_size > 1000, name
