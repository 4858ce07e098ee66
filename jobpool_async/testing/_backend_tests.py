"""The backend contract at the backend level: each :class:`Backend` method called
directly, as a :class:`~jobpool_async.PoolQueue` calls it (``docs/backends.md``).

Times are explicit ``now`` arguments, except for leases: a backend with a clock of
its own (PostgreSQL) uses that, so those tests use the real time and poll with a
deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from jobpool_async.backends.base import (
    CANCEL,
    COMPLETE,
    DISCARD,
    ELIGIBLE,
    FAIL,
    FINAL,
    MARK_UNKNOWN_STOPPED,
    RELEASE,
    REQUEUE,
    STOP,
    TRANSITIONS,
    UPDATE_TO,
    WORKER_LOST,
    Backend,
    Change,
    DuplicateJobError,
    InvalidTransitionError,
    Job,
    JobNotFoundError,
    JobsNotFinalError,
    JobStatus,
    ListQuery,
    Moved,
    Refill,
    Selection,
    Transition,
    check_new_job,
    refill_limit,
    utcnow,
)

from ._helpers import DEADLINE, new_id

S = JobStatus
T = datetime(2030, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)

#: Every transition a queue applies with :meth:`Backend.apply` (assignment is a claim).
TABLE: list[Transition] = [t for t in TRANSITIONS if not t.assign] + list(UPDATE_TO.values())

#: How :func:`jobs_in` drives a RUNNING job to each status (one apply for all).
_FROM_RUNNING: dict[JobStatus, Change | None] = {
    S.RUNNING: None,
    S.CANCELLING: Change("", CANCEL),
    S.FAILED_RETRY: Change("", FAIL, error_message="boom"),
    S.UNKNOWN_RETRY: Change("", WORKER_LOST),
    S.COMPLETED: Change("", COMPLETE, result=b"done"),
    S.STOPPED: Change("", STOP, error_message="stopped"),
    S.UNKNOWN_STOPPED: Change("", MARK_UNKNOWN_STOPPED, error_message="lost"),
    S.DISCARDED: Change("", DISCARD, error_message="given up"),
}


def at(seconds: float) -> datetime:
    return T + timedelta(seconds=seconds)


def new(job_id: str, *tags: str, **fields: object) -> Job:
    """A new job as the queue hands it to :meth:`Backend.insert` (validated)."""
    return check_new_job(Job(id=job_id, job_type="kit", tags=list(tags), **fields))  # type: ignore[arg-type]


async def jobs_in(
    backend: Backend, wanted: dict[str, JobStatus], now: datetime = T, assignee: str = "w"
) -> dict[str, Job]:
    """Jobs with these ids in these statuses (three backend calls); returns them.
    Those that were assigned (to ``assignee`` at ``now``) carry a tag of their own."""
    run = [i for i, s in wanted.items() if s not in (S.INITIAL_PENDING, S.UNSCHEDULED)]
    tag = new_id("kit:run")
    await backend.insert([new(i, tag) if i in run else new(i) for i in wanted])
    if run:
        claimed = await backend.claim(assignee, [tag], len(run), now)
        assert sorted(j.id for j in claimed) == sorted(run), "claim took the wrong jobs"
    changes = [Change(i, CANCEL) for i, s in wanted.items() if s is S.UNSCHEDULED]
    for job_id in run:
        how = _FROM_RUNNING[wanted[job_id]]
        if how is not None:
            changes.append(how._replace(job_id=job_id))
    if changes:
        out = await backend.apply(changes, now + US)
        assert not out.errors, out.errors
    got = {j.id: j for j in await backend.get_jobs(list(wanted))}
    assert {i: j.status for i, j in got.items()} == wanted
    return got


async def claim_in_turn(
    backend: Backend, now: datetime, tags: Sequence[str] = (), assignee: str = "w"
) -> list[str]:
    """Claim one job at a time until none is left: the selection order."""
    order: list[str] = []
    while True:
        got = await backend.claim(assignee, tags, 1, now)
        assert len(got) <= 1, f"claim(limit=1) returned {len(got)} jobs"
        if not got:
            return order
        order.append(got[0].id)
        assert len(order) < 1000, "claiming does not end"


def ids(jobs: Iterable[Job]) -> list[str]:
    return [j.id for j in jobs]


class BackendTests:
    """Each method of the contract, called directly on an open backend."""

    # --- claiming ---------------------------------------------------------------------

    async def test_claim_order_is_priority_then_due_key_then_enqueue_order(
        self, backend: Backend
    ) -> None:
        await backend.insert(
            [
                new("low-old", created_at=at(-7200), priority=-1),
                new("zero-b", created_at=at(-60)),
                new("zero-a", created_at=at(-60)),
                new("high", created_at=at(0), priority=5),
                new("sched", created_at=at(0), scheduled_at=at(-3600)),
                new("retried", created_at=at(-9000), last_retry_at=at(-1800), retry_count=1),
                new("future", created_at=at(-9999), scheduled_at=at(5), priority=9),
            ]
        )
        await backend.insert([new("zero-c", created_at=at(-60))])  # a later call: after the tie
        assert await claim_in_turn(backend, T) == [
            "high",
            "sched",
            "retried",
            "zero-b",
            "zero-a",
            "zero-c",
            "low-old",
        ]

    async def test_a_claim_takes_the_first_jobs_in_order_and_assigns_them(
        self, backend: Backend
    ) -> None:
        await backend.insert([new(f"j{i}", created_at=at(i)) for i in range(5)])
        claimed = await backend.claim("w1", [], 3, at(100))
        assert sorted(ids(claimed)) == ["j0", "j1", "j2"]
        for job in [*claimed, *await backend.get_jobs(ids(claimed))]:
            assert job.status is S.RUNNING
            assert (job.assignee_id, job.assigned_at, job.started_at) == ("w1", at(100), at(100))
            assert job.attempts == 1
        assert sorted(ids(await backend.claim("w2", [], 10, at(101)))) == ["j3", "j4"]
        assert await backend.claim("w3", [], 10, at(102)) == [], "nothing is claimed twice"
        j3, j4 = await backend.get_jobs(["j3", "j4"])
        assert (j3.status, j3.assignee_id, j4.assignee_id) == (S.RUNNING, "w2", "w2")

    async def test_a_claim_takes_only_jobs_with_every_tag(self, backend: Backend) -> None:
        await backend.insert(
            [
                new("ab", "a", "b", created_at=at(3)),
                new("a", "a", created_at=at(0)),
                new("b", "b", created_at=at(1)),
                new("abc", "c", "b", "a", created_at=at(2)),
            ]
        )
        assert await claim_in_turn(backend, T, ["a", "b"]) == ["abc", "ab"]
        assert await claim_in_turn(backend, T, ["B"]) == [], "tags are case-sensitive"
        assert await claim_in_turn(backend, T) == ["a", "b"]

    async def test_a_job_is_not_claimed_before_it_is_due(self, backend: Backend) -> None:
        await backend.insert(
            [new("later", scheduled_at=at(60), priority=3), new("now", created_at=at(30))]
        )
        assert await claim_in_turn(backend, at(0)) == ["now"]
        assert await backend.claim("w", [], 10, at(60) - US) == []
        (job,) = await backend.claim("w", [], 10, at(60))
        assert (job.id, job.assigned_at, job.scheduled_at) == ("later", at(60), at(60))

    async def test_a_retry_scheduled_for_later_waits_and_then_goes_by_its_time(
        self, backend: Backend
    ) -> None:
        r = (await jobs_in(backend, {"r": S.RUNNING}))["r"]
        await backend.insert([new("p", created_at=at(10)), new("q", created_at=at(30))])
        out = await backend.apply([Change("r", FAIL, error_message="x", scheduled_at=at(20))], T)
        (moved,) = out.moved
        assert (moved.status, moved.due_at) == (S.FAILED_RETRY, at(20))
        assert await backend.claim("w", r.tags, 10, at(20) - US) == []
        assert await claim_in_turn(backend, at(40)) == ["p", "r", "q"], "due key: scheduled_at"

    # --- apply ------------------------------------------------------------------------

    async def test_apply_moves_exactly_per_the_transition_table(self, backend: Backend) -> None:
        """Every transition from every status, one apply call per transition: a
        compare-and-set on the current status; the rest get the right error and stay
        as they were."""
        wanted = {f"t{k}/{s.value}": s for k in range(len(TABLE)) for s in S}
        before = await jobs_in(backend, wanted)
        now = at(60)
        for k, t in enumerate(TABLE):
            changes = [
                # (a guarded move names the assignment it is for: the job's own)
                Change(i, t, result=b"r", error_message="m", assigned_at=before[i].assigned_at)
                for i in (f"t{k}/{s.value}" for s in S)
            ]
            out = await backend.apply([*changes, Change(f"t{k}/missing", t)], now)
            moved = {m.job_id: m for m in out.moved}
            assert len(moved) == len(out.moved), f"{t.name}: a job moved twice"
            assert isinstance(out.errors.pop(f"t{k}/missing"), JobNotFoundError)
            after = {j.id: j for j in await backend.get_jobs([c.job_id for c in changes])}
            for s in S:
                job_id = f"t{k}/{s.value}"
                target = t.target_of(s)
                old, got = before[job_id], after[job_id]
                if target is None:
                    err = out.errors.get(job_id)
                    assert isinstance(err, InvalidTransitionError), (t.name, s, err)
                    assert (err.job_id, err.current, err.target) == (job_id, s, t.target)
                    assert job_id not in moved
                    assert got == old, f"{t.name} from {s.name}: a refused move wrote"
                    continue
                assert job_id not in out.errors, (t.name, s, out.errors.get(job_id))
                assert moved[job_id].status is target is got.status, (t.name, s, got.status)
                assert moved[job_id].assigned_at == old.assigned_at
                check_move(t, old, got, now)

    async def test_a_guarded_move_leaves_a_job_assigned_again(self, backend: Backend) -> None:
        """RELEASE (a stream's give-back) is a compare-and-set on the assignment: a job
        lost by its stream and claimed again elsewhere (which that stream's process may
        not have seen yet) is not given back; its own assignment is."""
        tag = new_id("kit:other")
        jobs = await jobs_in(backend, {"g": S.RUNNING, "h": S.RUNNING})
        await backend.insert([new("other", tag)])
        stale = jobs["g"].assigned_at
        await backend.apply([Change("g", WORKER_LOST)], at(1))
        (claimed,) = await backend.claim("v", [], 1, at(2))
        assert (claimed.id, claimed.assigned_at) == ("g", at(2))
        (held,) = await backend.get_jobs(["g"])
        out = await backend.apply(
            [Change("g", RELEASE, error_message="given back", assigned_at=stale)], at(3)
        )
        assert out.moved == []
        err = out.errors["g"]
        assert isinstance(err, InvalidTransitionError) and err.current is S.RUNNING, err
        assert await backend.get_jobs(["g"]) == [held], "a give-back of an earlier assignment"
        assert (held.status, held.assignee_id) == (S.RUNNING, "v")
        # The job's own assignment moves, also with a refill in the same call.
        out = await backend.apply(
            [Change("g", RELEASE, error_message="given back", assigned_at=at(2))], at(4)
        )
        assert [(m.job_id, m.status) for m in out.moved] == [("g", S.FAILED_RETRY)]
        out = await backend.apply(
            [Change("h", RELEASE, assigned_at=jobs["h"].assigned_at)],
            at(5),
            Refill("w2", (tag,), frozenset({"h"})),
        )
        assert [(m.job_id, m.status) for m in out.moved] == [("h", S.FAILED_RETRY)]
        assert ids(out.claimed) == ["other"]

    async def test_a_give_back_explains_only_a_job_without_a_message(
        self, backend: Backend
    ) -> None:
        """RELEASE's message (``keeps_message``) is written only where the store holds
        none: a job's own message, set after its claim, is kept, decided in the write."""
        jobs = await jobs_in(backend, {"own": S.RUNNING, "none": S.RUNNING})
        await backend.apply([Change("own", UPDATE_TO[S.RUNNING], error_message="mine")], at(1))
        out = await backend.apply(
            [
                Change(i, RELEASE, error_message="given back", assigned_at=jobs[i].assigned_at)
                for i in ("own", "none")
            ],
            at(2),
        )
        assert sorted((m.job_id, m.status) for m in out.moved) == [
            ("none", S.FAILED_RETRY),
            ("own", S.FAILED_RETRY),
        ]
        got = {job.id: job.error_message for job in await backend.get_jobs(["own", "none"])}
        assert got == {"own": "mine", "none": "given back"}

    async def test_an_exhausted_job_takes_the_exhausted_target(self, backend: Backend) -> None:
        await backend.insert([new("own", max_attempts=1), new("default"), new("more")])
        await backend.claim("w", [], 3, T)
        out = await backend.apply(
            [
                Change("own", FAIL, error_message="x"),
                Change("default", FAIL, error_message="x", max_attempts=1),
                Change("more", FAIL, error_message="x", max_attempts=2),
            ],
            at(1),
        )
        status = {m.job_id: m.status for m in out.moved}
        assert status == {"own": S.DISCARDED, "default": S.DISCARDED, "more": S.FAILED_RETRY}
        own = (await backend.get_jobs(["own"]))[0]
        assert (own.retry_count, own.last_retry_at, own.finalized_at) == (1, at(1), at(1))

    async def test_moved_records_name_the_assignment_and_what_wakes(self, backend: Backend) -> None:
        jobs = await jobs_in(backend, {"r1": S.RUNNING, "r2": S.RUNNING, "p": S.INITIAL_PENDING})
        await backend.insert([new("tagged", "x", "y")])
        out = await backend.apply(
            [
                Change("r1", FAIL, error_message="x", scheduled_at=at(3600)),
                Change("r2", COMPLETE, result=b""),
                Change("p", CANCEL),
                Change("tagged", UPDATE_TO[S.INITIAL_PENDING]),
            ],
            at(10),
        )
        moved = {m.job_id: m for m in out.moved}
        assert moved["r1"].status is S.FAILED_RETRY
        assert moved["r1"].assigned_at == jobs["r1"].assigned_at is not None
        assert moved["r1"].due_at == at(3600), "an eligible job not due yet says when"
        assert set(moved["r1"].tags) == set(jobs["r1"].tags), "an eligible job carries its tags"
        assert (moved["r2"].status, moved["r2"].assigned_at) == (S.COMPLETED, T)
        assert (moved["p"].status, moved["p"].assigned_at) == (S.UNSCHEDULED, None)
        assert moved["tagged"].status is S.INITIAL_PENDING, "a move to itself is a move"
        assert set(moved["tagged"].tags) == {"x", "y"}
        assert moved["tagged"].due_at is None
        r2 = (await backend.get_jobs(["r2"]))[0]
        assert (r2.result, r2.finalized_at) == (b"", at(10))

    async def test_a_refill_claims_one_job_per_slot_the_apply_freed(self, backend: Backend) -> None:
        """Only moves of the refill's own jobs out of RUNNING/CANCELLING free slots;
        the jobs claimed are the oldest carrying the refill's tags, as a claim takes."""
        await backend.insert([new(f"mine{i}", "kit:mine", created_at=at(i)) for i in range(3)])
        await backend.insert([new("theirs", "kit:theirs")])
        assert len(await backend.claim("w", ["kit:mine"], 3, T)) == 3
        assert len(await backend.claim("v", ["kit:theirs"], 1, T)) == 1
        await backend.insert(
            [new("untagged", created_at=at(-100))]
            + [new(f"next{i}", "t", "u", created_at=at(100 + i)) for i in range(4)]
        )
        refill = Refill("w", ("t",), frozenset({"mine0", "mine1", "mine2"}))
        changes = [
            Change("mine0", COMPLETE, result=b""),
            Change("mine1", UPDATE_TO[S.RUNNING]),  # stays RUNNING: frees nothing
            Change("mine2", FAIL, error_message="again"),  # eligible again, but newest
            Change("theirs", COMPLETE, result=b""),  # another stream's slot
        ]
        out = await backend.apply(changes, at(200), refill)
        assert refill_limit(refill, out.moved) == 2
        assert ids(out.claimed) == ["next0", "next1"], "oldest first, with the refill's tags"
        for job in [*out.claimed, *await backend.get_jobs(["next0", "next1"])]:
            assert (job.status, job.assignee_id, job.assigned_at) == (S.RUNNING, "w", at(200))
        left = await backend.get_jobs(["next2", "untagged", "mine2"])
        assert [j.status for j in left] == [S.INITIAL_PENDING, S.INITIAL_PENDING, S.FAILED_RETRY]
        none_freed = Refill("w", (), frozenset({"mine1"}))
        out = await backend.apply([Change("next0", COMPLETE, result=b"")], at(201), none_freed)
        assert out.claimed == [], "a refill claims nothing when its jobs freed no slot"

    async def test_a_refill_claims_its_extra_slots_too(self, backend: Backend) -> None:
        await jobs_in(backend, {"a": S.RUNNING, "b": S.RUNNING})
        await backend.insert([new(f"n{i}", created_at=at(10 + i)) for i in range(5)])
        refill = Refill("w", (), frozenset({"a", "b"}), extra=2)
        out = await backend.apply([Change("a", COMPLETE, result=b"")], at(20), refill)
        assert refill_limit(refill, out.moved) == 3
        assert ids(out.claimed) == ["n0", "n1", "n2"], "one freed slot and two extra"
        only_extra = Refill("w", (), frozenset({"b"}), extra=1)
        out = await backend.apply([Change("n0", COMPLETE, result=b"")], at(21), only_extra)
        assert ids(out.claimed) == ["n3"], "the extra slots even when the apply frees none"

    async def test_a_refill_takes_no_more_jobs_than_are_due(self, backend: Backend) -> None:
        await jobs_in(backend, {"a": S.RUNNING, "b": S.RUNNING})
        await backend.insert([new("due"), new("later", scheduled_at=at(3600))])
        refill = Refill("w", (), frozenset({"a", "b"}))
        out = await backend.apply(
            [Change("a", COMPLETE, result=b""), Change("b", COMPLETE, result=b"")], at(5), refill
        )
        assert ids(out.claimed) == ["due"]

    # --- selections -------------------------------------------------------------------

    async def test_apply_selected_reports_missing_ids_first_each_once(
        self, backend: Backend
    ) -> None:
        jobs = await jobs_in(
            backend, {"pend": S.INITIAL_PENDING, "done": S.COMPLETED, "run": S.RUNNING}
        )
        await backend.insert([new("t-pend", "x"), new("t-gone", "x")])
        await backend.apply_selected(
            UPDATE_TO[S.UNSCHEDULED], Selection(job_ids=("t-gone",)), at(1)
        )
        selection = Selection(
            job_ids=("gone2", "done", "pend", "gone1", "gone2", "run", "pend"), tags=("x",)
        )
        out = await backend.apply_selected(CANCEL, selection, at(2), report_unmatched=True)
        assert out.missing == ["gone2", "gone1"], "missing ids in request order, each once"
        assert out.unmatched[:2] == ["gone2", "gone1"], "missing ids come first"
        assert sorted(out.unmatched[2:]) == ["done", "t-gone"]
        moved = {m.job_id: m for m in out.moved}
        assert {i: m.status for i, m in moved.items()} == {
            "pend": S.UNSCHEDULED,
            "run": S.CANCELLING,
            "t-pend": S.UNSCHEDULED,
        }
        assert len(out.moved) == 3, "each selected job once"
        assert moved["run"].assigned_at == jobs["run"].assigned_at
        quiet = await backend.apply_selected(CANCEL, Selection(job_ids=("nope", "done")), at(3))
        assert (quiet.moved, quiet.unmatched, quiet.missing) == ([], [], [])

    async def test_an_assignee_selection_takes_only_its_active_jobs(self, backend: Backend) -> None:
        await jobs_in(
            backend,
            {"r": S.RUNNING, "c": S.CANCELLING, "f": S.FAILED_RETRY, "s": S.STOPPED},
            assignee="dead",
        )
        await jobs_in(backend, {"alive": S.RUNNING}, assignee="alive")
        requeue = await backend.apply_selected(REQUEUE, Selection(assignee_id="dead"), at(8))
        assert requeue.moved == [], "'s' still names its last assignee, but it holds it no more"
        out = await backend.apply_selected(WORKER_LOST, Selection(assignee_id="dead"), at(9))
        assert sorted((m.job_id, m.status) for m in out.moved) == [
            ("c", S.UNKNOWN_STOPPED),
            ("r", S.UNKNOWN_RETRY),
        ]
        everything = await backend.apply_selected(WORKER_LOST, Selection(everything=True), at(10))
        assert [(m.job_id, m.status) for m in everything.moved] == [("alive", S.UNKNOWN_RETRY)]
        c = (await backend.get_jobs(["c"]))[0]
        assert (c.finalized_at, c.assignee_id) == (at(9), "dead")

    async def test_requeue_writes_the_schedule_and_reopens(self, backend: Backend) -> None:
        await jobs_in(backend, {"d": S.DISCARDED, "s": S.STOPPED, "done": S.COMPLETED})
        out = await backend.apply_selected(
            REQUEUE, Selection(job_ids=("d", "s", "done")), at(5), scheduled_at=at(50)
        )
        assert sorted((m.job_id, m.status, m.due_at) for m in out.moved) == [
            ("d", S.FAILED_RETRY, at(50)),
            ("s", S.FAILED_RETRY, at(50)),
        ]
        d = (await backend.get_jobs(["d"]))[0]
        assert (d.finalized_at, d.result, d.scheduled_at, d.attempts) == (None, None, at(50), 1)
        assert await backend.claim("w", [], 5, at(50) - US) == []
        assert sorted(ids(await backend.claim("w", [], 5, at(50)))) == ["d", "s"]

    # --- insert, read, count ------------------------------------------------------------

    async def test_insert_is_all_or_nothing(self, backend: Backend) -> None:
        await backend.insert([new("old")])
        with pytest.raises(DuplicateJobError):
            await backend.insert([new("fresh1"), new("old", "changed"), new("fresh2")])
        assert ids(await backend.get_jobs(["fresh1", "old", "fresh2"])) == ["old"]
        assert (await backend.get_jobs(["old"]))[0].tags == []
        assert (await backend.count_by_status([]))[0] == {S.INITIAL_PENDING: 1}

    async def test_insert_new_skips_stored_ids(self, backend: Backend) -> None:
        await backend.insert([new("old")])
        assert await backend.insert_new([new("a"), new("old", "x"), new("b")]) == ["a", "b"]
        assert (await backend.get_jobs(["old"]))[0].tags == []
        assert await backend.insert_new([new("a")]) == []

    async def test_get_jobs_and_states_in_input_order(self, backend: Backend) -> None:
        jobs = await jobs_in(backend, {"a": S.RUNNING, "b": S.INITIAL_PENDING})
        assert ids(await backend.get_jobs(["b", "zz", "a", "b"])) == ["b", "a", "b"]
        assert await backend.get_jobs([]) == []
        states = await backend.job_states(["a", "zz", "b"])
        assert set(states) == {"a", "b"}
        assert (states["a"].status, states["a"].assigned_at) == (S.RUNNING, jobs["a"].assigned_at)
        assert (states["b"].status, states["b"].assigned_at) == (S.INITIAL_PENDING, None)

    async def test_counts_by_status_and_retries_over_tags(self, backend: Backend) -> None:
        await jobs_in(backend, {f"{s.value}": s for s in S})
        await backend.insert([new("red-big", "red", "big"), new("red", "red")])
        counts, retries = await backend.count_by_status([])
        assert {s: n for s, n in counts.items() if n} == {
            **dict.fromkeys(S, 1),
            S.INITIAL_PENDING: 3,
        }
        assert retries == 1, "the FAILED_RETRY job's one retry"
        red, red_retries = await backend.count_by_status(["red"])
        assert ({s: n for s, n in red.items() if n}, red_retries) == ({S.INITIAL_PENDING: 2}, 0)
        both, _ = await backend.count_by_status(["big", "red"])
        assert sum(both.values()) == 1
        assert sum((await backend.count_by_status(["Red"]))[0].values()) == 0

    # --- delete -----------------------------------------------------------------------

    async def test_delete_removes_only_when_every_selected_job_is_final(
        self, backend: Backend
    ) -> None:
        await jobs_in(
            backend,
            {"done": S.COMPLETED, "gone": S.UNSCHEDULED, "run": S.RUNNING, "p": S.INITIAL_PENDING},
        )
        await backend.insert([new("t-done", "old"), new("t-pend", "old")])
        await backend.apply([Change("t-done", UPDATE_TO[S.UNSCHEDULED])], at(1))
        with pytest.raises(JobsNotFinalError) as caught:
            await backend.delete(Selection(job_ids=("done", "run", "missing", "p")))
        assert sorted(caught.value.job_ids) == ["p", "run"]
        with pytest.raises(JobsNotFinalError) as caught:
            await backend.delete(Selection(job_ids=("gone",), tags=("old",)))
        assert caught.value.job_ids == ["t-pend"]
        assert len(await backend.get_jobs(["done", "gone", "run", "p", "t-done"])) == 5
        assert await backend.delete(Selection(job_ids=("done", "gone", "missing"))) == 2
        assert ids(await backend.get_jobs(["done", "gone", "run"])) == ["run"]
        assert await backend.delete(Selection(job_ids=("missing",))) == 0

    async def test_delete_completed_before_is_inclusive(self, backend: Backend) -> None:
        await jobs_in(backend, {"a": S.RUNNING, "b": S.RUNNING, "s": S.STOPPED})
        await backend.apply([Change("a", COMPLETE, result=b"")], at(10))
        await backend.apply([Change("b", COMPLETE, result=b"")], at(10) + US)
        assert await backend.delete_completed_before(at(10) - US) == 0
        assert await backend.delete_completed_before(at(10)) == 1
        assert ids(await backend.get_jobs(["a", "b", "s"])) == ["b", "s"]
        assert await backend.delete_completed_before(at(99)) == 1
        await backend.insert([new("a")])  # a deleted id can be used again
        assert (await backend.get_jobs(["a"]))[0].status is S.INITIAL_PENDING

    # --- listing ----------------------------------------------------------------------

    async def test_list_jobs_pages_newest_first_from_the_cursor(self, backend: Backend) -> None:
        await backend.insert(
            [new(f"j{i}", "even" if i % 2 == 0 else "odd", created_at=at(i // 2)) for i in range(9)]
        )
        await backend.apply_selected(CANCEL, Selection(job_ids=("j0", "j1", "j2")), at(60))
        everything = ids(await backend.list_jobs(ListQuery(limit=100)))
        assert everything == ["j8", "j7", "j6", "j5", "j4", "j3", "j2", "j1", "j0"]
        page = await backend.list_jobs(ListQuery(limit=3, before=(at(3), "j6")))
        assert ids(page) == ["j5", "j4", "j3"], "the page starts right after the cursor"
        even = ListQuery(limit=100, tags=("even",), statuses=frozenset({S.INITIAL_PENDING}))
        assert ids(await backend.list_jobs(even)) == ["j8", "j6", "j4"]
        gone = ListQuery(limit=2, statuses=frozenset({S.UNSCHEDULED, S.COMPLETED}))
        assert ids(await backend.list_jobs(gone)) == ["j2", "j1"]
        assert await backend.list_jobs(ListQuery(limit=5, job_type="other")) == []
        assert await backend.oldest_created(ELIGIBLE) == at(1)
        assert await backend.oldest_created(frozenset({S.UNSCHEDULED})) == at(0)
        assert await backend.oldest_created(frozenset({S.RUNNING})) is None


def check_move(t: Transition, old: Job, got: Job, now: datetime) -> None:
    """The side effects a move makes, derived from the transition (``docs/backends.md``)."""
    where = f"{t.name} from {old.status.name}"
    unchanged = ("id", "job_type", "job_definition", "created_at", "started_at", "priority")
    for name in (*unchanged, "assignee_id", "assigned_at", "attempts", "max_attempts"):
        assert getattr(got, name) == getattr(old, name), f"{where} changed {name}"
    assert sorted(got.tags) == sorted(old.tags), where
    assert (got.result, got.error_message) == (b"r", "m"), f"{where}: result/message not kept"
    if old.status in t.retry_sources:
        assert (got.retry_count, got.last_retry_at) == (old.retry_count + 1, now), where
    else:
        assert (got.retry_count, got.last_retry_at) == (old.retry_count, old.last_retry_at), where
    if t.reopens:
        assert got.finalized_at is None, where
    elif got.status in FINAL and got.status is not old.status:
        assert got.finalized_at == now, f"{where}: finalized_at not set"
    else:
        assert got.finalized_at == old.finalized_at, f"{where}: finalized_at changed"
    if old.status in t.schedule_sources and got.status in ELIGIBLE:
        assert got.scheduled_at is None, f"{where}: a schedules move without a time clears it"
    else:
        assert got.scheduled_at == old.scheduled_at, where


class LeaseTests:
    """Leases (SPEC §8.4), for a backend whose ``supports_leases`` is true."""

    async def test_renew_and_release_lease_records(self, backend: Backend) -> None:
        needs_leases(backend)
        hour = timedelta(hours=1)
        start = utcnow()
        await backend.renew_leases("h1", ["a", "b"], [], hour, start)
        first = {lease.assignee_id: lease for lease in await backend.list_leases()}
        assert sorted(first) == ["a", "b"]
        a = first["a"]
        assert a.holders == ("h1",)
        assert a.expires_at - a.renewed_at == hour
        assert a.first_seen_at == a.renewed_at
        await backend.renew_leases("h2", ["a"], [], hour, utcnow())
        await backend.renew_leases("h1", ["a"], ["b"], hour, utcnow())
        (again,) = await backend.list_leases()
        assert again.assignee_id == "a"
        assert again.holders == ("h1", "h2")
        assert again.first_seen_at == a.first_seen_at, "first seen is kept on renewal"
        assert again.renewed_at >= a.renewed_at
        await backend.renew_leases("h1", [], ["a"], hour, utcnow())
        await backend.renew_leases("h2", [], ["a"], hour, utcnow())
        assert await backend.list_leases() == []

    async def test_rescue_moves_only_the_jobs_of_expired_assignees(self, backend: Backend) -> None:
        needs_leases(backend)
        now = utcnow()
        await jobs_in(backend, {"r": S.RUNNING, "c": S.CANCELLING}, now, assignee="dead")
        await jobs_in(backend, {"live": S.RUNNING}, now, assignee="alive")
        await backend.renew_leases("h", ["alive"], [], timedelta(hours=1), now)
        await backend.renew_leases("h", ["dead"], [], timedelta(milliseconds=1), now)
        moved = await rescue_until_moved(backend, "dead")
        assert sorted((m.job_id, m.status, m.assigned_at) for m in moved) == [
            ("c", S.UNKNOWN_STOPPED, now),
            ("r", S.UNKNOWN_RETRY, now),
        ]
        live, r = await backend.get_jobs(["live", "r"])
        assert (live.status, r.status, r.assignee_id) == (S.RUNNING, S.UNKNOWN_RETRY, "dead")
        assert await backend.rescue_expired(utcnow(), timedelta(hours=1)) == []

    async def test_rescue_honours_the_attempt_limit(self, backend: Backend) -> None:
        needs_leases(backend)
        now = utcnow()
        await jobs_in(backend, {"once": S.RUNNING}, now, assignee="dead")
        await backend.renew_leases("h", ["dead"], [], timedelta(milliseconds=1), now)
        (moved,) = await rescue_until_moved(backend, "dead", max_attempts=1)
        assert (moved.job_id, moved.status) == ("once", S.UNKNOWN_STOPPED)

    async def test_rescue_leaves_a_job_that_moved_after_its_read(self, backend: Backend) -> None:
        """A compare-and-set: the job completes between the rescue's read and write."""
        needs_leases(backend)
        now = utcnow()
        await jobs_in(backend, {"late": S.RUNNING, "other": S.RUNNING}, now, assignee="dead")
        await backend.renew_leases("h", ["dead"], [], timedelta(milliseconds=1), now)
        calls = 0

        async def complete_meanwhile() -> None:
            nonlocal calls
            calls += 1
            out = await backend.apply([Change("late", COMPLETE, result=b"")], utcnow())
            assert [m.status for m in out.moved] == [S.COMPLETED] or calls > 1

        backend.rescue_hook = complete_meanwhile
        try:
            moved = await rescue_until_moved(backend, "dead")
        finally:
            backend.rescue_hook = None
        assert calls >= 1, "rescue_expired did not await rescue_hook between read and write"
        assert [(m.job_id, m.status) for m in moved] == [("other", S.UNKNOWN_RETRY)]
        assert (await backend.get_jobs(["late"]))[0].status is S.COMPLETED


def needs_leases(backend: Backend) -> None:
    if not backend.supports_leases:
        pytest.skip(f"{type(backend).__name__} has no leases (supports_leases is False)")


async def rescue_until_moved(
    backend: Backend, assignee: str, max_attempts: int | None = None
) -> list[Moved]:
    """Rescue (real time) until the lease of ``assignee`` has expired and jobs moved."""
    async with asyncio.timeout(DEADLINE):
        while True:
            moved = await backend.rescue_expired(utcnow(), timedelta(hours=1), max_attempts)
            if moved:
                return moved
            await asyncio.sleep(0.002)
