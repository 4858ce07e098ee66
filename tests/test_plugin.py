"""The pytest plugin, used as a user would: inner test suites run with ``pytester``."""

from __future__ import annotations

import os

import pytest

from jobpool_async.pytest_plugin import POSTGRES_DSN_ENV

pytest_plugins = ["pytester"]

# Hypothesis's plugin re-imports hypothesis in every in-process run (seconds each); the
# inner suites do not use it.
AUTO_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
addopts = -p no:hypothesispytest
"""


@pytest.fixture
def auto(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(AUTO_INI)
    return pytester


BACKEND_PROBE = """
import pytest
from jobpool_async import Job, JobStatus, PoolQueue

async def test_probe(jobpool_backend, jobpool_queue, jobpool_wait_for_status, tmp_path):
    assert isinstance(jobpool_queue, PoolQueue)
    assert jobpool_queue.backend is jobpool_backend
    print("BACKEND=" + type(jobpool_backend).__name__)
    print("IN_TMP=" + str(any(tmp_path.iterdir())))
    await jobpool_queue.enqueue_job(Job(id="a", job_type="t"))
    async with jobpool_queue.stream_jobs("w") as stream:
        [job] = await stream.__anext__()
    await jobpool_queue.complete_job(job.id, b"ok")
    done = await jobpool_wait_for_status(jobpool_queue, "a", JobStatus.COMPLETED, timeout=5)
    assert done.result == b"ok"
