"""OpenTelemetry spans: one per enqueue call and one per job run; none, and no import,
without opentelemetry."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from jobpool_async import Config, Job, JobStatus, MemoryBackend, PoolQueue, Worker
from jobpool_async.pytest_plugin import wait_for_status

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the process's provider: set once
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


async def test_one_span_per_enqueue_call_and_per_job_run(spans: InMemorySpanExporter) -> None:
    calls = {"flaky": 0}

    async def process(job: Job) -> bytes:
        if job.id == "flaky":
            calls["flaky"] += 1
            if calls["flaky"] == 1:
                raise RuntimeError("first run fails")
        return b"ok"

    async with PoolQueue(MemoryBackend()) as queue:
        await queue.enqueue_jobs([Job(id="a", job_type="t1"), Job(id="flaky", job_type="t2")])
        await queue.enqueue_job(Job(id="b", job_type="t1"))
        async with Worker(queue, process, assignee_id="w", config=Config(concurrency=2)):
            for job_id in ("a", "b", "flaky"):
                await wait_for_status(queue, job_id, JobStatus.COMPLETED)
    finished = spans.get_finished_spans()
    enqueues = [s for s in finished if s.name == "jobpool.enqueue"]
    assert [s.attributes["jobpool.jobs"] for s in enqueues] == [2, 1]  # type: ignore[index]
    runs = [s for s in finished if s.name == "jobpool.job"]
    by_job = sorted(
        (
            s.attributes["jobpool.job.id"],  # type: ignore[index]
            s.attributes["jobpool.job.attempt"],  # type: ignore[index]
            s.attributes["jobpool.outcome"],  # type: ignore[index]
            s.attributes["jobpool.job.type"],  # type: ignore[index]
        )
        for s in runs
    )
    assert by_job == [
        ("a", 1, "completed", "t1"),
        ("b", 1, "completed", "t1"),
        ("flaky", 1, "failed", "t2"),
        ("flaky", 2, "completed", "t2"),
    ]
    failed = next(s for s in runs if s.attributes["jobpool.outcome"] == "failed")  # type: ignore[index]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.events[0].name == "exception"
    assert all(s.attributes["jobpool.assignee"] == "w" for s in runs)  # type: ignore[index]


async def test_a_cancelled_run_says_so(spans: InMemorySpanExporter) -> None:
    import asyncio

    started = asyncio.Event()

    async def hang(job: Job) -> bytes:
        started.set()
        await asyncio.sleep(60)
        return b""

    async with PoolQueue(MemoryBackend()) as queue:
        await queue.enqueue_job(Job(id="c", job_type="t"))
        async with Worker(queue, hang, assignee_id="w"):
            await asyncio.wait_for(started.wait(), 10)
            await queue.cancel_jobs(job_ids=["c"])
            await wait_for_status(queue, "c", JobStatus.STOPPED)
    (run,) = [s for s in spans.get_finished_spans() if s.name == "jobpool.job"]
    assert run.attributes["jobpool.outcome"] == "cancelled"  # type: ignore[index]


def test_without_opentelemetry_nothing_is_imported_or_wrapped() -> None:
    """With opentelemetry unimportable, the wrappers hand back what they got."""
    script = textwrap.dedent(
        """
        import asyncio, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("blocked for the test")
                return None

        sys.meta_path.insert(0, Block())
        import jobpool_async
        from jobpool_async import _tracing, Job, MemoryBackend, PoolQueue, Worker
        from jobpool_async import PoolQueue as Q

        assert _tracing.trace is None
        assert not [m for m in sys.modules if m.startswith("opentelemetry")]
        assert not hasattr(Q.enqueue_jobs, "__wrapped__"), "enqueue_jobs is not wrapped"

        async def process(job):
            return b""

        async def main():
            async with PoolQueue(MemoryBackend()) as q:
                w = Worker(q, process, assignee_id="w")
                assert w._processor is process, "the processor is not wrapped"
                await q.enqueue_job(Job(id="x", job_type="t"))
        asyncio.run(main())
        print("untraced")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "untraced"


#: How the subprocess scripts below begin: a Worker's processor, a helper that
#: enqueues jobs and waits for them, and every ``get_tracer`` call noted in ``asked``.
_PRELUDE = textwrap.dedent(
    """
    import asyncio
    from opentelemetry import trace
    from jobpool_async import Config, Job, JobStatus, MemoryBackend, PoolQueue, Worker
    from jobpool_async.pytest_plugin import wait_for_status

    asked = []
    real_get_tracer = trace.get_tracer
    trace.get_tracer = lambda *a, **k: asked.append(a) or real_get_tracer(*a, **k)

    async def process(job):
        return b"ok"

    async def run(q, ids):
        await q.enqueue_jobs([Job(id=i, job_type="t") for i in ids])
        for i in ids:
            await wait_for_status(q, i, JobStatus.COMPLETED)
    """
)


def test_no_span_is_made_until_a_provider_is_set() -> None:
    """Without a configured tracer provider (OpenTelemetry's proxy: no-op spans) no
    tracer is asked for a span; once the application sets one, runs are traced."""
    script = _PRELUDE + textwrap.dedent(
        """
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        async def main():
            async with PoolQueue(MemoryBackend()) as q:
                async with Worker(q, process, assignee_id="w", config=Config(concurrency=2)):
                    await run(q, ["a", "b", "c"])
                    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
                    assert asked == [], asked
                    exporter = InMemorySpanExporter()
                    provider = TracerProvider()
                    provider.add_span_processor(SimpleSpanProcessor(exporter))
                    trace.set_tracer_provider(provider)
                    await run(q, ["d", "e"])
            finished = exporter.get_finished_spans()
            names = sorted((s.name, s.attributes.get("jobpool.job.id", "")) for s in finished)
            assert names == [
                ("jobpool.enqueue", ""), ("jobpool.job", "d"), ("jobpool.job", "e")
            ], names

        asyncio.run(main())
        print("traced once set")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "traced once set"


def test_a_provider_named_in_the_environment_later_is_used_from_the_next_call() -> None:
    """``OTEL_PYTHON_TRACER_PROVIDER`` set in ``os.environ`` after the Worker started:
    the next enqueue and job run load that provider and are traced. Before it, with no
    provider at all, OpenTelemetry's ``get_tracer_provider`` (whose environment lookup
    costs ~10k instructions a call) is not called: the test is exact without it."""
    script = _PRELUDE + textwrap.dedent(
        """
        import os
        from opentelemetry.sdk.trace import TracerProvider

        os.environ.pop("OTEL_PYTHON_TRACER_PROVIDER", None)
        looked_up = []
        real_lookup = trace.get_tracer_provider
        trace.get_tracer_provider = lambda: looked_up.append(1) or real_lookup()

        async def main():
            async with PoolQueue(MemoryBackend()) as q:
                async with Worker(q, process, assignee_id="w", config=Config(concurrency=2)):
                    await run(q, ["a", "b", "c"])
                    assert asked == [] and looked_up == [], (asked, looked_up)
                    os.environ["OTEL_PYTHON_TRACER_PROVIDER"] = "sdk_tracer_provider"
                    await run(q, ["d"])
                    assert isinstance(real_lookup(), TracerProvider)
                    assert len(asked) == 2, asked  # the enqueue's span and d's run's

        asyncio.run(main())
        print("traced once named")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "traced once named"
