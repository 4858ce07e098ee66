"""LevelDB backend: one directory, one process at a time, plyvel in one worker thread.

Every plyvel call runs in a single dedicated worker thread, so the event loop never
blocks on disk. Each backend operation (read, decide through the transition table,
write) is one function run in that thread, so operations are serialized, and each
ends in one atomic ``WriteBatch`` (synced to disk when ``sync=True``). A crash
between operations therefore never leaves a half-applied move or an index that
disagrees with the records. Only this process writes, so the queue never polls.

Key layout (``enc(s)`` is a self-delimiting component: UTF-8 with NUL escaped as
``00 FF``, ended by ``00 01``, so no id or tag can collide with another or escape
its prefix; ``id`` is the raw UTF-8 job id, always the last component; times are
microseconds since 0001-01-01 UTC as big-endian u64; ``seq`` is the job's enqueue
sequence number, a big-endian u64 allocated from the meta counters, so it survives
reopening)::

    M                                   -> JSON {"application": "jobpool_async", "format": 6}
    N                                   -> next seq u64, promoted-until u64, count per
                                           status, retry sum
    J id                                -> the job record (_leveldb_codec.encode_job)
    E prio sort_time seq id             -> ""  due eligible jobs, in selection order
    F enc(tag) prio sort_time seq id    -> ""  due eligible jobs per tag, likewise
    W scheduled_time seq id             -> ""  eligible jobs waiting for their schedule
    T enc(tag) id                       -> ""  every job per tag
    K enc(tag)                          -> count per status and retry sum of the tag's jobs
    A enc(assignee) created_time id     -> ""  RUNNING/CANCELLING jobs per assignee, or
                                           the claim's time (u64): see below
    D finalized_time seq id             -> ""  COMPLETED jobs by finalized_at (TTL cleanup)
    S status_code created_time id       -> ""  jobs per status (u8 code), for list_jobs,
                                           but RUNNING/CANCELLING ones (format 4)
    Y enc(job_type) created_time id     -> ""  every job per type, likewise
    C enc(tag) created_time id          -> ""  every job per tag, likewise

``list_jobs`` walks ``S``/``Y``/``C`` keys backwards from its cursor
``(created_time, id)``: newest first, ties by id. RUNNING and CANCELLING jobs are
listed from their ``A`` keys (each assignee's are in ``created_time, id`` order, and
the walks of the assignees are merged); a page without filters merges the ``Y`` walks
of every job type (found by seeking from one type's keys to the next). So a job's
life writes 11 keys (enqueue: ``J``, ``Y``, ``E``, ``S``; claim: ``E`` and ``S`` out,
``A`` in; completion: ``A`` out, ``D``, ``S`` and ``J`` in), not 15.

A claim (format 6) writes no job record: the job's ``A`` key holds the claim's time
(big-endian u64 micros), and its record stays as the job was before the claim (an
eligible status). The job is what ASSIGN makes of that record (RUNNING, the assignee
of the ``A`` key, assigned then, started then unless it had started before, one
attempt more: see :func:`_claimed`). The backend keeps the ``A`` key of every job
claimed so in memory (``_claims``: read from the ``A`` keys at open), so a read by id
finds it; any other write of the job's record empties the ``A`` value (a
CANCELLING job's, say) or deletes the key. An empty ``A`` value: the record says it
all (every ``A`` key of format 5, whose upgrade writes only the format mark).

Older stores are upgraded in place on open: format 1 (before the listing keys) gets
them (:func:`_upgrade`), format 2 its records re-encoded (:func:`_upgrade_to_3`),
format 3 loses its ``L`` keys and the ``S`` keys of RUNNING/CANCELLING jobs, and its
``A`` keys get the job's created time (:func:`_stage_format_4`). Format 5 has the keys
of format 4 and writes job records of version 3 (their header little-endian, cheaper
to pack: see :mod:`._leveldb_codec`); it reads the version 2 records of older formats
as they are and rewrites them when their jobs move, so its upgrade writes only its
mark (:func:`_upgrade_to_6`; from format 3 in the batch of format 4's changes); so
does format 6's (format 5 stores hold no claim in an ``A`` value).

Leases (SPEC §8.4)::

    G enc(assignee) holder              -> first_seen, renewed, expires (u64 each)

The ``G`` records need no format change: code from before leases never reads
them, and a store without any simply has no leases yet.

``prio`` is 32767 - priority as big-endian u16 (higher priorities first);
``sort_time`` is the due key: ``scheduled_at``, else ``last_retry_at``, else
``created_at``. An eligible job is in ``W`` instead of ``E``/``F`` while its
``scheduled_at`` is after the *promotion watermark* kept in ``N``: a claim at
``now`` first moves the ``W`` entries up to ``now`` into ``E``/``F`` and raises
the watermark to ``now`` (one batch), so jobs scheduled for later are never
scanned by a claim. A claim walks ``E`` (or
the ``F`` index of the filter tag with the fewest eligible jobs, checking the other
tags in the record), so its cost does not depend on how many final jobs are kept.
Stats without tags read ``N``; with one tag, ``K``; with several, the ``T`` index of
the smallest tag.

Because this process is the only writer, it also keeps, updated only after a
successful write: the counters of ``N``; per eligible index, the key where the last
claim stopped (so claims skip LevelDB's deletion markers of claimed entries);
the records of RUNNING/CANCELLING jobs (so completing a job reads nothing; a claim
hands its job object out and keeps the record's values, which say what it is: see
``_Rec.job``); and decoded copies of up to ``_MAX_ELIGIBLE`` eligible jobs (filled
until full; claims take the oldest, so it holds the next ones to claim, and a claim
of a job enqueued or retried recently reads and decodes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import struct
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from . import _leveldb_codec as codec
from ._files import check_parent
from ._records import LeaseTimes, RecordStore
from ._thread import WorkerThread
from .base import (
    ACTIVE,
    ASSIGN,
    COMPLETE,
    ELIGIBLE,
    CheckedJobs,
    DuplicateJobError,
    Job,
    JobPoolError,
    JobState,
    JobStatus,
    LeaseRow,
    ListQuery,
    Moved,
    Refill,
    StorageError,
    Transition,
    apply_transition,
)

__all__ = ["LevelDBBackend", "RepairReport"]

_T = TypeVar("_T")
_new_tuple = tuple.__new__
_new_object = object.__new__
logger = logging.getLogger("jobpool_async")

INSTALL_HINT = "pip install 'jobpool_async[leveldb]'"

_META = b"M"
_COUNTERS = b"N"
_JOB = b"J"
_ELIGIBLE = b"E"
_ELIGIBLE_TAG = b"F"
_TAG = b"T"
_TAG_COUNTS = b"K"
_ASSIGNEE = b"A"
_DONE = b"D"
#: Every job by created time (formats 2 and 3 only: removed by the upgrade to 4).
_LIST = b"L"
_LIST_STATUS = b"S"
_LIST_TYPE = b"Y"
_LIST_TAG = b"C"
#: Jobs per write batch when a format 1 store gets its listing keys.
_UPGRADE_BATCH = 10_000
#: Eligible jobs waiting for their schedule (format 3).
_WAITING = b"W"
_LEASE = b"G"
_LEASE_TIMES = struct.Struct(">QQQ")
_ELIGIBLE_CODES = frozenset(codec.CODE_OF[s] for s in ELIGIBLE)
_ACTIVE_CODES = frozenset(codec.CODE_OF[s] for s in ACTIVE)
#: (``JobStatus.X`` is a slow class-attribute lookup on Python 3.11, about 900
#: instructions: hot paths use these.)
_COMPLETED, _RUNNING_STATUS = JobStatus.COMPLETED, JobStatus.RUNNING
_RUNNING = codec.CODE_OF[_RUNNING_STATUS]
_COMPLETED_CODE = codec.CODE_OF[_COMPLETED]
_PENDING = JobStatus.INITIAL_PENDING
_PENDING_CODE = codec.CODE_OF[_PENDING]
#: (``codec.to_micros`` without its cache, and a record's version byte)
_ORIGIN, _US, _RECORD_V3 = codec.ORIGIN, codec.US, codec.VERSION_BYTE
#: (A record's header and its flags, see ``codec.record_parts``.)
_pack_head_into, _HEAD_SIZE = codec.pack_head_into, codec.HEAD_SIZE
_pack_time_into, _pack_i64_into = codec.pack_time_into, codec.pack_i64_into
_pack_u32_into, _pack_lengths_into = codec.pack_u32_into, codec.pack_lengths_into
_AT_STARTED, _AT_FINALIZED, _AT_ASSIGNED = codec.AT_STARTED, codec.AT_FINALIZED, codec.AT_ASSIGNED
_AT_ATTEMPTS, _AT_LENGTHS = codec.AT_ATTEMPTS, codec.AT_CHANGING_LENGTHS
_AT_N_ASSIGNEE, _AT_CODE, _AT_FLAGS = codec.AT_N_ASSIGNEE, codec.AT_CODE, codec.AT_FLAGS
_F_STARTED, _F_FINALIZED = codec.F_STARTED, codec.F_FINALIZED
_F_ASSIGNED, _F_RESULT = codec.F_ASSIGNED, codec.F_RESULT
#: ``_stage_claim`` applies ASSIGN inline, as ``apply_transition`` would for a move from
#: an eligible status to RUNNING that assigns and does nothing else; if the table ever
#: gives ASSIGN more to do, this fails at import instead of the claim going wrong.
_ASSIGN_INLINE = (
    ASSIGN._targets == dict.fromkeys(ELIGIBLE, _RUNNING_STATUS)
    and ASSIGN.assign
    and not (ASSIGN.exhausted or ASSIGN.retry_sources or ASSIGN.reopens or ASSIGN.schedules)
)
#: Likewise ``_stage_move`` applies COMPLETE inline: a move to COMPLETED from statuses
#: other than COMPLETED that sets ``finalized_at`` and any result and message given.
_COMPLETE_INLINE = (
    set(COMPLETE._targets.values()) == {_COMPLETED}
    and _COMPLETED not in COMPLETE._targets
    and not (COMPLETE.assign or COMPLETE.exhausted or COMPLETE.retry_sources)
    and not (COMPLETE.reopens or COMPLETE.schedules or COMPLETE.keeps_message)
)
if not (_ASSIGN_INLINE and _COMPLETE_INLINE):
    raise ImportError("LevelDBBackend's inline ASSIGN/COMPLETE no longer match the table")
#: Bytes of an ``A`` key after its assignee: the job's created time (u64 micros).
_CREATED_SIZE = 8
#: How many per-tag scan floors to remember (see ``_floors``).
_MAX_FLOORS = 4096
#: LevelDB's messages when another handle (this process) or process holds the LOCK file.
_LOCKED = "already held by process"
_LOCK_BUSY = "Resource temporarily unavailable"
#: How many RUNNING/CANCELLING jobs to keep decoded in memory (see ``_active``).
_MAX_ACTIVE = 100_000
#: How many eligible jobs to keep decoded in memory (see ``_eligible``).
_MAX_ELIGIBLE = 10_000
#: Store directories a backend of this process has open (``repair`` refuses them).
_OPEN_HERE: set[Path] = set()
#: Keys derived from the job records, which a repair rebuilds.
_DERIVED = (
    _ELIGIBLE,
    _ELIGIBLE_TAG,
    _WAITING,
    _TAG,
    _TAG_COUNTS,
    _ASSIGNEE,
    _DONE,
    _LIST,
    _LIST_STATUS,
    _LIST_TYPE,
    _LIST_TAG,
)
#: Jobs per write batch while a repair rebuilds the indexes.
_REPAIR_CHUNK = 10_000


def _import_plyvel() -> Any:
    try:
        import plyvel
    except ImportError as exc:
        raise ImportError(
            f"LevelDBBackend needs the optional plyvel package: {INSTALL_HINT}"
        ) from exc
    return plyvel


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


#: The ``S`` key prefix of each status code.
_LIST_STATUS_OF = tuple(_LIST_STATUS + bytes((code,)) for code in range(codec.N_STATUS))
_LIST_STATUS_COMPLETED = _LIST_STATUS_OF[_COMPLETED_CODE]
_LIST_PENDING = _LIST_STATUS_OF[_PENDING_CODE]
_ORDER = struct.Struct(">HQQ")
_U64 = struct.Struct(">Q")
_TIME_SEQ = struct.Struct(">QQ")
_pack_time_seq, _CODE_OF, _STATUSES = _TIME_SEQ.pack, codec.CODE_OF, codec.STATUS_CODES


def _index_keys(
    job: Job,
    seq: int,
    idb: bytes,
    promoted: int,
    tail: bytes | None = None,
    now: datetime | None = None,
    now_us: int = 0,
) -> list[bytes]:
    """The status-dependent index keys of ``job`` (``idb``: its id as key bytes;
    ``promoted``: the promotion watermark, micros; ``tail``: its :func:`_tail`, if
    known; ``now_us``: the micros of ``now``, if that is the job's ``finalized_at``);
    the last is its ``S`` listing key, but for a RUNNING/CANCELLING job, whose one
    key is its ``A`` key (which lists it)."""
    status = job.status
    if tail is None:
        tail = _tail(job, idb)
    if status in ACTIVE:
        return [_ASSIGNEE + codec.enc(job.assignee_id) + tail]
    listed = _LIST_STATUS_OF[codec.CODE_OF[status]] + tail
    if status in ELIGIBLE:
        scheduled = job.scheduled_at
        if scheduled is not None:
            at = codec.to_micros(scheduled)
            if at > promoted:
                return [_WAITING + _TIME_SEQ.pack(at, seq) + idb, listed]
            due = at
        else:
            retried = job.last_retry_at
            due = codec.to_micros(job.created_at if retried is None else retried)
        # prio_part + order_part: higher priorities first, then the due key, then seq
        order = _ORDER.pack(32767 - job.priority, due, seq) + idb
        if not job.tags:
            return [_ELIGIBLE + order, listed]
        keys = [_ELIGIBLE + order]
        for tag in job.tags:
            keys.append(_ELIGIBLE_TAG + codec.enc(tag) + order)
        keys.append(listed)
        return keys
    if status is _COMPLETED:
        done = job.finalized_at
        assert done is not None
        done_us = now_us if done is now else codec.to_micros(done)
        return [_DONE + _TIME_SEQ.pack(done_us, seq) + idb, listed]
    return [listed]


def _tail(job: Job, idb: bytes) -> bytes:
    """The end of the job's listing keys: its ``created_at`` (u64 micros), then its id."""
    return codec.u64(codec.to_micros(job.created_at)) + idb


def _static_keys(job: Job, idb: bytes, tail: bytes | None = None) -> list[bytes]:
    """The keys of ``job`` that never change while it exists (tags, listing order)."""
    if tail is None:
        tail = _tail(job, idb)
    keys = [_LIST_TYPE + codec.enc(job.job_type) + tail]
    for tag in job.tags:
        enc = codec.enc(tag)
        keys.append(_TAG + enc + idb)
        keys.append(_LIST_TAG + enc + tail)
    return keys


def _upgrade(db: Any) -> None:
    """Bring a format 1 store to format 2: add the listing keys of every job.

    Batches of :data:`_UPGRADE_BATCH` jobs; the format mark is written with the last.
    An upgrade cut short leaves format 1 with some listing keys, which older code
    does not keep up to date: so an upgrade first removes any it finds.
    """
    for prefix in (_LIST, _LIST_STATUS, _LIST_TYPE, _LIST_TAG):
        with db.iterator(prefix=prefix, include_value=False) as it:
            wb = db.write_batch()
            for n, key in enumerate(it, 1):
                wb.delete(key)
                if n % _UPGRADE_BATCH == 0:
                    wb.write()
                    wb = db.write_batch()
            wb.write()
    wb = db.write_batch(sync=True)
    with db.iterator(prefix=_JOB, include_key=False) as it:
        for n, raw in enumerate(it, 1):
            job, _ = codec.decode_job(raw)
            idb = codec.id_bytes(job.id)
            tail = _tail(job, idb)
            # The keys of format 2 (which has ``L`` and every job's ``S`` key; the
            # upgrade to format 4 then removes those it no longer has).
            wb.put(_LIST + tail, b"")
            wb.put(_LIST_STATUS_OF[codec.CODE_OF[job.status]] + tail, b"")
            for key in _static_keys(job, idb, tail):
                if key[:1] != _TAG:  # T keys exist in format 1
                    wb.put(key, b"")
            if n % _UPGRADE_BATCH == 0:
                wb.write()
                wb = db.write_batch(sync=True)
    wb.put(_META, codec.encode_meta(2))
    wb.write()
    logger.info("upgraded LevelDB store to format %d", 2)


def _scan_prefix(key: bytes) -> bytes:
    """The index prefix (``E`` or ``F enc(tag)``) of an eligible-index key."""
    return key[:1] if key[:1] == _ELIGIBLE else key[: key.index(b"\x00\x01") + 2]


class _Rec:
    """A job as read, its enqueue sequence number and its key parts.

    The backend's own object, not a copy: a move changes it in place, and it is
    written through to the caches only once its write succeeded (a call that fails
    drops the caches, see ``LevelDBBackend._guarded``)."""

    __slots__ = (
        "assignee_b",
        "claimed",
        "claimed_us",
        "error_b",
        "head",
        "idb",
        "job",
        "job_id",
        "keys",
        "result_b",
        "seq",
        "static",
        "tail",
    )

    def __init__(self, job: Job, seq: int, idb: bytes, tail: bytes | None = None) -> None:
        #: The job (``None``: handed out by the claim that moved it, see
        #: ``LevelDBBackend._stage_claim``; its record values, ``head`` and the rest,
        #: are then the job as stored, and :meth:`full` decodes it from them again).
        self.job: Job | None = job
        #: Its id (set by the claim that leaves ``job`` ``None``).
        self.job_id = job.id
        self.seq = seq
        #: The id as key bytes.
        self.idb = idb
        #: The end of its listing keys (see :func:`_tail`).
        self.tail = _tail(job, idb) if tail is None else tail
        #: Its status-dependent index keys as last staged (``None``: not known yet).
        self.keys: list[bytes] | None = None
        #: Its :func:`codec.job_static` (``None``: not computed yet).
        self.static: codec.Static | None = None
        #: The time of the claim that assigned it (its ``assigned_at`` and
        #: ``started_at``) and its micros, if this process staged it.
        self.claimed: datetime | None = None
        self.claimed_us = 0
        #: Its record's :func:`codec.record_parts` as last staged: the packed header
        #: (``None``: not known; always with ``static``), which a claim or a completion
        #: changes in place (the values it moves packed at their offsets) instead of
        #: encoding the whole job, and the encoded error message, assignee and result.
        #: (A ``bytearray``, which the cyclic collector does not track: a tuple of
        #: values kept with each cached job cost it more than packing; unpacking and
        #: packing the whole header cost twice the patching.)
        self.head: bytearray | None = None
        self.error_b = self.assignee_b = self.result_b = b""

    def index_keys(self, promoted: int) -> list[bytes]:
        """Its status-dependent index keys; those of a job with a schedule depend on
        the promotion watermark, so they are computed again each time."""
        keys = self.keys
        job = self.job or self.full()
        if keys is None or job.scheduled_at is not None:
            keys = self.keys = _index_keys(job, self.seq, self.idb, promoted, self.tail)
        return keys

    def full(self) -> Job:
        """Its job, decoded again from its record values if its claim handed it out."""
        job = self.job
        if job is None:
            job = self.job = self.decoded()
        return job

    def decoded(self) -> Job:
        """Its job as its record values say (a new object each time)."""
        head, static = self.head, self.static
        assert head is not None and static is not None  # (kept whenever ``job`` is not)
        parts = (_RECORD_V3, head, static[0], self.error_b, self.assignee_b, self.result_b)
        return codec.decode_job(b"".join((*parts, static[4])))[0]


def _decoded(raw: bytes, idb: bytes | None = None) -> _Rec:
    job, seq = codec.decode_job(raw)
    return _Rec(job, seq, codec.id_bytes(job.id) if idb is None else idb)


def _claimed(rec: _Rec, key: bytes, value: bytes, where: str) -> _Rec:
    """``rec``, decoded from its record (the job before its claim, format 6), as the
    claim that its ``A`` key ``key`` holds (``value``: the claim's time) made it: ASSIGN
    applied as ``LevelDBBackend._stage_claim`` applies it."""
    job = rec.job
    assert job is not None
    if len(value) != _CREATED_SIZE or job.status not in ELIGIBLE:
        raise StorageError(
            f"the LevelDB store {where} is damaged: the claim of job {job.id!r} in its "
            f"assignee index does not fit its record. {_repair_hint(where)}"
        )
    at_us = codec.read_u64(value, 0)
    at = codec.from_micros(at_us)
    job.assignee_id = codec.split_enc(key, 1)[0]
    job.assigned_at = at
    job.attempts += 1
    if job.started_at is None:
        job.started_at = at
    job.status = _RUNNING_STATUS
    rec.keys = [key]
    rec.claimed, rec.claimed_us = at, at_us
    return rec


def _stored_claims(db: Any) -> Iterator[tuple[bytes, bytes, bytes, bytes | None]]:
    """Each ``A`` key that holds a claim (format 6), its value, its job's id bytes and
    that job's record (``None``: none)."""
    with db.iterator(prefix=_ASSIGNEE) as it:
        for key, value in it:
            if value:
                _, end = codec.split_enc(key, 1)
                idb = key[end + _CREATED_SIZE :]
                yield key, value, idb, db.get(_JOB + idb)


def _claims_of(db: Any, where: str) -> dict[str, bytes]:
    """The ``A`` keys that hold a claim (format 6), by job id; each checked against its
    job's record (which must exist, in an eligible status)."""
    claims: dict[str, bytes] = {}
    for key, value, idb, raw in _stored_claims(db):
        status = None if raw is None else codec.decode_state(raw)[0]
        if len(value) != _CREATED_SIZE or status not in ELIGIBLE:
            raise StorageError(
                f"the LevelDB store {where} is damaged: the assignee index holds a claim "
                f"of job {codec.id_text(idb)!r} that does not fit its record "
                f"({'none' if status is None else status.name}). {_repair_hint(where)}"
            )
        claims[codec.id_text(idb)] = key
    return claims


def _settle_claims(db: Any, where: str) -> None:
    """Write the record of every job whose claim its ``A`` key holds (format 6) as the
    claim made it, and empty the ``A`` value, in one synced batch (so a repair, which
    rebuilds every ``A`` key from the records, keeps the claims; run again if cut
    short, it finds those left). A claim that does not fit its record is dropped."""
    with db.write_batch(sync=True) as wb:
        for key, value, idb, raw in _stored_claims(db):
            if raw is None:
                continue  # (its record is lost; its ``A`` key is rebuilt away)
            try:
                rec = _claimed(_decoded(raw, idb), key, value, where)
            except StorageError as exc:
                logger.warning("repair of %s drops a claim (%r): %s", where, key, exc)
                wb.put(key, b"")
                continue
            assert rec.job is not None
            wb.put(_JOB + idb, codec.encode_job(rec.job, rec.seq))
            wb.put(key, b"")


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What :meth:`LevelDBBackend.repair` did."""

    #: Job records in the store after the repair (every one indexed and counted).
    jobs: int
    #: Jobs the store's counters knew before the repair (``None``: unreadable).
    counted_before: int | None
    #: Records that could not be decoded, removed by the repair.
    dropped_records: int


#: A job's status code, retry count and index keys before it moves.
_Prior = tuple[int, int, list[bytes]]


class _Write:
    """The changes of one operation, staged in one ``WriteBatch`` until it is written.

    Keys are put and deleted in the batch as they are staged: LevelDB applies a
    batch's operations in order, so a key staged twice ends as it was staged last."""

    __slots__ = (
        "batch",
        "claims",
        "counts",
        "delete",
        "eligible_moved",
        "fresh",
        "general",
        "lowered",
        "moved_at",
        "moved_us",
        "next_due",
        "next_seq",
        "promoted",
        "promotes",
        "put",
        "scanned",
        "tag_counts",
        "touched",
        "waiting",
    )

    def __init__(self, batch: Any, promoted: int) -> None:
        self.batch = batch
        self.put: Callable[[bytes, bytes], None] = batch.put
        self.delete: Callable[[bytes], None] = batch.delete
        #: The promotion watermark the index keys are computed with.
        self.promoted = promoted
        #: The earliest ``W`` time this write adds (micros), if any.
        self.waiting: int | None = None
        self.counts = codec.Counters()
        self.tag_counts: dict[str, codec.Counters] = {}
        #: Per eligible index (prefix), the smallest key this write adds to it.
        self.lowered: dict[bytes, bytes] = {}
        self.next_seq: int | None = None
        #: Jobs this write changes (``None``: deleted), for the caches.
        self.touched: dict[str, _Rec | None] = {}
        #: Jobs this write claims, by id: their ``A`` key, which holds the claim (see
        #: ``LevelDBBackend._claims``).
        self.claims: dict[str, bytes] = {}
        #: New eligible jobs this write inserts, by id bytes, for the eligible cache
        #: (as many as it has room for; ``None``: none).
        self.fresh: dict[bytes, _Rec] | None = None
        #: Whether a staging other than a claim's (``_stage_claim``) and a completion's
        #: (``_stage_complete``) touched a job: then ``_commit`` updates both caches
        #: for every touched job; else only the active cache changes (see there).
        self.general = False
        #: Whether a job this write moves was or becomes eligible.
        self.eligible_moved = False
        #: A claim's eligible index (prefix) and the key its next claim may start at.
        self.scanned: tuple[bytes, bytes] | None = None
        #: Whether this write promotes the due ``W`` entries (see ``_stage_promotion``),
        #: and then the time of the first one left (micros), if any.
        self.promotes = False
        self.next_due: int | None = None
        #: The ``finalized_at`` of the last job this write finalized, and its micros
        #: (the jobs a call moves share its timestamp: looked up once per call).
        self.moved_at: datetime | None = None
        self.moved_us = 0

    def _count(self, job: Job, sign: int) -> None:
        code = codec.CODE_OF[job.status]
        retries = job.retry_count
        self.counts.add(code, retries, sign)
        for tag in job.tags:
            counters = self.tag_counts.get(tag)
            if counters is None:
                counters = self.tag_counts[tag] = codec.Counters()
            counters.add(code, retries, sign)

    def move_tags(self, tags: list[str], old_code: int, code: int) -> None:
        """Count a job of ``tags`` moved from status ``old_code`` to ``code`` (no retry)."""
        tag_counts = self.tag_counts
        for tag in tags:
            counters = tag_counts.get(tag)
            if counters is None:
                counters = tag_counts[tag] = codec.Counters()
            values = counters.values
            values[old_code] -= 1
            values[code] += 1

    def unindex(self, rec: _Rec) -> None:
        self._count(rec.job or rec.full(), -1)
        delete = self.delete
        for key in rec.index_keys(self.promoted):
            delete(key)

    def index(self, job: Job, seq: int, idb: bytes, tail: bytes) -> list[bytes]:
        """Stage the index keys and counts of a new job; returns the keys."""
        self._count(job, +1)
        keys = _index_keys(job, seq, idb, self.promoted, tail)
        self._add_keys(job, keys)
        return keys

    def _add_keys(self, job: Job, keys: list[bytes]) -> None:
        put = self.put
        for key in keys:
            put(key, b"")
        if job.status in ELIGIBLE:
            lowered = self.lowered
            for key in keys[:-1]:  # the eligible-index keys (the last is its S key)
                if key[:1] == _WAITING:
                    at = codec.read_u64(key, 1)
                    if self.waiting is None or at < self.waiting:
                        self.waiting = at
                    continue
                prefix = _scan_prefix(key)
                low = lowered.get(prefix)
                if low is None or key < low:
                    lowered[prefix] = key

    def moved(self, rec: _Rec, prior: _Prior) -> None:
        """Stage the index and counter changes of the job, which was as ``prior`` says
        (status code, retry count, index keys) before."""
        old_code, old_retries, old_keys = prior
        job = rec.job or rec.full()
        code = codec.CODE_OF[job.status]
        retries = job.retry_count
        eligible = code in _ELIGIBLE_CODES
        if eligible or old_code in _ELIGIBLE_CODES:
            self.eligible_moved = True
        if code != old_code or retries != old_retries:
            values = self.counts.values
            values[old_code] -= 1
            values[code] += 1
            values[-1] += retries - old_retries
            for tag in job.tags:
                counters = self.tag_counts.get(tag)
                if counters is None:
                    counters = self.tag_counts[tag] = codec.Counters()
                values = counters.values
                values[old_code] -= 1
                values[code] += 1
                values[-1] += retries - old_retries
        if code == old_code and not eligible:
            return  # same status, same assignee / finalized_at: same keys
        new_keys = rec.keys = _index_keys(
            job, rec.seq, rec.idb, self.promoted, rec.tail, self.moved_at, self.moved_us
        )
        if new_keys == old_keys:  # (RUNNING <-> CANCELLING: the same ``A`` key)
            return
        # Old keys out, new keys in: LevelDB applies a batch in order, so a key in
        # both (an eligible job moved within its status) ends put.
        delete = self.delete
        for key in old_keys:
            delete(key)
        if eligible:
            self._add_keys(job, new_keys)
        else:
            put = self.put
            for key in new_keys:
                put(key, b"")


class LevelDBBackend(RecordStore[_Rec, _Write, _Prior]):
    """Jobs in a LevelDB directory (created if missing), used by one process at a time.

    ``sync=True`` makes every write wait for the disk (survives an OS crash, not
    only a process crash), at a large cost in speed.
    """

    default_poll_interval = None

    def __init__(self, path: str | os.PathLike[str], *, sync: bool = False) -> None:
        self._plyvel = _import_plyvel()
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be str or os.PathLike, got {type(path).__name__}")
        if not str(path):
            raise ValueError("path must not be empty")
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be bool, got {type(sync).__name__}")
        self.path = Path(path)
        self.sync = sync
        self._db: Any = None
        #: An I/O error hit the handle: reopen it before the next call (``_reopen``).
        self._suspect = False
        self._thread: WorkerThread | None = None
        self._closed = False
        self._next_seq = 0
        self._counts = codec.Counters()
        #: The promotion watermark (micros): see the module docs.
        self._promoted = 0
        #: The earliest ``W`` entry's time (may be stale-early after a cancel).
        self._next_due: datetime | None = None
        #: Index prefix -> a key no live key of that index sorts below. Claims start
        #: there, skipping the deletion markers LevelDB keeps for claimed entries.
        self._floors: dict[bytes, bytes] = {}
        #: RUNNING/CANCELLING jobs as last written (written through in ``_commit``), so
        #: completing a job just assigned needs no read or decode.
        self._active: dict[str, _Rec] = {}
        #: Eligible jobs as last written, by id bytes, so a claim of a job enqueued or
        #: retried recently needs no read or decode. Filled until full, and a claim
        #: takes the oldest first, so it holds the next jobs to be claimed.
        self._eligible: dict[bytes, _Rec] = {}
        #: Every job whose claim only its ``A`` key holds (its record says what it was
        #: before: see the module docs), by id: that key. Read from the store at open,
        #: changed only after a successful write.
        self._claims: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"LevelDBBackend({str(self.path)!r}, sync={self.sync})"

    @classmethod
    async def repair(cls, path: str | os.PathLike[str]) -> RepairReport:
        """Repair a damaged store in place; the explicit fix for a ``StorageError``
        saying the store is damaged. The store must not be open anywhere.

        LevelDB's own repair (``plyvel.repair_db``) first salvages every record its
        files still hold; then every index and counter is rebuilt from the job
        records that survived (records that cannot be decoded are removed and
        counted). Jobs whose records were lost are gone: the report says how many
        the counters knew before. Safe to run again if interrupted.
        """
        plyvel = _import_plyvel()
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise TypeError(f"path must be a non-empty str or os.PathLike, got {path!r}")
        return await asyncio.to_thread(_repair_sync, plyvel, Path(path))

    # --- running in the worker thread ---------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed or self._thread is None:
            raise StorageError(f"{self!r} is closed" if self._closed else f"{self!r} is not open")
        future: asyncio.Future[_T] = self._thread.submit(self._guarded, fn, *args)
        # Once submitted, an operation runs to its end even if the caller is cancelled
        # (as a statement sent to a database server would): later calls, queued behind
        # it in the one worker thread, then see its effect. A cancelled caller cancels
        # only this future, which the thread then leaves alone (``_settle``); no
        # ``asyncio.shield`` (its second future and callbacks cost every call).
        # No done callback (``_consume``) either: the awaiting task's wake-up takes
        # the outcome (so an error is never reported as not retrieved, even when the
        # task is cancelled after it was set), and a caller cancelled before the
        # outcome cancelled the future, which then gets none.
        return await future

    def _guarded(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._suspect:
            self._reopen()
        if self._db is None:
            raise StorageError(f"{self!r} is closed")
        try:
            return fn(*args)
        except BaseException as exc:
            # Its staging may have changed cached jobs in place, unwritten: drop them.
            self._active.clear()
            self._eligible.clear()
            if isinstance(exc, JobPoolError) or not isinstance(exc, self._plyvel.Error):
                raise
            text = _message(exc)
            if isinstance(exc, self._plyvel.IOError):
                self._suspect = True
                text += " (the store is reopened before the next call)"
            raise StorageError(f"LevelDB error in {self.path}: {text}") from exc

    def _reopen(self) -> None:
        """Close and reopen the LevelDB handle after an I/O error (a full disk, say).

        A handle whose log write failed must not be written through again: LevelDB
        keeps appending after the torn record, and an open later drops what follows
        it, so writes it acknowledged would be lost. A fresh handle replays the log
        (the torn tail is ignored) and starts a new one. While that fails (the disk
        is still full), every call raises ``StorageError`` and the next one retries.
        """
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(self._plyvel.Error):
                db.close()
        # Caches of what the old handle wrote: rebuilt from the store as it is.
        self._floors.clear()
        self._active.clear()
        self._eligible.clear()
        try:
            self._open_sync()
        except StorageError as exc:
            raise StorageError(
                f"{self!r}: a write failed, and reopening the store failed too, so "
                f"nothing is read or written until it succeeds (the next call tries "
                f"again): {exc}"
            ) from exc
        self._suspect = False
        logger.warning("%r reopened its store after an I/O error", self)

    # --- open / close -------------------------------------------------------------

    async def open(self) -> None:
        if self._closed:
            raise StorageError(f"{self!r} is closed")
        if self._thread is not None:
            return
        thread = WorkerThread("jobpool-leveldb")
        try:
            await thread.submit(self._open_sync)
        except BaseException:
            thread.stop()
            raise
        self._thread = thread
        _OPEN_HERE.add(self.path.resolve())

    def _open_sync(self) -> None:
        path = self.path
        where = str(path)
        if path.exists() and not path.is_dir():
            raise StorageError(f"{where} is not a directory, so not a jobpool_async LevelDB store")
        if not path.exists():
            check_parent(path, "LevelDB store")
        fresh = not path.exists() or not any(path.iterdir())
        if not fresh and not (path / "CURRENT").is_file():
            raise StorageError(f"{where} is a non-empty directory but not a LevelDB store")
        plyvel = self._plyvel
        try:
            # paranoid_checks: a damaged write-ahead log (or table) fails the open,
            # instead of LevelDB dropping the damaged records and rewriting the log
            # without them, which would make the loss permanent.
            #
            # compression=None: snappy cost 50,000 instructions per job on the drain
            # workload (a sixth of the storage side's; LevelDB compresses every table
            # it writes, and a job's record was written three times then), for little: a
            # job is mostly its payload, which the caller chose. A block says itself
            # whether it is compressed, so stores written either way open either way.
            db = plyvel.DB(where, create_if_missing=fresh, paranoid_checks=True, compression=None)
        except plyvel.CorruptionError as exc:
            raise StorageError(
                f"the LevelDB store {where} is damaged ({_message(exc)}); it was left as "
                f"it is. {_repair_hint(where)}"
            ) from exc
        except plyvel.IOError as exc:
            text = _message(exc)
            if _LOCKED in text or _LOCK_BUSY in text:
                raise StorageError(
                    f"the LevelDB store {where} is in use by another backend or process "
                    f"(only one may open it at a time): {text}"
                ) from exc
            raise StorageError(f"cannot open the LevelDB store {where}: {text}") from exc
        except plyvel.Error as exc:
            raise StorageError(f"cannot open the LevelDB store {where}: {_message(exc)}") from exc
        try:
            meta = db.get(_META)
            if meta is None:
                with db.iterator(include_value=False) as it:
                    if next(it, None) is not None:
                        raise StorageError(
                            f"{where} is a LevelDB database but not a jobpool_async store"
                        )
                wb = db.write_batch(sync=True)
                wb.put(_META, codec.encode_meta())
                wb.put(_COUNTERS, codec.encode_global(0, 0, codec.Counters()))
                wb.write()
                self._next_seq, self._promoted, self._counts = 0, 0, codec.Counters()
            else:
                version = codec.check_meta(meta, where)
                if version < 2:
                    _upgrade(db)
                if version < 3:
                    _upgrade_to_3(db, where)
                if version < 6:
                    _upgrade_to_6(db, where, max(version, 3))
                raw = db.get(_COUNTERS)
                if raw is None:
                    raise StorageError(f"{where}: jobpool_async store without its counters")
                self._next_seq, self._promoted, self._counts = codec.decode_global(raw)
                _check_counters(db, self._counts, where)
            self._claims = _claims_of(db, where) if meta is not None else {}
            self._next_due = _first_waiting(db)
        except BaseException as exc:
            db.close()
            if isinstance(exc, plyvel.Error):
                raise StorageError(f"cannot open {where}: {_message(exc)}") from exc
            raise
        self._db = db

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        _OPEN_HERE.discard(self.path.resolve())
        try:
            await thread.submit(self._close_sync)
        finally:
            thread.stop()

    def _close_sync(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    # --- staging and writing ------------------------------------------------------

    def _read(self, job_id: str) -> _Rec | None:
        """The job's record, from the active cache (the cached object itself: see
        :class:`_Rec`) or the store."""
        cached = self._active.get(job_id)
        if cached is not None:
            return cached
        idb = codec.id_bytes(job_id)
        raw = self._db.get(_JOB + idb)
        if raw is None:
            return None
        key = self._claims.get(job_id)
        return _decoded(raw, idb) if key is None else self._claimed(_decoded(raw, idb), key)

    def _claimed(self, rec: _Rec, key: bytes) -> _Rec:
        """``rec``, decoded from its record, as the claim its ``A`` key holds made it."""
        value = self._db.get(key)
        if value is None:
            raise StorageError(f"the claim of job {rec.job_id!r} is missing from the store")
        return _claimed(rec, key, value, str(self.path))

    def _tag_counters(self, tag: str) -> codec.Counters:
        raw = self._db.get(_TAG_COUNTS + codec.enc(tag))
        return codec.Counters() if raw is None else codec.Counters.decode(raw)

    def _commit(self, w: _Write) -> None:
        """Write everything staged in ``w`` as one batch; then update the caches."""
        counts = self._counts.merged(w.counts)
        next_seq = self._next_seq if w.next_seq is None else w.next_seq
        promoted = max(self._promoted, w.promoted)
        wb = w.batch
        for tag, delta in w.tag_counts.items():
            if not any(delta.values):
                continue
            key = _TAG_COUNTS + codec.enc(tag)
            merged = self._tag_counters(tag).merged(delta)
            if merged.total:
                wb.put(key, merged.encode())
            else:
                wb.delete(key)
        wb.put(_COUNTERS, codec.encode_global(next_seq, promoted, counts))
        wb.write()
        # Only now that the write succeeded do the in-memory copies change.
        self._counts, self._next_seq, self._promoted = counts, next_seq, promoted
        if w.scanned is not None:
            prefix, start = w.scanned
            if prefix in self._floors or len(self._floors) < _MAX_FLOORS:
                self._floors[prefix] = start
        if w.promotes:
            self._next_due = None if w.next_due is None else codec.from_micros(w.next_due)
        if w.waiting is not None:
            due = codec.from_micros(w.waiting)
            if self._next_due is None or due < self._next_due:
                self._next_due = due
        for prefix, key in w.lowered.items():
            floor = self._floors.get(prefix)
            if floor is not None and key < floor:
                self._floors[prefix] = key
        active, eligible = self._active, self._eligible
        if w.fresh:  # (new jobs, so in neither cache yet; room was left for them)
            eligible.update(w.fresh)
        touched = w.touched
        if not w.general and len(active) + len(touched) <= _MAX_ACTIVE:
            # Only claims and completions touched jobs: a claimed job (RUNNING) left
            # the eligible cache when ``_pick`` took it, a completed one was active
            # (so in no eligible cache): only the active cache changes. (Per job.)
            # (Their status from the record values, which both keep: a claimed job's
            # record has no job, see ``_Rec.job``.)
            # (A RUNNING one was claimed here: ``w.claims`` has it.)
            claims = self._claims
            for job_id, rec in touched.items():
                if rec.head[_AT_CODE] == _RUNNING:  # type: ignore[union-attr,index]
                    active[job_id] = rec  # type: ignore[assignment]
                else:
                    active.pop(job_id, None)
                    claims.pop(job_id, None)
            if w.claims:
                claims.update(w.claims)
            return
        claims = self._claims
        for job_id in touched:  # (the claims of this write put back below)
            claims.pop(job_id, None)
        if w.claims:
            claims.update(w.claims)
        for job_id, rec in touched.items():
            if rec is None:
                active.pop(job_id, None)
                if eligible:
                    eligible.pop(codec.id_bytes(job_id), None)
                continue
            job = rec.job  # (``None``: a claimed job's record, see ``_Rec.job``)
            status = _STATUSES[rec.head[_AT_CODE]] if job is None else job.status  # type: ignore[index]
            if status in ACTIVE and len(active) < _MAX_ACTIVE:
                active[job_id] = rec
            else:
                active.pop(job_id, None)
            if status in ELIGIBLE and len(eligible) < _MAX_ELIGIBLE:
                eligible[rec.idb] = rec
            elif eligible:
                eligible.pop(rec.idb, None)

    def _job(self, record: _Rec) -> Job:
        return record.job or record.full()

    def _snapshot(self, record: _Rec) -> Job:
        job = record.job
        if job is None:  # (handed out by its claim: a new object is the snapshot)
            return record.decoded()
        return job.copy() if self._active.get(job.id) is record else job

    def _exists(self, job_id: str) -> bool:
        return self._db.get(_JOB + codec.id_bytes(job_id)) is not None

    def _stage(self) -> _Write:
        return _Write(self._db.write_batch(sync=self.sync), self._promoted)

    def _insert_jobs(self, jobs: list[Job]) -> None:
        # (``RecordStore._insert_jobs`` with the duplicate check in the staging loop,
        # which has each job's record key at hand: no ``_exists`` call per job. A
        # duplicate raises before anything is written, as there.)
        if jobs:
            w = self._stage()
            self._stage_insert(w, jobs, self._db.get)
            self._commit(w)

    def _stage_insert(
        self, w: _Write, jobs: Sequence[Job], get: Callable[[bytes], bytes | None] | None = None
    ) -> None:
        """Stage new jobs; with ``get`` (the store's), a job whose record exists raises
        :class:`DuplicateJobError` (the write is then dropped)."""
        seq = self._next_seq
        room = _MAX_ELIGIBLE - len(self._eligible)
        # A queue's checked copies are kept as they are; any other caller keeps its
        # Job objects, so the cache gets copies of them.
        private = type(jobs) is CheckedJobs
        put, touched = w.put, w.touched
        values = w.counts.values
        pack_u64, pack_order, pack_head_into = _U64.pack, _ORDER.pack, _pack_head_into
        job_static, record_parts = codec.job_static, codec.record_parts
        join_record = codec.join_record
        # Cached eligible jobs this write adds (``_commit`` adds them all at once).
        fresh = w.fresh = {}
        # The last job type seen and its encodings (a batch's jobs share one).
        last_type: str | None = None
        type_b = listed_type = b""
        n_type = 0
        # Plain jobs (INITIAL_PENDING, untagged, unscheduled, no history: what an
        # enqueue brings) get their keys and record here, as ``_static_keys``,
        # ``_index_keys`` and ``codec.encode_job`` would give them (``check_store``
        # and a test of every record staged check them); the others go through those
        # and ``_Write.index``. The smallest ``E`` key staged here:
        low_e: bytes | None = None
        for job in jobs:
            job_id = job.id
            idb = job_id.encode("utf-8", "surrogatepass")  # (codec.id_bytes)
            record_key = _JOB + idb
            if get is not None and get(record_key) is not None:
                raise DuplicateJobError(job_id)
            if (
                job.status is _PENDING
                and not job.tags
                and job.scheduled_at is None
                and job.started_at is None
                and job.finalized_at is None
                and job.last_retry_at is None
                and job.assigned_at is None
                and job.result is None
                and not job.retry_count
                and not job.error_message
                and not job.assignee_id
            ):
                job_type = job.job_type
                if job_type is not last_type:
                    last_type = job_type
                    type_b = job_type.encode("utf-8", "surrogatepass")
                    n_type = len(type_b)
                    listed_type = _LIST_TYPE + codec.enc(job_type)
                definition = job.job_definition
                # (``codec.job_static``: not through the cache of ``to_micros``)
                created = (job.created_at - _ORIGIN) // _US
                n_id, body = len(idb), idb + type_b + definition
                static = (body, n_id, n_type, len(definition), b"", created)
                priority, max_attempts, attempts = job.priority, job.max_attempts, job.attempts
                head = bytearray(_HEAD_SIZE)
                pack_head_into(  # (``codec.record_parts`` of a plain job)
                    head,
                    0,
                    seq,
                    0,
                    created,
                    0,
                    0,
                    0,
                    0,
                    0,
                    -1 if max_attempts is None else max_attempts,
                    attempts,
                    n_id,
                    n_type,
                    static[3],
                    0,
                    0,
                    0,
                    0,
                    priority,
                    _PENDING_CODE,
                    0,
                )
                put(record_key, b"".join((_RECORD_V3, head, body)))
                tail = pack_u64(created) + idb
                put(listed_type + tail, b"")
                values[_PENDING_CODE] += 1
                key = _ELIGIBLE + pack_order(32767 - priority, created, seq) + idb
                listed = _LIST_PENDING + tail
                put(key, b"")
                put(listed, b"")
                if low_e is None or key < low_e:
                    low_e = key
                if room > 0:
                    room -= 1
                    # (``_Rec(...)`` without the frame of its ``__init__``, every slot
                    # set here: per job)
                    rec = fresh[idb] = _new_object(_Rec)
                    rec.job, rec.job_id = job if private else job.copy(), job_id
                    rec.seq, rec.idb, rec.tail, rec.keys = seq, idb, tail, [key, listed]
                    rec.static, rec.claimed, rec.claimed_us, rec.head = static, None, 0, head
                    rec.error_b = rec.assignee_b = rec.result_b = b""
                seq += 1
                continue
            static = job_static(job, idb)
            tail = pack_u64(static[5]) + idb
            packed, error, assignee, result = record_parts(job, seq, static)
            put(record_key, join_record(packed, error, assignee, result, static))
            for key in _static_keys(job, idb, tail):
                put(key, b"")
            keys = w.index(job, seq, idb, tail)
            w.general = True
            if room > 0:
                room -= 1
                rec = touched[job_id] = _new_object(_Rec)
                rec.job, rec.job_id = job if private else job.copy(), job_id
                rec.seq, rec.idb, rec.tail, rec.keys, rec.static = seq, idb, tail, keys, static
                rec.claimed, rec.claimed_us, rec.head = None, 0, bytearray(packed)
                rec.error_b, rec.assignee_b, rec.result_b = error, assignee, result
            seq += 1
        w.next_seq = seq
        if low_e is not None:
            low = w.lowered.get(_ELIGIBLE)
            if low is None or low_e < low:
                w.lowered[_ELIGIBLE] = low_e

    def _stage_move(
        self,
        w: _Write,
        record: _Rec,
        transition: Transition,
        now: datetime,
        result: bytes | None = None,
        error_message: str | None = None,
        assignee_id: str | None = None,
        scheduled_at: datetime | None = None,
        max_attempts: int | None = None,
    ) -> JobStatus | None:
        """:meth:`RecordStore._stage_move` in one frame: what the job's keys and
        counters depend on noted before the move, the move, then its key, counter and
        record changes staged (by ``_Write.moved``). A completion, the move of every
        drained job, applies COMPLETE inline (see ``_COMPLETE_INLINE``). Per completed
        job on the storage-only drain loop (callgrind): 4,200 instructions fewer than
        the generic path with its ``_before_move``/``_after_move`` hooks and
        ``apply_transition``."""
        job = record.job or record.full()
        old_status = job.status
        if old_status not in transition._targets:
            return None
        if transition is COMPLETE and old_status in ACTIVE and record.head is not None:
            self._stage_complete(w, record, now, result, error_message)
            return _COMPLETED
        keys = record.keys  # (``record.index_keys``, inline: per job)
        if keys is None or job.scheduled_at is not None:
            keys = record.index_keys(w.promoted)
        prior = (codec.CODE_OF[old_status], job.retry_count, keys)
        new: JobStatus | None
        if transition is COMPLETE:
            job.finalized_at = now
            if result is not None:
                job.result = result
            if error_message is not None:
                job.error_message = error_message
            job.status = new = _COMPLETED
        else:
            new = apply_transition(
                job,
                transition,
                now,
                result=result,
                error_message=error_message,
                assignee_id=assignee_id,
                scheduled_at=scheduled_at,
                max_attempts=max_attempts,
            )
            assert new is not None
        done = job.finalized_at
        if done is not None and done is not w.moved_at:
            w.moved_at, w.moved_us = done, codec.to_micros(done)
        w.moved(record, prior)
        static = record.static
        if static is None:  # (the fields no move changes: encoded once per job)
            static = record.static = codec.job_static(job)
        parts = codec.record_parts(
            job, record.seq, static, w.moved_at, w.moved_us, record.claimed, record.claimed_us
        )
        packed, record.error_b, record.assignee_b, record.result_b = parts
        record.head = bytearray(packed)
        w.put(_JOB + record.idb, codec.join_record(*parts, static))
        job_id = job.id
        claimed = job_id in self._claims or w.claims.pop(job_id, None) is not None
        if claimed and new in ACTIVE:
            # Its record now says it all: its ``A`` key no longer holds a claim.
            w.put(record.keys[0], b"")  # type: ignore[index]
        w.touched[job_id] = record
        w.general = True
        return new

    def _stage_complete(
        self,
        w: _Write,
        record: _Rec,
        now: datetime,
        result: bytes | None,
        error_message: str | None,
    ) -> Moved | None:
        """:attr:`RecordStore._stage_complete` (``None``: the general path), and
        ``_stage_move``'s, of COMPLETE for a RUNNING/CANCELLING job whose record values
        are known (``record.head``): the move of every drained job. Its one index key
        (``A``) out, its ``D`` and ``S`` keys in, the counters moved, and its record
        packed from the values as last staged with the moved ones changed (what
        ``codec.encode_job`` gives for the moved job: ``check_store`` in the tests
        compares every record with it)."""
        head, static, job = record.head, record.static, record.job
        if head is None:
            return None
        assert static is not None
        if job is None:  # handed out by its claim: its record values say what it is
            old_code = head[_AT_CODE]
            if old_code not in _ACTIVE_CODES:
                return None
        else:
            status = job.status
            if status not in ACTIVE:
                return None
            old_code = _CODE_OF[status]
        # Its index keys as they are (its ``A`` key), taken before the status changes:
        # ``index_keys`` works them out from the job as it stands.
        old_keys = record.keys or record.index_keys(w.promoted)
        # The move of COMPLETE (inline, as ``_stage_move`` applies it: see
        # ``_COMPLETE_INLINE``), each changed field into the record values (and the
        # job, if the record has it).
        error, stored = record.error_b, record.result_b
        flags = _F_FINALIZED
        if result is not None:
            stored = result
            flags = _F_FINALIZED | _F_RESULT
        if error_message is not None:
            error = error_message.encode("utf-8", "surrogatepass") if error_message else b""
        if now is not w.moved_at:
            w.moved_at, w.moved_us = now, codec.to_micros(now)
        now_us = w.moved_us
        # The header's moved values, in place (``codec.record_parts`` packs them so).
        _pack_time_into(head, _AT_FINALIZED, now_us)
        assignee_b = record.assignee_b
        _pack_lengths_into(head, _AT_LENGTHS, len(error), len(assignee_b), len(stored))
        head[_AT_CODE] = _COMPLETED_CODE
        head[_AT_FLAGS] |= flags
        record.error_b, record.result_b = error, stored
        # Its counters (no retry: only the status moves) and keys (see ``_index_keys``).
        values = w.counts.values
        values[old_code] -= 1
        values[_COMPLETED_CODE] += 1
        if job is None:
            job_id, assigned = record.job_id, record.claimed
            if static[4]:  # (its tags, for their counters: from the record's bytes)
                tags = static[4].decode("utf-8", "surrogatepass").split("\x00")
                w.move_tags(tags, old_code, _COMPLETED_CODE)
        else:
            job.finalized_at = now
            if result is not None:
                job.result = result
            if error_message is not None:
                job.error_message = error_message
            job.status = _COMPLETED
            job_id, assigned = job.id, job.assigned_at
            if job.tags:
                w.move_tags(job.tags, old_code, _COMPLETED_CODE)
        delete, put = w.delete, w.put
        for key in old_keys:
            delete(key)
        idb = record.idb
        done = _DONE + _pack_time_seq(now_us, record.seq) + idb
        listed = _LIST_STATUS_COMPLETED + record.tail
        put(done, b"")
        put(listed, b"")
        record.keys = [done, listed]
        # (``codec.join_record``, inline: per job)
        record_b = (_RECORD_V3, head, static[0], error, assignee_b, stored, static[4])
        put(_JOB + idb, b"".join(record_b))
        w.touched[job_id] = record
        # (``_moved``, inline; ``tuple.__new__``: no frame for the named tuple's ``__new__``)
        return _new_tuple(Moved, (job_id, _COMPLETED, assigned, (), None))

    def _stage_remove(self, w: _Write, record: _Rec) -> None:
        job = self._job(record)
        w.unindex(record)
        for key in _static_keys(job, record.idb, record.tail):
            w.delete(key)
        w.delete(_JOB + record.idb)
        w.touched[job.id] = None
        w.general = True

    # --- selections ---------------------------------------------------------------

    def _scan_ids(self, prefix: bytes, skip: int = 0) -> Iterator[str]:
        """Job ids of the index keys ``prefix <skip bytes> <id>``."""
        start = len(prefix) + skip
        with self._db.iterator(prefix=prefix, include_value=False) as it:
            for key in it:
                yield codec.id_text(key[start:])

    def _smallest_tag(self, tags: Sequence[str]) -> tuple[str, int]:
        sizes = [(self._tag_counters(t).total, t) for t in tags]
        total, tag = min(sizes)
        return tag, total

    def _smallest_tag_ids(self, tags: Sequence[str]) -> Iterator[str]:
        tag, total = self._smallest_tag(tags)
        return self._scan_ids(_TAG + codec.enc(tag)) if total else iter(())

    def _everything(self, transition: Transition | None) -> list[_Rec]:
        if transition is not None and transition.sources <= ACTIVE:
            return self._read_existing(self._active_ids())
        claims = self._claims
        out: list[_Rec] = []
        with self._db.iterator(prefix=_JOB) as it:
            for key, raw in it:
                rec = _decoded(raw, key[1:])
                claim = claims.get(rec.job_id) if claims else None
                out.append(rec if claim is None else self._claimed(rec, claim))
        return out

    def _assignee_ids(self, assignee_id: str) -> Iterator[str]:
        return self._scan_ids(_ASSIGNEE + codec.enc(assignee_id), _CREATED_SIZE)

    def _keys(self, prefix: bytes) -> list[bytes]:
        with self._db.iterator(prefix=prefix, include_value=False) as it:
            return list(it)

    def _active_ids(self) -> Iterator[str]:
        for key in self._keys(_ASSIGNEE):
            _, end = codec.split_enc(key, 1)
            yield codec.id_text(key[end + _CREATED_SIZE :])

    # --- the contract -------------------------------------------------------------

    def next_due(self) -> datetime | None:
        return self._next_due

    def _moved(self, record: _Rec, new: JobStatus) -> Moved:
        job = record.job or record.full()
        if new not in ELIGIBLE:  # (the tags are needed only to wake streams)
            # (A named tuple's own ``__new__`` is a Python function: built directly,
            # as ``Moved._make`` does, it costs a third.)
            return _new_tuple(Moved, (job.id, new, job.assigned_at, (), None))
        due = job.scheduled_at
        if due is not None and codec.to_micros(due) > self._promoted:
            return Moved(job.id, new, job.assigned_at, tuple(job.tags), due)
        return Moved(job.id, new, job.assigned_at, tuple(job.tags))

    def _stage_promotion(self, w: _Write, now: datetime) -> dict[bytes, _Rec]:
        """Stage in ``w`` the move of the ``W`` entries due at ``now`` into ``E``/``F``
        and the watermark raised to ``now``; returns the eligible-index keys staged,
        with their jobs (a claim in the same write takes them from there)."""
        now_us = codec.to_micros(now)
        promoted = max(self._promoted, w.promoted)
        if now_us <= promoted:
            return {}
        due: list[tuple[bytes, _Rec]] = []
        later: int | None = None
        cached = self._eligible
        # Every W entry is after the watermark: starting there skips the deletion
        # markers LevelDB keeps of the entries promoted before.
        start, stop = _WAITING + codec.u64(promoted + 1), _prefix_end(_WAITING)
        with self._db.iterator(start=start, stop=stop, include_value=False) as it:
            for key in it:
                at = codec.read_u64(key, 1)
                if at > now_us:
                    later = at  # the next one to come due
                    break
                idb = key[17:]
                found = cached.get(idb) or self._read(codec.id_text(idb))
                if found is None or self._job(found).status not in ELIGIBLE:
                    raise StorageError(
                        f"waiting index names job {codec.id_text(idb)!r} out of step"
                    )
                due.append((key, found))
        # Read first, then staged: nothing above can leave half a promotion in ``w``.
        fresh: dict[bytes, _Rec] = {}
        for key, found in due:
            w.delete(key)
            job = self._job(found)
            keys = _index_keys(job, found.seq, found.idb, now_us, found.tail)
            w._add_keys(job, keys)
            for index_key in keys[:-1]:
                fresh[index_key] = found
        w.promoted = now_us
        w.next_due = later
        w.promotes = True
        return fresh

    def _claim(self, assignee_id: str, tags: Sequence[str], limit: int, now: datetime) -> list[Job]:
        if limit < 1:
            return []
        w = self._stage()
        picked, scanned = self._pick(w, tags, limit, now)
        claimed = self._stage_claim(w, picked, scanned, assignee_id, now)
        if picked or w.promotes:
            self._commit(w)
        return claimed

    def _pick(
        self, w: _Write, tags: Sequence[str], limit: int, now: datetime
    ) -> tuple[list[_Rec], tuple[bytes, bytes] | None]:
        """The next ``limit`` eligible jobs matching ``tags`` (those that came due
        promoted first, in ``w``), and the index walked with where the next claim of
        it may start."""
        fresh: dict[bytes, _Rec] = {}
        if self._next_due is not None and self._next_due <= now:
            fresh = self._stage_promotion(w, now)
        if tags:
            eligible = [
                (sum(self._tag_counters(t).values[c] for c in _ELIGIBLE_CODES), t) for t in tags
            ]
            smallest, tag = min(eligible)
            if not smallest:
                return [], None
            prefix = _ELIGIBLE_TAG + codec.enc(tag)
            wanted: set[str] = set(tags)
        else:
            prefix, wanted = _ELIGIBLE, set()
        skip = len(prefix) + 18
        picked: list[_Rec] = []
        first_left: bytes | None = None
        last: bytes | None = None
        start = self._floors.get(prefix, prefix)
        get = self._db.get
        cached = self._eligible
        with self._db.iterator(start=start, stop=_prefix_end(prefix), include_value=False) as it:
            walk: Iterable[bytes] = it
            if fresh:  # the keys the promotion staged, in order among the stored ones
                walk = heapq.merge(it, sorted(k for k in fresh if k.startswith(prefix)))
            for key in walk:
                last = key
                if len(picked) >= limit:
                    if first_left is None:
                        first_left = key
                    break
                idb = key[skip:]
                # Popped: the move changes it in place (re-cached if its write commits).
                found = cached.pop(idb, None)
                if fresh:
                    found = fresh.get(key, found)
                if found is None:
                    raw = get(_JOB + idb)
                    found = None if raw is None else _decoded(raw, idb)
                # (an eligible job's record always has its job: only a claim hands
                # one out, see ``_Rec.job``)
                if found is None or (job := found.job) is None or job.status not in ELIGIBLE:
                    job_id = codec.id_text(key[skip:])
                    raise StorageError(f"eligible index names job {job_id!r} out of step")
                if wanted and not wanted.issubset(job.tags):
                    if first_left is None:
                        first_left = key
                    continue
                picked.append(found)
        if not picked:
            return [], None
        if first_left is None:
            assert last is not None
            first_left = last + b"\x00"
        return picked, (prefix, first_left)

    def _stage_claim(
        self,
        w: _Write,
        picked: list[_Rec],
        scanned: tuple[bytes, bytes] | None,
        assignee_id: str,
        now: datetime,
    ) -> list[Job]:
        """Stage the assignment of ``picked`` in ``w``; the jobs as claimed (handed out).
        No record is written (format 6): each job's ``A`` key holds the claim's time,
        and ``_commit`` notes it in ``_claims``.

        The move of ASSIGN with its key and counter changes made here at once (as the
        memory backend's claim does), not through the generic ``_stage_move``: the
        picked jobs are due and eligible, and every one goes to RUNNING of the same
        assignee, so their new keys share a prefix and their counter moves add up."""
        if not picked:
            w.scanned = scanned
            return []
        put, delete, touched, promoted = w.put, w.delete, w.touched, w.promoted
        claims = w.claims
        values = w.counts.values
        assignee = _ASSIGNEE + codec.enc(assignee_id)
        now_us = codec.to_micros(now)  # (the assignment and start times of the records)
        claim = _U64.pack(now_us)  # (the value of each job's ``A`` key: its claim)
        pack_time_into = _pack_time_into
        pack_i64_into, pack_u32_into = _pack_i64_into, _pack_u32_into
        assignee_bytes = codec.id_bytes(assignee_id) if assignee_id else b""
        n_assignee = len(assignee_bytes)
        out: list[Job] = []
        for rec in picked:
            # (``_pick`` picks only records with their job: ``_Rec.job``)
            job: Job = rec.job  # type: ignore[assignment]
            old_code = _CODE_OF[job.status]
            keys = rec.keys  # (``rec.index_keys``, inline: per job)
            if keys is None or job.scheduled_at is not None:
                keys = rec.index_keys(promoted)
            for key in keys:
                delete(key)
            # The move of ASSIGN (``apply_transition``, inline: per job; checked at
            # import against the table, see ``_ASSIGN_INLINE``). It counts no retry:
            # only the status counters move.
            job.assignee_id = assignee_id
            job.assigned_at = now
            job.attempts += 1
            if job.started_at is None:
                job.started_at = now
            job.status = _RUNNING_STATUS
            values[old_code] -= 1
            values[_RUNNING] += 1
            if job.tags:
                w.move_tags(job.tags, old_code, _RUNNING)
            # Its one index key (see ``_index_keys``), which holds the claim: its record
            # is not written (format 6, see the module docs).
            key = assignee + rec.tail
            rec.keys = [key]
            put(key, claim)
            static = rec.static
            if static is None:
                static = rec.static = codec.job_static(job)
            head = rec.head
            if head is None:
                parts = codec.record_parts(job, rec.seq, static, now, now_us)
                packed, rec.error_b, rec.assignee_b, rec.result_b = parts
                rec.head = bytearray(packed)
            else:  # the record values as staged, the moved ones changed in place
                flags = head[_AT_FLAGS]
                if not flags & _F_STARTED:
                    pack_time_into(head, _AT_STARTED, now_us)
                pack_time_into(head, _AT_ASSIGNED, now_us)
                pack_i64_into(head, _AT_ATTEMPTS, job.attempts)
                pack_u32_into(head, _AT_N_ASSIGNEE, n_assignee)
                head[_AT_CODE] = _RUNNING
                head[_AT_FLAGS] = flags | _F_STARTED | _F_ASSIGNED
                rec.assignee_b = assignee_bytes
            rec.claimed, rec.claimed_us = now, now_us
            # The job itself is handed out, the record keeps its values only (which
            # say what it is: see ``_Rec.job``), so no copy of it is made here. Every
            # picked job is the backend's own object (the queue's checked copy kept at
            # insert, or one decoded from the store), which nothing else holds.
            job_id = rec.job_id = job.id
            rec.job = None
            touched[job_id] = rec
            claims[job_id] = key
            out.append(job)
        w.eligible_moved = True
        w.scanned = scanned
        return out

    def _stage_refill(
        self, w: _Write, refill: Refill, limit: int, now: datetime
    ) -> list[Job] | None:
        """The refill's claim staged in the apply's own write, so the call is one
        ``WriteBatch``: possible when no job this write moves enters or leaves an
        eligible status (the claim reads the store as written, which then shows what
        the write will). Else, or if reading fails, ``None``: the claim runs after."""
        if w.eligible_moved:
            return None
        try:
            # (A promotion staged here raises the watermark of ``w``: the moves staged
            # before are of statuses whose keys do not depend on it.)
            picked, scanned = self._pick(w, refill.tags, limit, now)
        except (JobPoolError, self._plyvel.Error):
            return None  # the claim after the write meets it again, and reports it
        return self._stage_claim(w, picked, scanned, refill.assignee_id, now)

    def _claim_for_refill(self, refill: Refill, limit: int, now: datetime) -> list[Job]:
        try:
            return self._claim(refill.assignee_id, refill.tags, limit, now)
        except (JobPoolError, self._plyvel.Error) as exc:
            if isinstance(exc, self._plyvel.IOError):
                self._suspect = True
            logger.warning("claim after an apply failed; the stream claims later", exc_info=True)
            return []

    async def job_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        return await self._run(self._job_states, list(job_ids))

    def _job_states(self, job_ids: list[str]) -> dict[str, JobState]:
        out: dict[str, JobState] = {}
        claims = self._claims
        for job_id in job_ids:
            raw = self._db.get(_JOB + codec.id_bytes(job_id))
            if raw is not None:
                claim = claims.get(job_id)
                if claim is not None:  # RUNNING, assigned at its claim's time
                    job = self._claimed(_decoded(raw), claim).job
                    assert job is not None
                    status, assigned_at = job.status, job.assigned_at
                else:
                    status, assigned_at = codec.decode_state(raw)
                out[job_id] = JobState(status, assigned_at)
        return out

    def _kept_counts(self, tags: Sequence[str]) -> tuple[dict[JobStatus, int], int] | None:
        if not tags:
            return self._counts.as_counts()
        if len(tags) == 1:
            return self._tag_counters(tags[0]).as_counts()
        return None

    async def oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        return await self._run(self._oldest_created, statuses)

    def _oldest_created(self, statuses: frozenset[JobStatus]) -> datetime | None:
        firsts = []
        for status in statuses - ACTIVE:
            prefix = _LIST_STATUS_OF[codec.CODE_OF[status]]
            with self._db.iterator(prefix=prefix, include_value=False) as it:
                key = next(it, None)
            if key is not None:
                firsts.append(codec.from_micros(codec.read_u64(key, 2)))
        active = statuses & ACTIVE
        for prefix in self._components(_ASSIGNEE) if active else ():
            # Each assignee's oldest job in one of ``active`` (its ``A`` keys are in
            # created order; they hold RUNNING and CANCELLING jobs alike).
            n = len(prefix)
            with self._db.iterator(prefix=prefix, include_value=False) as it:
                for key in it:
                    if active != ACTIVE:
                        job_id = codec.id_text(key[n + _CREATED_SIZE :])
                        found = self._read(job_id)
                        if found is None:
                            raise StorageError(
                                f"assignee index names job {job_id!r}, which has no record"
                            )
                        if self._job(found).status not in active:
                            continue
                    firsts.append(codec.from_micros(codec.read_u64(key, n)))
                    break
        return min(firsts, default=None)

    def _components(self, prefix: bytes) -> list[bytes]:
        """Each distinct ``prefix enc(x)`` that keys under ``prefix`` start with (the
        assignees of ``A`` keys, the job types of ``Y`` keys): one seek each."""
        out: list[bytes] = []
        n = len(prefix)
        with self._db.iterator(prefix=prefix, include_value=False) as it:
            key = next(it, None)
            while key is not None:
                part = key[: key.index(b"\x00\x01", n) + 2]
                out.append(part)
                it.seek(_prefix_end(part))  # past every key of this component
                key = next(it, None)
        return out

    def _listed_under(self, query: ListQuery) -> list[bytes]:
        """The key prefixes whose walks, merged, list the jobs ``query`` may match."""
        if query.tags:
            tag, _ = self._smallest_tag(query.tags)
            return [_LIST_TAG + codec.enc(tag)]
        if query.statuses:
            prefixes = [_LIST_STATUS_OF[codec.CODE_OF[s]] for s in query.statuses - ACTIVE]
            if not query.statuses.isdisjoint(ACTIVE):  # (``matches`` checks the status)
                prefixes.extend(self._components(_ASSIGNEE))
            return prefixes
        if query.job_type is not None:
            return [_LIST_TYPE + codec.enc(query.job_type)]
        return self._components(_LIST_TYPE)  # every job has one ``Y`` key

    async def list_jobs(self, query: ListQuery) -> list[Job]:
        return await self._run(self._list_jobs, query)

    def _list_jobs(self, query: ListQuery) -> list[Job]:
        walks = [self._newest_first(p, query.before) for p in self._listed_under(query)]
        keys = walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=True)
        out: list[Job] = []
        try:
            for _, raw_id in keys:
                found = self._read(codec.id_text(raw_id))
                if found is None:
                    raise StorageError(f"listing index names job {raw_id!r}, which has no record")
                if query.matches(self._job(found)):
                    out.append(self._snapshot(found))
                    if len(out) >= query.limit:
                        break
        finally:
            for walk in walks:
                walk.close()  # releases its LevelDB iterator now
        return out

    def _newest_first(
        self, prefix: bytes, before: tuple[datetime, str] | None
    ) -> Generator[tuple[bytes, bytes], None, None]:
        """``(created_time, id)`` key parts under ``prefix``, newest first, below ``before``."""
        if before is None:
            stop = _prefix_end(prefix)
        else:
            stop = prefix + codec.u64(codec.to_micros(before[0])) + codec.id_bytes(before[1])
        n = len(prefix)
        with self._db.iterator(start=prefix, stop=stop, reverse=True, include_value=False) as it:
            for key in it:
                yield key[n : n + 8], key[n + 8 :]

    def _completed_ids(self, cutoff: datetime) -> list[str]:
        stop = _DONE + codec.u64(codec.to_micros(cutoff) + 1)
        with self._db.iterator(start=_DONE, stop=stop, include_value=False) as it:
            return [codec.id_text(key[17:]) for key in it]

    # --- leases ---------------------------------------------------------------------

    def _lease_key(self, assignee_id: str, holder: str) -> bytes:
        return _LEASE + codec.enc(assignee_id) + holder.encode("utf-8", "surrogatepass")

    def _lease_rows(self, assignee_id: str | None = None) -> list[LeaseRow]:
        prefix = _LEASE if assignee_id is None else _LEASE + codec.enc(assignee_id)
        rows: list[LeaseRow] = []
        with self._db.iterator(prefix=prefix) as it:
            for key, value in it:
                assignee, end = codec.split_enc(key, 1)
                holder = key[end:].decode("utf-8", "surrogatepass")
                rows.append((assignee, holder, *_lease_times(value)))
        return rows

    def _lease(self, assignee_id: str, holder: str) -> LeaseTimes | None:
        raw = self._db.get(self._lease_key(assignee_id, holder))
        return None if raw is None else _lease_times(raw)

    def _stage_lease(
        self, w: _Write, assignee_id: str, holder: str, times: LeaseTimes | None
    ) -> None:
        key = self._lease_key(assignee_id, holder)
        if times is None:
            w.delete(key)
        else:
            w.put(key, _LEASE_TIMES.pack(*map(codec.to_micros, times)))

    def _has_active(self, assignee_id: str, w: _Write) -> bool:
        for job_id in self._assignee_ids(assignee_id):
            entry = w.touched.get(job_id)
            if job_id not in w.touched or (entry is not None and self._job(entry).status in ACTIVE):
                return True
        return False


def _lease_times(raw: bytes) -> LeaseTimes:
    first, renewed, expires = _LEASE_TIMES.unpack(raw)
    return codec.from_micros(first), codec.from_micros(renewed), codec.from_micros(expires)


def _first_waiting(db: Any) -> datetime | None:
    """The time of the first ``W`` entry, if any."""
    with db.iterator(prefix=_WAITING, include_value=False) as it:
        key = next(it, None)
    return None if key is None else codec.from_micros(codec.read_u64(key, 1))


#: Called for each record of an upgrade batch, and after its write (tests: a crash).
_UPGRADE_HOOK: Callable[[], None] | None = None


def _upgrade_to_3(db: Any, where: str) -> None:
    """Format 2 -> 3 (schedules, priorities, attempts, DISCARDED) in one synced batch,
    so a crash leaves the old store or the new one: every record re-encoded, the
    eligible indexes rebuilt in the new key order, the counters given their
    DISCARDED slot. ``attempts`` of upgraded jobs start at 0."""
    wb = db.write_batch(sync=True)
    for prefix in (_ELIGIBLE, _ELIGIBLE_TAG):
        with db.iterator(prefix=prefix, include_value=False) as it:
            for key in it:
                wb.delete(key)
    with db.iterator(prefix=_JOB) as it:
        for key, raw in it:
            job, seq = codec.decode_job(raw)
            wb.put(key, codec.encode_job(job, seq))
            for index_key in _index_keys(job, seq, key[1:], 0):
                if index_key[:1] in (_ELIGIBLE, _ELIGIBLE_TAG):
                    wb.put(index_key, b"")
            if _UPGRADE_HOOK is not None:
                _UPGRADE_HOOK()
    with db.iterator(prefix=_TAG_COUNTS) as it:
        for key, raw in it:
            wb.put(key, codec.Counters.decode_v1(raw).encode())
    raw = db.get(_COUNTERS)
    if raw is None:
        raise StorageError(f"{where}: jobpool_async store without its counters")
    next_seq, counts = codec.decode_global_v1(raw)
    wb.put(_COUNTERS, codec.encode_global(next_seq, 0, counts))
    wb.put(_META, codec.encode_meta(3))
    wb.write()
    if _UPGRADE_HOOK is not None:
        _UPGRADE_HOOK()
    logger.info("upgraded LevelDB store %s to format %d", where, 3)


def _stage_format_4(db: Any, where: str, wb: Any) -> None:
    """Stage in ``wb`` the changes from format 3 to 4: the ``L`` keys and the ``S`` keys
    of RUNNING/CANCELLING jobs removed, and each ``A`` key (``A enc(assignee) id``)
    rewritten with the job's created time."""
    doomed = [_LIST, *(_LIST_STATUS_OF[codec.CODE_OF[s]] for s in ACTIVE)]
    for prefix in doomed:
        with db.iterator(prefix=prefix, include_value=False) as it:
            for key in it:
                wb.delete(key)
    # All old ``A`` keys out before any new one goes in: an old key could equal a new
    # one of another job (its id the other's created time and id), and LevelDB
    # applies a batch in order.
    fresh: list[bytes] = []
    with db.iterator(prefix=_ASSIGNEE, include_value=False) as it:
        for key in it:
            _, end = codec.split_enc(key, 1)
            raw = db.get(_JOB + key[end:])
            if raw is None:
                job_id = codec.id_text(key[end:])
                raise StorageError(
                    f"{where}: the assignee index names job {job_id!r}, which has no "
                    f"record. {_repair_hint(where)}"
                )
            job, _ = codec.decode_job(raw)
            wb.delete(key)
            fresh.append(key[:end] + _tail(job, key[end:]))
            if _UPGRADE_HOOK is not None:
                _UPGRADE_HOOK()
    for key in fresh:
        wb.put(key, b"")


def _upgrade_to_6(db: Any, where: str, version: int) -> None:
    """Format 3, 4 or 5 -> 6 in one synced batch, so a crash leaves the old store or
    the new: from format 3 the changes of format 4 (:func:`_stage_format_4`), then the
    format mark.

    Format 5 has the keys of format 4; it writes job records of version 3 (see
    :mod:`._leveldb_codec`) and reads the version 2 records of formats 3 and 4 as
    they are, rewriting them when their jobs move. Format 6 has the keys and records
    of format 5, and its claims write no record (the claim in the job's ``A`` key
    instead, see the module docs); a format 5 store holds no such claim, so it is a
    format 6 store as it is. The mark keeps older code, which cannot read version 3
    records (format 4) or a claim in an ``A`` key (format 5), from opening the store."""
    wb = db.write_batch(sync=True)
    if version < 4:
        _stage_format_4(db, where, wb)
    wb.put(_META, codec.encode_meta(6))
    if _UPGRADE_HOOK is not None:
        _UPGRADE_HOOK()
    wb.write()
    if _UPGRADE_HOOK is not None:
        _UPGRADE_HOOK()
    logger.info("upgraded LevelDB store %s to format %d", where, 6)


def _message(exc: BaseException) -> str:
    """plyvel puts the LevelDB status in ``args[0]`` as bytes."""
    arg = exc.args[0] if exc.args else exc
    if isinstance(arg, bytes):
        return arg.decode("utf-8", "replace")
    return str(arg)


def _repair_hint(where: str) -> str:
    return (
        f"LevelDBBackend.repair({where!r}) salvages the job records that survive and "
        "rebuilds the indexes and counters from them (see docs/leveldb.md, 'Damage and repair')"
    )


def _count_keys(db: Any, prefix: bytes) -> int:
    with db.iterator(prefix=prefix, include_value=False) as it:
        return sum(1 for _ in it)


def _check_counters(db: Any, counts: codec.Counters, where: str) -> None:
    """Compare the stored counters with the records and indexes actually present.

    A store damaged before this check existed (opened without ``paranoid_checks``,
    which silently dropped records) keeps counters for jobs that are gone: found
    here, at open, instead of phantom pending jobs for ever. Reads only keys.
    """
    values = counts.values
    expected = (
        ("job records", _JOB, counts.total),
        ("eligible-index entries", (_ELIGIBLE, _WAITING), sum(values[c] for c in _ELIGIBLE_CODES)),
        ("running/cancelling-index entries", _ASSIGNEE, sum(values[c] for c in _ACTIVE_CODES)),
        ("completed-index entries", _DONE, values[codec.CODE_OF[JobStatus.COMPLETED]]),
    )
    wrong = []
    for name, prefixes, want in expected:
        found = sum(
            _count_keys(db, p) for p in (prefixes if isinstance(prefixes, tuple) else (prefixes,))
        )
        if found != want:
            wrong.append(f"{found} {name} where the counters say {want}")
    if any(v < 0 for v in values):
        wrong.append(f"negative counters {values}")
    if wrong:
        raise StorageError(
            f"the LevelDB store {where} is damaged: its counters disagree with its "
            f"contents ({'; '.join(wrong)}). It was left as it is. {_repair_hint(where)}"
        )


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold the store's LOCK file (as LevelDB does, with ``fcntl``) or raise
    :class:`StorageError` if a backend, here or in another process, has it open.

    ``plyvel.repair_db`` takes no lock itself, and repairing a store in use would
    destroy it.
    """
    where = str(path)
    if path.resolve() in _OPEN_HERE:
        raise StorageError(f"the LevelDB store {where} is open in this process: close it first")
    lock = path / "LOCK"
    if not lock.exists():
        yield
        return
    import fcntl

    fd = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise StorageError(
                f"the LevelDB store {where} is in use by another process: close it first"
            ) from exc
        yield
    finally:
        os.close(fd)  # (releases the lock; LevelDB's own was released at its close)


def _repair_sync(plyvel: Any, path: Path) -> RepairReport:
    where = str(path)
    if not path.is_dir() or not any(
        (path / "CURRENT").is_file() or p.suffix in (".log", ".ldb", ".sst") for p in path.iterdir()
    ):
        raise StorageError(f"{where} is not a LevelDB store: nothing to repair")
    with _exclusive(path):
        try:
            plyvel.repair_db(where)
            db = plyvel.DB(where)
        except plyvel.Error as exc:
            raise StorageError(f"cannot repair the LevelDB store {where}: {_message(exc)}") from exc
        try:
            report = _rebuild(db, where)
        except plyvel.Error as exc:
            text = _message(exc)
            raise StorageError(f"repairing the LevelDB store {where} failed: {text}") from exc
        finally:
            db.close()
    logger.warning(
        "repaired the LevelDB store %s: %d job(s) kept, the counters knew %s before, "
        "%d unreadable record(s) removed",
        where,
        report.jobs,
        "?" if report.counted_before is None else report.counted_before,
        report.dropped_records,
    )
    return report


def _rebuild(db: Any, where: str) -> RepairReport:
    """Rebuild every index and counter of ``db`` from its job records."""
    meta = db.get(_META)
    if meta is not None:
        codec.check_meta(meta, where)
    elif _count_keys(db, _JOB) == 0:
        raise StorageError(f"{where} holds no jobpool_async store: nothing to repair")
    _settle_claims(db, where)  # (before the ``A`` keys, which hold them, are dropped)
    before: int | None = None
    next_seq = promoted = 0
    raw = db.get(_COUNTERS)
    if raw is not None:
        try:
            next_seq, promoted, old = codec.decode_global(raw)
            before = old.total
        except StorageError:
            pass
    for prefix in _DERIVED:  # drop every derived key: they are rebuilt below
        with db.iterator(prefix=prefix, include_value=False) as it:
            for chunk in _chunks(it, _REPAIR_CHUNK):
                with db.write_batch() as wb:
                    for key in chunk:
                        wb.delete(key)
    counts = codec.Counters()
    tag_counts: dict[str, codec.Counters] = {}
    jobs = dropped = 0
    with db.iterator(prefix=_JOB) as it:
        for chunk in _chunks(it, _REPAIR_CHUNK):
            with db.write_batch() as wb:
                for key, raw in chunk:
                    try:
                        job, seq = codec.decode_job(raw)
                        idb = codec.id_bytes(job.id)
                        if key != _JOB + idb:
                            raise StorageError(f"record of job {job.id!r} under another key")
                    except StorageError as exc:
                        logger.warning("repair of %s removes the record %r: %s", where, key, exc)
                        wb.delete(key)
                        dropped += 1
                        continue
                    jobs += 1
                    next_seq = max(next_seq, seq + 1)
                    code, retries = codec.CODE_OF[job.status], job.retry_count
                    counts.add(code, retries, +1)
                    for static_key in _static_keys(job, idb):
                        wb.put(static_key, b"")
                    for tag in job.tags:
                        tag_counter = tag_counts.get(tag)
                        if tag_counter is None:
                            tag_counter = tag_counts[tag] = codec.Counters()
                        tag_counter.add(code, retries, +1)
                    for index_key in _index_keys(job, seq, idb, promoted):
                        wb.put(index_key, b"")
    with db.write_batch(sync=True) as wb:
        for tag, tag_counter in tag_counts.items():
            wb.put(_TAG_COUNTS + codec.enc(tag), tag_counter.encode())
        wb.put(_COUNTERS, codec.encode_global(next_seq, promoted, counts))
        wb.put(_META, codec.encode_meta())  # every key of this format is rebuilt
    return RepairReport(jobs=jobs, counted_before=before, dropped_records=dropped)


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    chunk: list[_T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
