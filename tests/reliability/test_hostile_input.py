"""Hostile input: odd ids, tags and payloads round-trip exactly or are rejected cleanly.

"Rejected cleanly" means ``ValueError``/``TypeError`` raised before anything is
written: every such test compares a full snapshot of the store before and after.
Nothing stored is ever deserialised into code (no pickle, eval or exec).
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import random
import tokenize
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import jobpool_async
from jobpool_async import Job, JobStats, JobStatus, PoolQueue

from ..backends import BACKENDS, BackendFactory
from .conftest import LoopRunner, hypothesis_settings, scaled

# --- strategies ------------------------------------------------------------------------

#: Any Unicode scalar value except NUL (surrogates are not text: tested separately).
any_char = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
TRICKY = [
    "a",
    "b",
    "a,b",
    "a|b",
    "a:b",
    "a/b",
    "a;b",
    "a b",
    " a",
    "a ",
    "A",
    "%",
    "_",
    "a%",
    "*",
    "'",
    '"',
    "''",
    "\\",
    "\\'",
    "[a]",
    "{a}",
    "(a)",
    "null",
    "NULL",
    "None",
    "a\nb",
    "a\tb",
    "\u00e4",
    "a\u0308",  # the same letter decomposed: must stay distinct from "\u00e4"
    "\u202eevil",
    "🙂",
    "\x7f",
    "\x01",
    "-- ",
    "'; DROP TABLE jobs; --",
    "$1",
    "?",
]
tricky_text = st.one_of(
    st.sampled_from(TRICKY),
    st.text(any_char, min_size=1, max_size=40),
    st.text(st.sampled_from("/:|,'\"\\%_ "), min_size=1, max_size=6),
)
ids = tricky_text
tags = tricky_text
payloads = st.binary(max_size=4096)
messages = st.one_of(st.just(""), tricky_text)


# --- helpers ---------------------------------------------------------------------------


async def snapshot(queue: PoolQueue, job_ids: list[str]) -> tuple[list[Job], JobStats]:
    """Every given job as stored, plus the global stats: equal before and after a
    rejected call means the call wrote nothing."""
    return await queue.get_jobs(job_ids), await queue.get_job_stats()


def same_tags(stored: list[str], given: list[str]) -> None:
    assert len(stored) == len(set(stored)), f"duplicate tags came back: {stored!r}"
    assert sorted(stored) == sorted(set(given)), (stored, given)


async def _first_batch(queue: PoolQueue, assignee: str, tags: list[str]) -> list[Job]:
    async with queue.stream_jobs(assignee, tags=tags, max_assigned_jobs=1) as stream:
        return await asyncio.wait_for(stream.__anext__(), 10)


# --- round trips -----------------------------------------------------------------------


@pytest.mark.timeout(scaled(120, 3600))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_hostile_values_round_trip(backend_name: str, tmp_path: Path) -> None:
    """Ids, job types, tags, payloads, messages and results come back exactly; claims,
    stats, cancel and delete find the job by such ids and tags."""
    runner = LoopRunner(backend_name, tmp_path)
    queue = runner.new_queue()
    try:

        @hypothesis_settings()
        @given(
            job_id=ids,
            job_type=st.one_of(st.just(""), tricky_text),
            job_tags=st.lists(tags, max_size=4),
            payload=payloads,
            message=tricky_text,
            result=payloads,
        )
        def check(
            job_id: str,
            job_type: str,
            job_tags: list[str],
            payload: bytes,
            message: str,
            result: bytes,
        ) -> None:
            created = datetime(2001, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
            job = Job(job_id, job_type, payload, list(job_tags), created_at=created)
            runner.run(_round_trip(queue, job, message, result))

        check()
    finally:
        runner.close()


async def _round_trip(queue: PoolQueue, job: Job, message: str, result: bytes) -> None:
    assert await queue.enqueue_job(job) == job.id
    stored = await queue.get_job(job.id)
    assert (stored.id, stored.job_type, stored.job_definition, stored.created_at) == (
        job.id,
        job.job_type,
        job.job_definition,
        job.created_at,
    )
    same_tags(stored.tags, job.tags)
    for tag in set(job.tags):
        assert (await queue.get_job_stats([tag])).total_jobs == 1, f"stats by tag {tag!r}"
    assert [j.id for j in await queue.get_jobs([job.id, job.id + "-missing"])] == [job.id]

    # Claim by its own (hostile) tags and assignee id, fail with a hostile message.
    assignee = job.id
    batch = await _first_batch(queue, assignee, job.tags)
    assert [j.id for j in batch] == [job.id]
    await queue.fail_job(job.id, message)
    failed = await queue.get_job(job.id)
    assert (failed.error_message, failed.assignee_id) == (message, assignee)

    batch = await _first_batch(queue, assignee, job.tags)
    assert [j.id for j in batch] == [job.id]
    await queue.complete_job(job.id, result)
    done = await queue.get_job(job.id)
    assert (done.status, done.result, done.error_message) == (JobStatus.COMPLETED, result, message)

    outcome = await queue.cancel_jobs(job_ids=[job.id])
    assert (outcome.cancelled, outcome.unknown) == ([], [job.id])
    if job.tags:
        assert await queue.delete_jobs(tags=job.tags) == 1
    else:
        assert await queue.delete_jobs(job_ids=[job.id]) == 1
    assert await queue.get_jobs([job.id]) == []


@pytest.mark.timeout(scaled(120, 3600))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_tag_filters_match_exactly(backend_name: str, tmp_path: Path) -> None:
    """Separators, wildcards and quotes in tags never widen or narrow a match:
    stats and cancel by tags select exactly the jobs having every filter tag."""
    runner = LoopRunner(backend_name, tmp_path)
    queue = runner.new_queue()
    counter = iter(range(10**9))
    try:

        @hypothesis_settings()
        @given(
            job_tags=st.lists(
                st.lists(st.sampled_from(TRICKY), max_size=3), min_size=1, max_size=8
            ),
            wanted=st.lists(st.sampled_from(TRICKY), min_size=1, max_size=2),
        )
        def check(job_tags: list[list[str]], wanted: list[str]) -> None:
            prefix = f"e{next(counter)}-"
            jobs = [Job(f"{prefix}{n}", "t", tags=t) for n, t in enumerate(job_tags)]
            expected = {j.id for j in jobs if set(wanted) <= set(j.tags)}
            runner.run(_check_filter(queue, jobs, wanted, expected))

        check()
    finally:
        runner.close()


async def _check_filter(
    queue: PoolQueue, jobs: list[Job], wanted: list[str], expected: set[str]
) -> None:
    await queue.enqueue_jobs(jobs)
    assert (await queue.get_job_stats(wanted)).total_jobs == len(expected)
    outcome = await queue.cancel_jobs(tags=wanted)
    assert set(outcome.cancelled) == expected and outcome.unknown == []
    statuses = {j.id: j.status for j in await queue.get_jobs([j.id for j in jobs])}
    for job_id, status in statuses.items():
        assert (status is JobStatus.UNSCHEDULED) == (job_id in expected), (job_id, status)
    await queue.cancel_jobs(job_ids=[j.id for j in jobs])
    assert await queue.delete_jobs(job_ids=[j.id for j in jobs]) == len(jobs)


async def test_very_long_ids_tags_and_types(queue: PoolQueue) -> None:
    """10 000-character ids, tags and job types (beyond typical index-key limits)."""
    rng = random.Random(7)
    long_text = "".join(
        chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0xD7FF)])) for _ in range(10_000)
    )
    job_id, tag = "id:" + long_text, "tag:" + long_text
    other = "id2:" + long_text  # shares a 10 000-character suffix with job_id
    await queue.enqueue_jobs(
        [Job(job_id, long_text, tags=[tag]), Job(other, "t", tags=[tag + "x"])]
    )
    stored = await queue.get_job(job_id)
    assert (stored.id, stored.job_type, stored.tags) == (job_id, long_text, [tag])
    assert (await queue.get_job_stats([tag])).total_jobs == 1
    batch = await _first_batch(queue, long_text, [tag])
    assert [j.id for j in batch] == [job_id]
    await queue.complete_job(job_id, b"ok")
    assert await queue.delete_jobs(job_ids=[job_id]) == 1
    assert [j.id for j in await queue.get_jobs([job_id, other])] == [other]


async def test_ten_megabyte_payloads_round_trip(queue: PoolQueue) -> None:
    payload, result = os.urandom(10 * 2**20), os.urandom(10 * 2**20)
    await queue.enqueue_job(Job("big", "t", payload))
    assert (await queue.get_job("big")).job_definition == payload
    batch = await _first_batch(queue, "w", [])
    assert batch[0].job_definition == payload
    await queue.complete_job("big", result)
    stored = await queue.get_job("big")
    assert (stored.job_definition, stored.result) == (payload, result)


async def test_empty_and_binary_results_round_trip(queue: PoolQueue) -> None:
    """``b""`` stays ``b""`` (not ``None``); NUL and high bytes survive."""
    await queue.enqueue_jobs([Job("empty", "t", b""), Job("bin", "t", bytes(range(256)))])
    await _first_batch(queue, "w", [])
    await _first_batch(queue, "w", [])
    await queue.complete_jobs({"empty": b"", "bin": bytes(range(256))[::-1]})
    empty, binary = await queue.get_jobs(["empty", "bin"])
    assert (empty.job_definition, empty.result) == (b"", b"")
    assert (binary.job_definition, binary.result) == (bytes(range(256)), bytes(range(256))[::-1])


# --- rejections ------------------------------------------------------------------------

_NAIVE = datetime(2024, 1, 1)
BAD_CALLS: dict[str, Callable[[PoolQueue], Awaitable[object]]] = {
    "empty id": lambda q: q.enqueue_job(Job("", "t")),
    "int id": lambda q: q.enqueue_job(Job(7, "t")),  # type: ignore[arg-type]
    "bytes id": lambda q: q.enqueue_job(Job(b"x", "t")),  # type: ignore[arg-type]
    "NUL id": lambda q: q.enqueue_job(Job("a\x00b", "t")),
    "NUL tag": lambda q: q.enqueue_job(Job("n", "t", tags=["a\x00"])),
    "empty tag": lambda q: q.enqueue_job(Job("n", "t", tags=[""])),
    "int tag": lambda q: q.enqueue_job(Job("n", "t", tags=[1])),  # type: ignore[list-item]
    "None tag": lambda q: q.enqueue_job(Job("n", "t", tags=[None])),  # type: ignore[list-item]
    "tags as str": lambda q: q.enqueue_job(Job("n", "t", tags="abc")),  # type: ignore[arg-type]
    "str payload": lambda q: q.enqueue_job(Job("n", "t", "text")),  # type: ignore[arg-type]
    "bytearray payload": lambda q: q.enqueue_job(Job("n", "t", bytearray(b"x"))),  # type: ignore[arg-type]
    "naive created_at": lambda q: q.enqueue_job(Job("n", "t", created_at=_NAIVE)),
    "status on enqueue": lambda q: q.enqueue_job(Job("n", "t", status=JobStatus.RUNNING)),
    "bad job mid-batch": lambda q: q.enqueue_jobs(
        [Job("n1", "t"), Job("n2", "t", tags=[""]), Job("n3", "t")]
    ),
    "non-job in batch": lambda q: q.enqueue_jobs([Job("n1", "t"), "n2"]),  # type: ignore[list-item]
    "jobs as a job": lambda q: q.enqueue_jobs(Job("n1", "t")),  # type: ignore[arg-type]
    "str result": lambda q: q.complete_job("held", "done"),  # type: ignore[arg-type]
    "str result in batch": lambda q: q.complete_jobs({"held": b"x", "held2": "y"}),  # type: ignore[dict-item]
    "empty fail message": lambda q: q.fail_job("held", ""),
    "empty fail message in batch": lambda q: q.fail_jobs({"held": "x", "held2": ""}),
    "bytes message": lambda q: q.stop_job("held", b"x"),  # type: ignore[arg-type]
    "None message in batch": lambda q: q.stop_jobs({"held": None}),  # type: ignore[dict-item]
    "int id in batch": lambda q: q.complete_jobs({"held": b"x", 3: b"y"}),  # type: ignore[dict-item]
    "ack not bool": lambda q: q.acknowledge_cancellation({"held": 1}),  # type: ignore[dict-item]
    "list as mapping": lambda q: q.complete_jobs(["held"]),  # type: ignore[arg-type]
    "unknown status": lambda q: q.update_job_status("held", "done"),  # type: ignore[arg-type]
    "cancel with nothing": lambda q: q.cancel_jobs(),
    "cancel with empties": lambda q: q.cancel_jobs(tags=[], job_ids=[]),
    "cancel ids as str": lambda q: q.cancel_jobs(job_ids="held"),
    "cancel empty id": lambda q: q.cancel_jobs(job_ids=["held", ""]),
    "delete with nothing": lambda q: q.delete_jobs(),
    "delete NUL tag": lambda q: q.delete_jobs(tags=["x\x00"]),
    "zero ttl": lambda q: q.cleanup_expired_jobs(timedelta(0)),
    "negative ttl": lambda q: q.cleanup_expired_jobs(timedelta(days=-1)),
    "int ttl": lambda q: q.cleanup_expired_jobs(3600),  # type: ignore[arg-type]
    "empty assignee": lambda q: q.mark_worker_unresponsive(""),
    "get empty id": lambda q: q.get_job(""),
    "get ids as str": lambda q: q.get_jobs("held"),
    "stats tags as str": lambda q: q.get_job_stats("a"),
}


async def _bad_stream(queue: PoolQueue, **kwargs: Any) -> None:
    queue.stream_jobs(**kwargs)


BAD_STREAMS: dict[str, dict[str, Any]] = {
    "empty assignee": {"assignee_id": ""},
    "NUL assignee": {"assignee_id": "a\x00"},
    "zero slots": {"assignee_id": "w", "max_assigned_jobs": 0},
    "bool slots": {"assignee_id": "w", "max_assigned_jobs": True},
    "str slots": {"assignee_id": "w", "max_assigned_jobs": "2"},
    "empty tag": {"assignee_id": "w", "tags": [""]},
}


async def _seeded(queue: PoolQueue) -> list[str]:
    """A store with a job in several statuses, so rejected calls have something to harm."""
    await queue.enqueue_jobs([Job(i, "t", b"p", ["a"]) for i in ("held", "held2", "waiting")])
    await _first_batch(queue, "w", ["a"])
    await _first_batch(queue, "w", ["a"])
    return ["held", "held2", "waiting", "n", "n1", "n2", "n3"]


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
async def test_bad_arguments_write_nothing(queue: PoolQueue, case: str) -> None:
    known = await _seeded(queue)
    before = await snapshot(queue, known)
    with pytest.raises((ValueError, TypeError)):
        await BAD_CALLS[case](queue)
    assert await snapshot(queue, known) == before


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
async def test_bad_stream_arguments_raise_at_once(queue: PoolQueue, case: str) -> None:
    known = await _seeded(queue)
    before = await snapshot(queue, known)
    with pytest.raises((ValueError, TypeError)):
        await _bad_stream(queue, **BAD_STREAMS[case])
    assert await snapshot(queue, known) == before


@pytest.mark.timeout(scaled(120, 3600))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_generated_wrong_types_are_rejected(backend_name: str, tmp_path: Path) -> None:
    """Any non-``str`` id or tag and any non-``bytes`` payload: TypeError/ValueError, no write."""
    runner = LoopRunner(backend_name, tmp_path)
    queue = runner.new_queue()
    known = runner.run(_seeded(queue))
    not_text = st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.binary(),
        st.lists(st.text(max_size=2)),
        st.booleans(),
    )
    not_bytes = st.one_of(
        st.none(),
        st.integers(),
        st.text(),
        st.lists(st.integers(0, 255)),
        st.binary().map(bytearray),
    )
    try:

        @hypothesis_settings()
        @given(
            which=st.sampled_from(["id", "tag", "payload", "type", "result", "message"]),
            bad_text=not_text,
            bad_bytes=not_bytes,
        )
        def check(which: str, bad_text: Any, bad_bytes: Any) -> None:
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "id": lambda: queue.enqueue_jobs([Job("ok1", "t"), Job(bad_text, "t")]),
                "tag": lambda: queue.enqueue_jobs(
                    [Job("ok1", "t"), Job("ok2", "t", tags=["x", bad_text])]
                ),
                "payload": lambda: queue.enqueue_job(Job("ok1", "t", bad_bytes)),
                "type": lambda: queue.enqueue_job(Job("ok1", bad_text)),
                "result": lambda: queue.complete_jobs({"held": b"r", "held2": bad_bytes}),
                "message": lambda: queue.stop_jobs({"held": "m", "held2": bad_text}),
            }
            if which == "result" and bad_bytes is None:
                return  # a None result is allowed (leaves the result unset)
            before = runner.run(snapshot(queue, [*known, "ok1", "ok2"]))
            with pytest.raises((ValueError, TypeError)):
                runner.run(calls[which]())  # type: ignore[arg-type]
            assert runner.run(snapshot(queue, [*known, "ok1", "ok2"])) == before

        check()
    finally:
        runner.close()


# --- text that some storage engines cannot hold -----------------------------------------


async def _accepted_exactly_or_rejected(
    queue: PoolQueue,
    call: Awaitable[object],
    check: Callable[[], Awaitable[None]],
    known: list[str],
) -> str:
    before = await snapshot(queue, known)
    try:
        await call
    except (ValueError, TypeError):
        assert await snapshot(queue, known) == before, "rejected, but something was written"
        return "rejected"
    await check()
    return "accepted"


@pytest.mark.parametrize("field", ["id", "tag", "job_type"])
async def test_lone_surrogates_round_trip_or_are_rejected(queue: PoolQueue, field: str) -> None:
    """A lone surrogate is not encodable text: it must round-trip exactly or be refused
    with ValueError before anything is written (never a StorageError, never mangled)."""
    bad = "x\ud800y"
    job = Job(
        bad if field == "id" else "sur",
        bad if field == "job_type" else "t",
        tags=[bad] if field == "tag" else [],
    )

    async def check() -> None:
        stored = await queue.get_job(job.id)
        assert (stored.id, stored.job_type, stored.tags) == (job.id, job.job_type, job.tags)

    await _accepted_exactly_or_rejected(
        queue,
        queue.enqueue_jobs([Job("before", "t"), job]),
        check,
        ["before"] if field == "id" else ["before", job.id],  # a bad id can't be looked up
    )


@pytest.mark.parametrize("field", ["job_type", "error_message"])
async def test_nul_in_other_text_round_trips_or_is_rejected(queue: PoolQueue, field: str) -> None:
    """NUL is only forbidden in ids and tags; elsewhere it round-trips, or is refused
    with ValueError before anything is written."""
    if field == "job_type":
        job = Job("nul", "a\x00b")

        async def check_type() -> None:
            assert (await queue.get_job("nul")).job_type == "a\x00b"

        await _accepted_exactly_or_rejected(queue, queue.enqueue_job(job), check_type, ["nul"])
        return
    known = await _seeded(queue)

    async def check_message() -> None:
        held, held2 = await queue.get_jobs(["held", "held2"])
        assert (held.error_message, held2.error_message) == ("fine", "a\x00b")

    await _accepted_exactly_or_rejected(
        queue, queue.stop_jobs({"held": "fine", "held2": "a\x00b"}), check_message, known
    )


# --- nothing stored can run code ---------------------------------------------------------

TRIPPED: list[str] = []


def _tripwire(note: str) -> str:
    TRIPPED.append(note)
    return note


class _Exploit:
    """Unpickling this calls ``_tripwire``: proof that stored bytes were unpickled."""

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return (_tripwire, ("unpickled!",))


async def test_pickle_payloads_stay_bytes(make_backend: BackendFactory) -> None:
    """A pickle in a payload or result comes back as the same bytes, also after reopening,
    and is never unpickled."""
    evil = pickle.dumps(_Exploit())
    TRIPPED.clear()
    async with PoolQueue(make_backend()) as queue:
        await queue.enqueue_job(Job("evil", "t", evil, tags=["x"]))
        batch = await _first_batch(queue, "w", ["x"])
        assert batch[0].job_definition == evil
        await queue.complete_job("evil", evil)
    async with PoolQueue(make_backend()) as queue:
        stored = await queue.get_job("evil")
        assert (stored.job_definition, stored.result) == (evil, evil)
        assert isinstance(stored.result, bytes)
    assert TRIPPED == []


def test_package_never_deserialises_code() -> None:
    """No code path of the library can turn stored data into code: the package does not
    use pickle, marshal, shelve, eval or exec (checked on the token stream, so comments
    and docstrings that mention them do not count)."""
    forbidden = {
        "pickle",
        "cPickle",
        "_pickle",
        "marshal",
        "shelve",
        "dill",
        "jsonpickle",
        "eval",
        "exec",
        "__import__",
    }
    root = Path(jobpool_async.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
        for tok in tokens:
            if tok.type == tokenize.NAME and tok.string in forbidden:
                offenders.append(f"{path.relative_to(root)}:{tok.start[0]}: {tok.string}")
    assert list(root.rglob("*.py")), "package source not found"
    assert offenders == []