"""


def test_memory_is_the_default(auto: pytest.Pytester) -> None:
    auto.makepyfile(test_probe=BACKEND_PROBE)
    result = auto.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*BACKEND=MemoryBackend*", "*IN_TMP=False*"])


@pytest.mark.parametrize(
    ("name", "cls"), [("sqlite", "SQLiteBackend"), ("leveldb", "LevelDBBackend")]
)
def test_the_command_line_option_chooses_an_embedded_backend_in_tmp_path(
    auto: pytest.Pytester, name: str, cls: str
) -> None:
    auto.makepyfile(test_probe=BACKEND_PROBE)
    result = auto.runpytest("-s", f"--jobpool-backend={name}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*BACKEND={cls}*", "*IN_TMP=True*"])


def test_a_marker_overrides_the_option(auto: pytest.Pytester) -> None:
    auto.makepyfile(
        """
        import pytest

        @pytest.mark.jobpool_backend("sqlite")
        async def test_marked(jobpool_backend):
            assert type(jobpool_backend).__name__ == "SQLiteBackend"

        async def test_unmarked(jobpool_backend):
            assert type(jobpool_backend).__name__ == "LevelDBBackend"
        """
    )
    result = auto.runpytest("--jobpool-backend=leveldb", "--strict-markers")
    result.assert_outcomes(passed=2)


def test_the_marker_and_option_are_registered(auto: pytest.Pytester) -> None:
    result = auto.runpytest("--markers")
    result.stdout.fnmatch_lines(["*@pytest.mark.jobpool_backend(name)*"])
    result = auto.runpytest("--help")
    result.stdout.fnmatch_lines(["*--jobpool-backend=*memory,sqlite,leveldb,postgres*"])


def test_bad_backend_names_are_usage_errors(auto: pytest.Pytester) -> None:
    result = auto.runpytest("--jobpool-backend=redis")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*invalid choice*redis*"])
    auto.makepyfile(
        """
        import pytest

        @pytest.mark.jobpool_backend("redis")
        async def test_marked(jobpool_backend):
            pass
        """
    )
    result = auto.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown jobpool backend 'redis'*"])


def test_postgres_is_skipped_with_a_reason_without_a_dsn(
    auto: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(POSTGRES_DSN_ENV, raising=False)
    auto.makepyfile(test_probe=BACKEND_PROBE)
    result = auto.runpytest("-rs", "--jobpool-backend=postgres")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"*needs a server: set {POSTGRES_DSN_ENV}*"])


def test_postgres_runs_in_a_schema_of_its_own(auto: pytest.Pytester) -> None:
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    if not dsn:
        pytest.skip(f"no PostgreSQL server configured: set {POSTGRES_DSN_ENV}")
    auto.makepyfile(test_probe=BACKEND_PROBE)
    auto.makepyfile(
        test_schema=f"""
        import asyncpg

        SCHEMAS = []

        async def test_uses_a_fresh_schema(jobpool_queue):
            SCHEMAS.append(jobpool_queue.backend.schema)
            assert SCHEMAS[0].startswith("jobpool_test_")

        async def test_schema_was_dropped():
            conn = await asyncpg.connect({dsn!r})
            try:
                found = await conn.fetchval(
                    "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1",
                    SCHEMAS[0],
                )
            finally:
                await conn.close()
            assert found == 0
        """
    )
    result = auto.runpytest("-s", "-p", "no:randomly", "--jobpool-backend=postgres")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*BACKEND=PostgresBackend*"])


def test_the_queue_is_closed_after_the_test(auto: pytest.Pytester) -> None:
    auto.makepyfile(
        """
        SEEN = []

        async def test_one(jobpool_queue):
            SEEN.append(jobpool_queue)
            assert not jobpool_queue.closed

        def test_two():
            assert SEEN[0].closed
        """
    )
    auto.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


def test_wait_for_status_times_out_clearly(auto: pytest.Pytester) -> None:
    auto.makepyfile(
        """
        import pytest
        from jobpool_async import Job, JobStatus
        from jobpool_async.pytest_plugin import JobStatusTimeout

        async def test_timeout(jobpool_queue, jobpool_wait_for_status):
            await jobpool_queue.enqueue_job(Job(id="a", job_type="t"))
            with pytest.raises(AssertionError) as info:
                await jobpool_wait_for_status(
                    jobpool_queue, "a", [JobStatus.COMPLETED, JobStatus.STOPPED], timeout=0.05
                )
            assert isinstance(info.value, TimeoutError)
            assert isinstance(info.value, JobStatusTimeout)
            assert str(info.value) == (
                "job 'a' did not reach COMPLETED or STOPPED within 0.05 s; it is INITIAL_PENDING"
            )
            with pytest.raises(TimeoutError, match="it does not exist"):
                await jobpool_wait_for_status(
                    jobpool_queue, "nope", JobStatus.RUNNING, timeout=0.01
                )
        """
    )
    auto.runpytest().assert_outcomes(passed=1)


def test_a_worker_in_a_users_test(auto: pytest.Pytester) -> None:
    auto.makepyfile(
        """
        from jobpool_async import Config, Job, JobStatus, Worker

        async def process(job):
            if job.retry_count == 0 and job.id == "flaky":
                raise RuntimeError("first try fails")
            return job.job_definition.upper()

        async def test_worker(jobpool_queue, jobpool_wait_for_status):
            await jobpool_queue.enqueue_jobs(
                [Job(id="a", job_type="t", job_definition=b"abc"), Job(id="flaky", job_type="t")]
            )
            config = Config(concurrency=2)
            async with Worker(jobpool_queue, process, assignee_id="w", config=config):
                done = await jobpool_wait_for_status(jobpool_queue, "a", JobStatus.COMPLETED)
                flaky = await jobpool_wait_for_status(jobpool_queue, "flaky", JobStatus.COMPLETED)
            assert done.result == b"ABC"
            assert flaky.retry_count == 1
        """
    )
    auto.runpytest("--jobpool-backend=sqlite").assert_outcomes(passed=1)


def test_strict_mode_works_too(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = strict
        asyncio_default_fixture_loop_scope = function
        addopts = -p no:hypothesispytest
        """
    )
    pytester.makepyfile(
        """
        import pytest
        from jobpool_async import Job

        @pytest.mark.asyncio
        async def test_strict(jobpool_queue):
            assert await jobpool_queue.enqueue_job(Job(id="a", job_type="t")) == "a"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)
