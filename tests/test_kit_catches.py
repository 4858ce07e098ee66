"""The conformance kit can fail: each case runs kit tests on a backend broken in one
way (a wrapper around :class:`MemoryBackend`, through the public contract only) and
expects them to fail, and on the faithful wrapper and expects them to pass."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobpool_async import MemoryBackend, PoolQueue
from jobpool_async.backends.base import (
    ApplyOutcome,
    Backend,
    Change,
    Job,
    JobState,
    JobStatus,
    Lease,
    ListQuery,
    Moved,
    Refill,
    Selection,
    SelectOutcome,
    Transition,
)
from jobpool_async.testing import BackendConformance, FakeClock


class Faithful(Backend):
    """Forwards every call to a :class:`MemoryBackend`."""

    def __init__(self) -> None:
        self.inner = MemoryBackend()

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def insert(self, jobs: Sequence[Job]) -> None:
        await self.inner.insert(jobs)

    async def insert_new(self, jobs: Sequence[Job]) -> list[str]:
        return await self.inner.insert_new(jobs)

    async def claim(
        self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime
    ) -> list[Job]:
        return await self.inner.claim(assignee_id, tags, limit, now)

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        return await self.inner.apply(changes, now, refill)

    async def apply_selected(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        *,
        report_unmatched: bool = False,
        scheduled_at: datetime | None = None,
    ) -> SelectOutcome:
        return await self.inner.apply_selected(
            transition,
            selection,
            now,
            report_unmatched=report_unmatched,
            scheduled_at=scheduled_at,
        )

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        return await self.inner.get_jobs(job_ids)

    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        return await self.inner.job_states(job_ids)

    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        return await self.inner.count_by_status(tags)

    async def delete(self, selection: Selection) -> int:
        return await self.inner.delete(selection)

    async def delete_completed_before(self, cutoff: datetime) -> int:
        return await self.inner.delete_completed_before(cutoff)

    async def list_jobs(self, query: ListQuery) -> list[Job]:
        return await self.inner.list_jobs(query)

    async def oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        return await self.inner.oldest_created(statuses)

    def next_due(self) -> datetime | None:
        return self.inner.next_due()

    async def renew_leases(
        self,
        holder: str,
        renew: Sequence[str],
        release: Sequence[str],
        lease: timedelta,
        now: datetime,
    ) -> None:
        await self.inner.renew_leases(holder, renew, release, lease, now)

    async def list_leases(self) -> list[Lease]:
        return await self.inner.list_leases()

    async def rescue_expired(
        self, now: datetime, forget_after: timedelta, max_attempts: int | None = None
    ) -> list[Moved]:
        self.inner.rescue_hook = self.rescue_hook
        return await self.inner.rescue_expired(now, forget_after, max_attempts)


class IgnoresPriority(Faithful):
    async def insert(self, jobs: Sequence[Job]) -> None:
        await self.inner.insert([dataclasses.replace(j, priority=0) for j in jobs])


class IgnoresSchedules(Faithful):
    async def insert(self, jobs: Sequence[Job]) -> None:
        await self.inner.insert([dataclasses.replace(j, scheduled_at=None) for j in jobs])


class RefillsEverySlot(Faithful):
    """Refills one job per job of the stream, freed or not."""

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        out = await self.inner.apply(changes, now)
        if refill is not None:
            limit = len(refill.job_ids)
            out.claimed = await self.inner.claim(refill.assignee_id, refill.tags, limit, now)
        return out


class ForgetsAssignments(Faithful):
    """Moved records without the assignment they ended."""

    async def apply(
        self, changes: Sequence[Change], now: datetime, refill: Refill | None = None
    ) -> ApplyOutcome:
        out = await self.inner.apply(changes, now, refill)
        out.moved = [m._replace(assigned_at=None) for m in out.moved]
        return out


class UnmatchedInAnyOrder(Faithful):
    async def apply_selected(
        self,
        transition: Transition,
        selection: Selection,
        now: datetime,
        *,
        report_unmatched: bool = False,
        scheduled_at: datetime | None = None,
    ) -> SelectOutcome:
        out = await super().apply_selected(
            transition,
            selection,
            now,
            report_unmatched=report_unmatched,
            scheduled_at=scheduled_at,
        )
        out.unmatched.reverse()
        return out


class InsertsUntilTheDuplicate(Faithful):
    """Not atomic: the jobs before a duplicate stay written."""

    async def insert(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            await self.inner.insert([job])


class DeletesWhatItCan(Faithful):
    """Not atomic: deletes the final jobs, then complains about the others."""

    async def delete(self, selection: Selection) -> int:
        finals = [j.id for j in await self._selected(selection) if j.status.is_final]
        await self.inner.delete(Selection(job_ids=tuple(finals)))
        return len(finals) + await self.inner.delete(selection)

    async def _selected(self, selection: Selection) -> list[Job]:
        by_ids = await self.inner.get_jobs(selection.job_ids)
        by_tags = await self.inner.list_jobs(ListQuery(limit=1000, tags=selection.tags))
        return by_ids + (by_tags if selection.tags else [])


class CountsIgnoringTags(Faithful):
    async def count_by_status(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int]:
        return await self.inner.count_by_status([])


class ListsOldestFirst(Faithful):
    async def list_jobs(self, query: ListQuery) -> list[Job]:
        every = await self.inner.list_jobs(dataclasses.replace(query, limit=1000, before=None))
        older = [j for j in every if query.before is None or (j.created_at, j.id) < query.before]
        return list(reversed(older))[: query.limit]


class ForgetsFirstSeen(Faithful):
    async def list_leases(self) -> list[Lease]:
        leases = await self.inner.list_leases()
        return [dataclasses.replace(x, first_seen_at=x.renewed_at) for x in leases]


class SkipsTheRescueHook(Faithful):
    """Rescues without the compare-and-set window a test can hook into."""

    async def rescue_expired(
        self, now: datetime, forget_after: timedelta, max_attempts: int | None = None
    ) -> list[Moved]:
        self.inner.rescue_hook = None
        return await self.inner.rescue_expired(now, forget_after, max_attempts)


BROKEN: list[tuple[type[Faithful], list[str]]] = [
    (
        IgnoresPriority,
        [
            "test_claim_order_is_priority_then_due_key_then_enqueue_order",
            "test_order_is_priority_then_due_key_then_enqueue_order",
        ],
    ),
    (IgnoresSchedules, ["test_a_job_is_not_claimed_before_it_is_due"]),
    (
        RefillsEverySlot,
        [
            "test_a_refill_claims_one_job_per_slot_the_apply_freed",
            "test_refill_takes_only_the_slots_the_call_freed",
        ],
    ),
    (
        ForgetsAssignments,
        [
            "test_moved_records_name_the_assignment_and_what_wakes",
            "test_apply_moves_exactly_per_the_transition_table",
        ],
    ),
    (UnmatchedInAnyOrder, ["test_apply_selected_reports_missing_ids_first_each_once"]),
    (InsertsUntilTheDuplicate, ["test_insert_is_all_or_nothing"]),
    (DeletesWhatItCan, ["test_delete_removes_only_when_every_selected_job_is_final"]),
    (CountsIgnoringTags, ["test_counts_by_status_and_retries_over_tags"]),
    (ListsOldestFirst, ["test_list_jobs_pages_newest_first_from_the_cursor"]),
    (ForgetsFirstSeen, ["test_renew_and_release_lease_records"]),
    (SkipsTheRescueHook, ["test_rescue_leaves_a_job_that_moved_after_its_read"]),
]
CASES = [
    pytest.param(cls, name, id=f"{cls.__name__}-{name.removeprefix('test_')[:40]}")
    for cls, names in BROKEN
    for name in names
]


async def run_kit_test(backend_type: type[Faithful], name: str) -> None:
    """Run the kit test ``name`` as pytest would, with the kit's fixtures built here."""
    kit = BackendConformance()
    test: Callable[..., Any] = getattr(kit, name)
    params = inspect.signature(test).parameters
    clock = FakeClock(datetime(2030, 1, 1, tzinfo=UTC))
    backend = backend_type()
    args: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        for param in params:
            if param == "backend":
                await backend.open()
                stack.push_async_callback(backend.close)
                args[param] = backend
            elif param == "queue":
                args[param] = await stack.enter_async_context(PoolQueue(backend))
            elif param == "tq":
                args[param] = await stack.enter_async_context(PoolQueue(backend, clock=clock))
            elif param == "clock":
                args[param] = clock
            else:
                raise AssertionError(f"{name} needs the fixture {param!r}: add it here")
        await test(**args)


@pytest.mark.parametrize(("backend_type", "name"), CASES)
async def test_the_kit_fails_a_broken_backend(backend_type: type[Faithful], name: str) -> None:
    with pytest.raises(AssertionError):
        await run_kit_test(backend_type, name)


@pytest.mark.parametrize("name", sorted({name for _, names in BROKEN for name in names}))
async def test_the_same_kit_tests_pass_on_the_faithful_wrapper(name: str) -> None:
    await run_kit_test(Faithful, name)
