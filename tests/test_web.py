"""The web dashboard through httpx (in-process ASGI) on every backend."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from jobpool_async import Job, JobStatus, PoolQueue
from jobpool_async.testing import job_in
from jobpool_async.web import create_app

S = JobStatus
BASE = "http://dash.test"


def client(app: Any, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, **kw)


@pytest.fixture
async def web(queue: PoolQueue) -> AsyncIterator[httpx.AsyncClient]:
    async with client(create_app(queue, refresh=0.05)) as c:
        yield c


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page carries the CSRF token"
    return found.group(1)


async def test_overview_counts_every_status_and_tags(
    queue: PoolQueue, web: httpx.AsyncClient
) -> None:
    await queue.enqueue_jobs([Job(id=f"a{i}", job_type="t", tags=["blue"]) for i in range(3)])
    await job_in(queue, S.COMPLETED)
    r = await web.get("/")
    assert r.status_code == 200
    for status in JobStatus:  # iterates the enum: a status added later shows too
        assert f'data-count="{status.value}"' in r.text
    assert 'data-count="initial_pending">3<' in r.text
    assert 'data-count="completed">1<' in r.text
    assert "<td>blue</td>" in r.text
    assert "<svg" in r.text and "Oldest waiting job" in r.text
    data = (await web.get("/api/overview")).json()
    assert data["stats"]["by_status"]["initial_pending"] == 3
    assert data["tags"]["blue"]["total_jobs"] == 3
    assert data["oldest_waiting"] is not None
    assert sum(data["throughput_per_minute"]) == 1


async def test_jobs_filters_paging_and_bad_filters(
    queue: PoolQueue, web: httpx.AsyncClient
) -> None:
    await queue.enqueue_jobs(
        [
            Job(id=f"j{i:02d}", job_type="even" if i % 2 == 0 else "odd", tags=[f"g{i % 3}"])
            for i in range(12)
        ]
    )
    r = await web.get("/jobs", params={"type": "even", "limit": "4"})
    assert r.status_code == 200
    ids = re.findall(r'/jobs/(j\d\d)"', r.text)
    assert len(ids) == 4 and all(int(i[1:]) % 2 == 0 for i in ids)
    nxt = re.search(r'href="([^"]+)" rel="next"', r.text)
    assert nxt
    r2 = await web.get(nxt.group(1).replace("&amp;", "&"))
    more = re.findall(r'/jobs/(j\d\d)"', r2.text)
    assert 'rel="first"' in r2.text and 'rel="first"' not in r.text
    assert len(more) == 2 and not set(more) & set(ids)
    r = await web.get("/jobs", params=[("status", "initial_pending"), ("tag", "g1")])
    assert set(re.findall(r'/jobs/(j\d\d)"', r.text)) == {"j01", "j04", "j07", "j10"}
    fragment = await web.get("/jobs", params={"tag": "g1", "fragment": "1"})
    assert fragment.text.startswith("<table") and "<html" not in fragment.text
    for params in ({"status": "nope"}, {"limit": "0"}, {"limit": "x"}, {"after": "zzz"}):
        bad = await web.get("/jobs", params=params)
        assert bad.status_code == 400, params
        assert "Bad request" in bad.text and "Traceback" not in bad.text


async def test_job_detail_escapes_and_previews(queue: PoolQueue, web: httpx.AsyncClient) -> None:
    evil = "<script>alert(1)</script>"
    await queue.enqueue_jobs(
        [
            Job(id=evil, job_type="<b>t</b>", tags=["<i>x</i>"], job_definition=b'{"a": [1, 2]}'),
            Job(id="bin", job_type="t", job_definition=bytes(range(250, 256)) * 4),
        ]
    )
    r = await web.get("/jobs/" + httpx.URL("/" + evil).raw_path.decode()[1:])
    assert r.status_code == 200
    assert evil not in r.text and "<b>t</b>" not in r.text and "<i>x</i>" not in r.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert "json" in r.text and "&quot;a&quot;: [" in r.text
    listing = await web.get("/jobs")
    assert evil not in listing.text
    r = await web.get("/jobs/bin")
    assert "hex" in r.text and "00000000  fa fb fc fd" in r.text
    assert (await web.get("/jobs/no-such-job")).status_code == 404


async def test_cancel_is_confirmed_then_done_and_reports_moved_jobs(
    queue: PoolQueue, web: httpx.AsyncClient
) -> None:
    await queue.enqueue_jobs([Job(id="c1", job_type="t"), Job(id="c2", job_type="t")])
    done = await job_in(queue, S.COMPLETED)
    page = await web.get("/jobs/c1")
    token = csrf_of(page.text)
    ask = await web.post("/actions/cancel", data={"csrf": token, "id": ["c1", "c2", done]})
    assert ask.status_code == 200 and "Cancel these 3 job(s)?" in ask.text
    assert (await queue.get_job("c1")).status is S.INITIAL_PENDING, "nothing before confirming"
    did = await web.post(
        "/actions/cancel", data={"csrf": token, "id": ["c1", "c2", done], "step": "do"}
    )
    assert did.status_code == 200
    assert "Cancelled 2: c1, c2." in did.text
    assert f"Not cancelled: {done} (completed)." in did.text
    assert (await queue.get_job("c1")).status is S.UNSCHEDULED
    again = await web.post("/actions/delete", data={"csrf": token, "id": ["c1"], "step": "do"})
    assert "Deleted 1 of 1" in again.text
    running = await job_in(queue, S.RUNNING)
    refused = await web.post("/actions/delete", data={"csrf": token, "id": [running], "step": "do"})
    assert f"Deleted nothing: not final (cancel them first): {running} (running)." in refused.text
    assert (await queue.get_job(running)).status is S.RUNNING


async def test_actions_refuse_cross_site_and_missing_token(
    queue: PoolQueue, web: httpx.AsyncClient
) -> None:
    await queue.enqueue_job(Job(id="x", job_type="t"))
    token = csrf_of((await web.get("/jobs/x")).text)
    form = {"csrf": token, "id": "x", "step": "do"}
    evil = await web.post("/actions/cancel", data=form, headers={"Origin": "https://evil.test"})
    assert evil.status_code == 403
    cross = await web.post("/actions/cancel", data=form, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    no_token = await web.post("/actions/cancel", data={"id": "x", "step": "do"})
    assert no_token.status_code == 403
    assert (await queue.get_job("x")).status is S.INITIAL_PENDING
    ok = await web.post("/actions/cancel", data=form, headers={"Origin": BASE})
    assert ok.status_code == 200 and (await queue.get_job("x")).status is S.UNSCHEDULED


async def test_read_only_hides_and_refuses_actions(queue: PoolQueue) -> None:
    await queue.enqueue_job(Job(id="r", job_type="t"))
    async with client(create_app(queue, read_only=True)) as c:
        page = await c.get("/jobs/r")
        assert "read-only" in page.text and "/actions/" not in page.text
        r = await c.post("/actions/cancel", data={"id": "r", "step": "do", "csrf": "x"})
        assert r.status_code == 403
    assert (await queue.get_job("r")).status is S.INITIAL_PENDING


async def test_basic_auth_and_bearer_token(queue: PoolQueue) -> None:
    app = create_app(queue, basic_auth="ann:s3cret", token="tok")
    async with client(app) as c:
        assert (await c.get("/")).status_code == 401
        assert (await c.get("/")).headers["www-authenticate"].startswith("Basic")
        good = base64.b64encode(b"ann:s3cret").decode()
        bad = base64.b64encode(b"ann:wrong").decode()
        assert (await c.get("/", headers={"Authorization": f"Basic {good}"})).status_code == 200
        assert (await c.get("/", headers={"Authorization": f"Basic {bad}"})).status_code == 401
        assert (await c.get("/", headers={"Authorization": "Bearer tok"})).status_code == 200
        assert (await c.get("/metrics", headers={"Authorization": "Bearer no"})).status_code == 401
        assert (await c.get("/healthz")).status_code == 200
        await queue.enqueue_job(Job(id="x/healthz", job_type="t"))
        assert (await c.get("/jobs/x/healthz")).status_code == 401, "only /healthz is open"


async def test_healthz_and_metrics(queue: PoolQueue, web: httpx.AsyncClient) -> None:
    await queue.enqueue_job(Job(id="m1", job_type="t", tags=["red"]))
    await job_in(queue, S.COMPLETED, "m2")
    await job_in(queue, S.FAILED_RETRY, "m3")
    assert (await web.get("/healthz")).text == "ok"
    text = (await web.get("/metrics")).text
    assert 'jobpool_jobs{status="initial_pending"} 1.0' in text
    assert 'jobpool_jobs{status="completed"} 1.0' in text
    assert 'jobpool_jobs_by_tag{status="initial_pending",tag="red"} 1.0' in text
    assert "jobpool_jobs_enqueued_total 3.0" in text
    assert "jobpool_jobs_completed_total 1.0" in text
    assert "jobpool_jobs_failed_total 1.0" in text
    assert 'jobpool_job_processing_seconds_bucket{le="+Inf"} 1.0' in text
    assert "jobpool_job_queue_wait_seconds_count 2.0" in text, "m1 never started"
    await asyncio.sleep(0.06)  # the next snapshot: counted events are not counted again
    text = (await web.get("/metrics")).text
    assert "jobpool_jobs_completed_total 1.0" in text and "jobpool_jobs_enqueued_total 3.0" in text


async def test_workers_page(queue: PoolQueue, web: httpx.AsyncClient) -> None:
    await job_in(queue, S.RUNNING, "w1")
    await job_in(queue, S.CANCELLING, "w2")
    r = await web.get("/workers")
    assert "worker-of-w1" in r.text and "worker-of-w2" in r.text
    leases = await queue.list_workers()
    if leases:  # the backend keeps leases: each shows, live while renewed
        assert {lease.assignee_id for lease in leases} >= {"worker-of-w1", "worker-of-w2"}
        assert r.text.count('data-lease="live"') >= 2


async def test_twenty_watchers_share_one_read_per_second(queue: PoolQueue) -> None:
    """20 browsers polling the overview: the store is read at most once per refresh."""
    calls = 0
    real = queue.get_job_stats

    async def counting(tags: Any = None) -> Any:
        nonlocal calls
        if not tags:
            calls += 1
        return await real(tags)

    queue.get_job_stats = counting  # type: ignore[method-assign]
    app = create_app(queue, refresh=1.0)
    loop = asyncio.get_running_loop()
    async with client(app) as c:
        start = loop.time()

        async def watcher() -> int:
            n = 0
            while loop.time() - start < 2.5:
                assert (await c.get("/", params={"fragment": "1"})).status_code == 200
                n += 1
                await asyncio.sleep(0.02)
            return n

        views = sum(await asyncio.gather(*(watcher() for _ in range(20))))
    assert views > 200, "the watchers did poll"
    assert 1 <= calls <= 3, f"{calls} store reads for {views} views in 2.5 s"


async def test_an_action_on_everything_a_filter_matches(
    queue: PoolQueue, web: httpx.AsyncClient
) -> None:
    await queue.enqueue_jobs(
        [Job(id=f"f{i:03d}", job_type="t", tags=["sel" if i % 2 else "other"]) for i in range(130)]
    )
    page = await web.get("/jobs", params={"tag": "sel", "limit": "10"})
    assert 'id="matching"' in page.text and "Cancel all matching" in page.text
    token = csrf_of(page.text)
    form = {"csrf": token, "scope": "filter", "tag": "sel", "action": "cancel", "step": "confirm"}
    ask = await web.post("/actions/selected", data=form)
    assert "Cancel these 65 job(s)?" in ask.text, "every matching job, not only the page's 10"
    ids = re.findall(r'name="id" value="([^"]+)"', ask.text)
    assert len(ids) == 65
    did = await web.post("/actions/cancel", data={"csrf": token, "id": ids, "step": "do"})
    assert "Cancelled 65:" in did.text
    stats = await queue.get_job_stats(["sel"])
    assert stats.by_status[S.UNSCHEDULED] == 65
    assert (await queue.get_job_stats(["other"])).by_status[S.INITIAL_PENDING] == 65
    nothing = await web.post("/actions/selected", data={**form, "tag": "none"})
    assert nothing.status_code == 400 and "none match" in nothing.text


async def test_requeue_action(queue: PoolQueue, web: httpx.AsyncClient) -> None:
    stopped = await job_in(queue, S.STOPPED)
    page = await web.get(f"/jobs/{stopped}")
    assert "Requeue" in page.text
    token = csrf_of(page.text)
    did = await web.post(
        "/actions/requeue", data={"csrf": token, "id": [stopped, "nope"], "step": "do"}
    )
    assert f"Requeued 1: {stopped}." in did.text and "nope (no such job)" in did.text
    assert (await queue.get_job(stopped)).status is S.FAILED_RETRY


async def test_mounted_in_another_app(queue: PoolQueue) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    await queue.enqueue_job(Job(id="m", job_type="t"))
    outer = Starlette(routes=[Mount("/ops", app=create_app(queue, token="t"))])
    async with client(outer) as c:
        assert (await c.get("/ops/healthz")).status_code == 200
        assert (await c.get("/ops/jobs")).status_code == 401
        page = await c.get("/ops/jobs", headers={"Authorization": "Bearer t"})
        assert page.status_code == 200 and 'href="/ops/jobs/m"' in page.text
        detail = await c.get("/ops/jobs/m", headers={"Authorization": "Bearer t"})
        assert detail.status_code == 200 and 'action="/ops/actions/cancel"' in detail.text
