"""Key and record encoding for the LevelDB backend (no pickle, versioned).

Everything here is pure Python without plyvel, so it is importable (and testable)
without the optional dependency. The key layout is documented in
:mod:`jobpool_async.backends.leveldb`.
"""

from __future__ import annotations

import functools
import json
import operator
import struct
import sys
from datetime import UTC, datetime, timedelta

from .base import (
    Job,
    JobStatus,
    StorageError,
)

__all__ = [
    "APPLICATION",
    "FORMAT_VERSION",
    "STATUS_CODES",
    "Counters",
    "decode_job",
    "decode_state",
    "enc",
    "encode_job",
    "from_micros",
    "split_enc",
    "to_micros",
]

APPLICATION = "jobpool_async"
#: Bumped whenever keys or records change incompatibly; newer stores are refused,
#: older ones upgraded on open. 2: the listing keys (``L``, ``S``, ``Y``, ``C``).
#: 3: schedules, priorities, attempts, DISCARDED (records of version 2, the ``W``
#: index, the priority in ``E``/``F`` keys, a DISCARDED counter slot).
#: 4: no ``L`` keys, no ``S`` keys of RUNNING/CANCELLING jobs (listed from their
#: ``A`` keys, which hold the created time: ``A enc(assignee) created id``).
#: 5: job records of version 3 (the fields of version 2, little-endian), version 2
#: ones read until their jobs move (the keys are those of format 4).
#: 6: a claim writes no job record: the ``A`` key of a job claimed so holds the
#: claim's time (u64 micros), and its record the job as it was before the claim
#: (an eligible status); an empty ``A`` value: the record says it all (format 5's
#: ``A`` keys, and any RUNNING/CANCELLING job a move other than the claim wrote).
FORMAT_VERSION = 6
RECORD_VERSION = 3
#: Store formats :mod:`jobpool_async.backends.leveldb` upgrades in place on open.
UPGRADABLE_FORMATS = (1, 2, 3, 4, 5)

#: The stored code of each status. Fixed: never reorder, only append.
STATUS_CODES: tuple[JobStatus, ...] = (
    JobStatus.INITIAL_PENDING,
    JobStatus.RUNNING,
    JobStatus.CANCELLING,
    JobStatus.FAILED_RETRY,
    JobStatus.UNKNOWN_RETRY,
    JobStatus.COMPLETED,
    JobStatus.STOPPED,
    JobStatus.UNSCHEDULED,
    JobStatus.UNKNOWN_STOPPED,
    JobStatus.DISCARDED,
)
#: Statuses of format 1 (before DISCARDED): its counter records have one slot fewer.
N_STATUS_V1 = 9
CODE_OF: dict[JobStatus, int] = {s: i for i, s in enumerate(STATUS_CODES)}
N_STATUS = len(STATUS_CODES)

# --- time ---------------------------------------------------------------------------

_ORIGIN = datetime(1, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
#: (for callers that convert without the caches: ``(dt - ORIGIN) // US``)
ORIGIN, US = _ORIGIN, _US


@functools.lru_cache(maxsize=4096)
def to_micros(dt: datetime) -> int:
    """Microseconds since 0001-01-01 UTC: non-negative, so it sorts as unsigned big-endian.

    Cached: the jobs of one call share their timestamps.
    """
    return (dt - _ORIGIN) // _US


@functools.lru_cache(maxsize=4096)
def from_micros(us: int) -> datetime:
    """The inverse of :func:`to_micros` (cached: a batch shares its timestamps)."""
    return _ORIGIN + timedelta(microseconds=us)


# --- key components -----------------------------------------------------------------

_U64 = struct.Struct(">Q")
_U64x2 = struct.Struct(">QQ")


def _utf8(text: str) -> bytes:
    # surrogatepass: any Python str (even a lone surrogate) maps to distinct bytes.
    return text.encode("utf-8", "surrogatepass")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


@functools.lru_cache(maxsize=4096)
def enc(text: str) -> bytes:
    """A self-delimiting, order-preserving key component.

    NUL bytes are escaped as ``00 FF`` and the component ends with ``00 01``, so no
    encoded component is a prefix of another: a prefix scan over ``enc(tag)`` sees
    only that tag's keys, whatever the tag contains.
    """
    raw = _utf8(text)
    if b"\x00" in raw:
        raw = raw.replace(b"\x00", b"\x00\xff")
    return raw + b"\x00\x01"


def split_enc(key: bytes, start: int) -> tuple[str, int]:
    """Decode the :func:`enc` component at ``key[start:]``; return it and where it ends."""
    end = key.index(b"\x00\x01", start)
    raw = key[start:end]
    if b"\x00" in raw:
        raw = raw.replace(b"\x00\xff", b"\x00")
    return _text(raw), end + 2


def id_bytes(job_id: str) -> bytes:
    """A job id as the last key component (nothing follows it, so no delimiter)."""
    return _utf8(job_id)


def id_text(raw: bytes) -> str:
    return _text(raw)


def order_part(micros: int, seq: int) -> bytes:
    """The 16 sortable bytes of a time-ordered index key: time, then enqueue sequence."""
    return _U64x2.pack(micros, seq)


def u64(value: int) -> bytes:
    return _U64.pack(value)


def read_u64(key: bytes, at: int) -> int:
    return int(_U64.unpack_from(key, at)[0])


_PRIO = struct.Struct(">H")


def prio_part(priority: int) -> bytes:
    """2 bytes that sort higher priorities first (priority is -32,768 … 32,767)."""
    return _PRIO.pack(32767 - priority)


# --- the meta marker ----------------------------------------------------------------


def encode_meta(version: int = FORMAT_VERSION) -> bytes:
    return json.dumps({"application": APPLICATION, "format": version}).encode()


def check_meta(raw: bytes, where: str) -> int:
    """The format version of this library's meta ``raw``; :class:`StorageError` unless
    it is one this code reads or upgrades."""
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("application") != APPLICATION:
        raise StorageError(f"{where} is a LevelDB database but not a jobpool_async store")
    version = meta.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StorageError(f"{where}: jobpool_async store with an unreadable format version")
    if version > FORMAT_VERSION:
        raise StorageError(
            f"{where} was written by a newer jobpool_async (store format {version}; "
            f"this version reads format {FORMAT_VERSION} and older): upgrade jobpool_async"
        )
    if version < 1:
        raise StorageError(f"{where}: unknown jobpool_async store format {version}")
    return version


# --- counters -----------------------------------------------------------------------

_COUNTS = struct.Struct(f">{N_STATUS + 1}q")
_GLOBAL = struct.Struct(f">QQ{N_STATUS + 1}q")


class Counters:
    """Job counts per status code plus the ``retry_count`` sum (last slot)."""

    __slots__ = ("values",)

    def __init__(self, values: list[int] | None = None) -> None:
        self.values = values if values is not None else [0] * (N_STATUS + 1)

    @property
    def total(self) -> int:
        return sum(self.values[:N_STATUS])

    def add(self, code: int, retries: int, sign: int) -> None:
        self.values[code] += sign
        self.values[N_STATUS] += sign * retries

    def merged(self, delta: Counters) -> Counters:
        # (``map``: no comprehension frame; the two lists always have the same length)
        return Counters(list(map(operator.add, self.values, delta.values)))

    def as_counts(self) -> tuple[dict[JobStatus, int], int]:
        counts = {STATUS_CODES[i]: n for i, n in enumerate(self.values[:N_STATUS]) if n}
        return counts, self.values[N_STATUS]

    def encode(self) -> bytes:
        return _COUNTS.pack(*self.values)

    @classmethod
    def decode(cls, raw: bytes) -> Counters:
        try:
            return cls(list(_COUNTS.unpack(raw)))
        except struct.error as exc:
            raise StorageError(f"corrupt counter record: {exc}") from exc

    @classmethod
    def decode_v1(cls, raw: bytes) -> Counters:
        """A format 1 counter record (no DISCARDED slot)."""
        try:
            *counts, retries = _COUNTS_V1.unpack(raw)
        except struct.error as exc:
            raise StorageError(f"corrupt counter record: {exc}") from exc
        return cls([*counts, 0, retries])


_COUNTS_V1 = struct.Struct(f">{N_STATUS_V1 + 1}q")
_GLOBAL_V1 = struct.Struct(f">Q{N_STATUS_V1 + 1}q")


def encode_global(next_seq: int, promoted: int, counters: Counters) -> bytes:
    """The ``N`` record: next seq, the promotion watermark (micros), the counters."""
    return _GLOBAL.pack(next_seq, promoted, *counters.values)


def decode_global(raw: bytes) -> tuple[int, int, Counters]:
    try:
        next_seq, promoted, *values = _GLOBAL.unpack(raw)
    except struct.error as exc:
        raise StorageError(f"corrupt store counters: {exc}") from exc
    return next_seq, promoted, Counters(values)


def decode_global_v1(raw: bytes) -> tuple[int, Counters]:
    try:
        next_seq, *values = _GLOBAL_V1.unpack(raw)
    except struct.error as exc:
        raise StorageError(f"corrupt store counters: {exc}") from exc
    *counts, retries = values
    return next_seq, Counters([*counts, 0, retries])


# --- job records --------------------------------------------------------------------
#
# A version byte, one fixed header, then the variable fields back to back (record
# version 3, format 5)::
#
#   version u8 | seq u64 | retry_count u64
#   | created_at, started_at, finalized_at, last_retry_at, assigned_at,
#     scheduled_at: u64 micros | max_attempts i64 (-1: None) | attempts i64
#   | byte lengths (u32) of: id, job_type, job_definition, error_message,
#     assignee_id, result, tags
#   | priority i16 | status code u8 | presence flags u8
#   | id | job_type | job_definition | error_message | assignee_id | result | tags
#
# The header's integers are little-endian, widest first: a value needs no sort order,
# and so, on a little-endian machine whose C ``long`` has 8 bytes, ``struct`` packs
# the header in native mode (``L``/``l``: no padding, the same bytes), which converts
# an int with ``PyLong_AsUnsignedLong``. Big-endian 8-byte fields, and ``Q``/``q`` in
# any mode, go through ``_PyLong_AsByteArray`` for any value above 2**30 (every time
# is): a version 2 header, the same fields big-endian in the old order, took 0.71 µs to
# pack against 0.48 µs, and 0.65 against 0.35 µs to unpack.
#
# Version 2 (formats 3 and 4: version u8 | status code u8 | flags u8 | seq | retry_count
# | the six times | priority i16 | max_attempts | attempts | the lengths, big-endian)
# and version 1 (format 1 stores: without scheduled_at, priority, max_attempts and
# attempts) are read as well, never written. Text is UTF-8 (surrogatepass). Tags are
# joined by NUL, which no tag may contain.

_HEAD_LAYOUT = "<QQQQQQQQqqIIIIIIIhBB"
_HEAD_NATIVE = "@LLLLLLLLllIIIIIIIhBB"
#: Same bytes as ``_HEAD_LAYOUT`` where the native one is little-endian with 8-byte longs.
NATIVE_HEAD = sys.byteorder == "little" and struct.calcsize(_HEAD_NATIVE) == struct.calcsize(
    _HEAD_LAYOUT
)
_HEAD = struct.Struct(_HEAD_NATIVE if NATIVE_HEAD else _HEAD_LAYOUT)
_HEAD_SIZE = 1 + _HEAD.size  # (after the version byte)
_HEAD_V2 = struct.Struct(">BBBQQQQQQQQhqqIIIIIII")
_HEAD_V1 = struct.Struct(">BBBQQQQQQQIIIIIII")
_F_STARTED, _F_FINALIZED, _F_RETRY, _F_ASSIGNED, _F_RESULT, _F_SCHEDULED = 1, 2, 4, 8, 16, 32
_KNOWN_FLAGS = 63
_VERSION_BYTE = bytes([RECORD_VERSION])
#: A record's first byte (see :func:`join_record`).
VERSION_BYTE = _VERSION_BYTE
#: Where the lengths are in a version 3 header (as :func:`_head` gives it).
_LENGTHS, _LENGTHS_END = 10, 17


#: The fields of a record that never change while its job exists: id, job type and
#: definition back to back, their byte lengths, the tags, and ``created_at`` in
#: micros (see :func:`job_static`).
Static = tuple[bytes, int, int, int, bytes, int]


def job_static(job: Job, id_: bytes | None = None) -> Static:
    """The encoded fields of ``job`` that no move changes, for :func:`encode_job`
    (``id_``: its id encoded, if the caller has it)."""
    tags = job.tags
    if tags:
        joined = "\x00".join(tags)
        if joined.count("\x00") != len(tags) - 1:
            raise ValueError(f"job {job.id!r}: a tag must not contain NUL")
        tag_bytes = joined.encode("utf-8", "surrogatepass")
    else:
        tag_bytes = b""
    if id_ is None:
        id_ = job.id.encode("utf-8", "surrogatepass")
    type_ = job.job_type.encode("utf-8", "surrogatepass")
    definition = job.job_definition
    # Not through the cache of ``to_micros``: every job has its own ``created_at``, so
    # each would miss it and push out the times a batch shares (its ``now``).
    created = (job.created_at - _ORIGIN) // _US
    return id_ + type_ + definition, len(id_), len(type_), len(definition), tag_bytes, created


#: A record's packed header and its changing variable fields, encoded: error message,
#: assignee, result (see :func:`record_parts`).
Parts = tuple[bytes, bytes, bytes, bytes]
F_STARTED, F_FINALIZED, F_ASSIGNED, F_RESULT = _F_STARTED, _F_FINALIZED, _F_ASSIGNED, _F_RESULT
#: A record's header (after its version byte) from its values and back, in the order
#: :func:`record_parts` packs them.
pack_head, unpack_head = _HEAD.pack, _HEAD.unpack
#: The same into a ``bytearray`` of :data:`HEAD_SIZE` bytes, at an offset.
pack_head_into = _HEAD.pack_into
HEAD_SIZE = _HEAD.size


def _at(field: int) -> int:
    """Where the header's ``field``-th value is (after the version byte): no padding."""
    return struct.calcsize(_HEAD_LAYOUT[: 1 + field])


#: Where a claim's and a completion's values are in a header (they patch a kept one
#: in place): started, finalized and assigned time, attempts, the lengths of error
#: message, assignee and result (three u32 in a row), status code, flags.
AT_STARTED, AT_FINALIZED, AT_ASSIGNED, AT_ATTEMPTS = _at(3), _at(4), _at(6), _at(9)
AT_CHANGING_LENGTHS, AT_N_ASSIGNEE, AT_CODE, AT_FLAGS = _at(13), _at(14), _at(18), _at(19)
_NATIVE = "@" if NATIVE_HEAD else "<"
#: Packers of one time (u64), one i64, one length (u32) and the three changing lengths
#: into a header.
pack_time_into = struct.Struct(_NATIVE + ("L" if NATIVE_HEAD else "Q")).pack_into
pack_i64_into = struct.Struct(_NATIVE + ("l" if NATIVE_HEAD else "q")).pack_into
pack_u32_into = struct.Struct(_NATIVE + "I").pack_into
pack_lengths_into = struct.Struct(_NATIVE + "III").pack_into


def encode_job(
    job: Job,
    seq: int,
    static: Static | None = None,
    now: datetime | None = None,
    now_us: int = 0,
    then: datetime | None = None,
    then_us: int = 0,
) -> bytes:
    """The stored form of ``job`` (with its enqueue sequence number); ``static``: its
    :func:`job_static`, if known; ``now_us``: ``to_micros(now)``, used for every time
    of the job that is ``now`` itself (the call's timestamp, which a move just set);
    ``then_us``: likewise ``to_micros(then)`` (an earlier move's, its claim's, say)."""
    if static is None:
        static = job_static(job)
    return join_record(*record_parts(job, seq, static, now, now_us, then, then_us), static)


def join_record(head: bytes, error: bytes, assignee: bytes, result: bytes, static: Static) -> bytes:
    """The record of a packed header, the changing fields and ``static``.

    The LevelDB backend keeps a cached job's :func:`record_parts` as last written, and a
    claim or completion unpacks the header, changes only the values it moves and joins
    the record again (the bytes :func:`encode_job` gives for the moved job: tested)."""
    return b"".join((_VERSION_BYTE, head, static[0], error, assignee, result, static[4]))


def record_parts(
    job: Job,
    seq: int,
    static: Static,
    now: datetime | None = None,
    now_us: int = 0,
    then: datetime | None = None,
    then_us: int = 0,
) -> Parts:
    """The packed header and the changing variable fields of ``job``'s record (see
    :func:`encode_job` for the arguments), for :func:`join_record`."""
    flags = 0
    started = finalized = retried = assigned = scheduled = 0
    # (Each optional time read once: attribute reads of a slots class are not free;
    # and a time that is the move's ``now`` object is not looked up again: a cached
    # ``to_micros`` still costs about a quarter of this function.)
    at = job.started_at
    if at is not None:
        flags = _F_STARTED
        started = now_us if at is now else then_us if at is then else to_micros(at)
    at = job.finalized_at
    if at is not None:
        flags |= _F_FINALIZED
        finalized = now_us if at is now else then_us if at is then else to_micros(at)
    at = job.last_retry_at
    if at is not None:
        flags |= _F_RETRY
        retried = now_us if at is now else then_us if at is then else to_micros(at)
    at = job.assigned_at
    if at is not None:
        flags |= _F_ASSIGNED
        assigned = now_us if at is now else then_us if at is then else to_micros(at)
    at = job.scheduled_at
    if at is not None:
        flags |= _F_SCHEDULED
        scheduled = to_micros(at)
    result = job.result
    if result is not None:
        flags |= _F_RESULT
    else:
        result = b""
    _, n_id, n_type, n_def, tag_bytes, created = static
    error = job.error_message
    error_bytes = error.encode("utf-8", "surrogatepass") if error else b""
    assignee = job.assignee_id
    assignee_bytes = assignee.encode("utf-8", "surrogatepass") if assignee else b""
    max_attempts = job.max_attempts
    head = _HEAD.pack(
        seq,
        job.retry_count,
        created,
        started,
        finalized,
        retried,
        assigned,
        scheduled,
        -1 if max_attempts is None else max_attempts,
        job.attempts,
        n_id,
        n_type,
        n_def,
        len(error_bytes),
        len(assignee_bytes),
        len(result),
        len(tag_bytes),
        job.priority,
        CODE_OF[job.status],
        flags,
    )
    return head, error_bytes, assignee_bytes, result


def _corrupt(detail: str) -> StorageError:
    return StorageError(f"corrupt job record: {detail}")


def _head(raw: bytes) -> tuple[int, ...]:
    """The checked fixed header of a record in version 3 order, then its size (a
    version 1 header gets the defaults of the fields it lacks)."""
    if raw[:1] != _VERSION_BYTE:
        return _old_head(raw)
    try:
        head = _HEAD.unpack_from(raw, 1)
    except struct.error as exc:
        raise _corrupt(str(exc)) from exc
    if head[-2] >= N_STATUS or head[-1] & ~_KNOWN_FLAGS:
        raise _corrupt("bad status code or flags")
    if _HEAD_SIZE + sum(head[_LENGTHS:_LENGTHS_END]) != len(raw):
        raise _corrupt("field lengths do not match the record size")
    return (*head, _HEAD_SIZE)


def _old_head(raw: bytes) -> tuple[int, ...]:
    """:func:`_head` of a version 1 or 2 record."""
    if not raw:
        raise _corrupt("empty record")
    version = raw[0]
    if version not in (1, 2):
        raise StorageError(
            f"job record format {version} is unknown to this jobpool_async "
            f"(reads format {RECORD_VERSION})"
        )
    layout = _HEAD_V1 if version == 1 else _HEAD_V2
    try:
        old = layout.unpack_from(raw)
    except struct.error as exc:
        raise _corrupt(str(exc)) from exc
    if old[1] >= (N_STATUS_V1 if version == 1 else N_STATUS) or old[2] & ~(
        31 if version == 1 else _KNOWN_FLAGS
    ):
        raise _corrupt("bad status code or flags")
    lengths = old[-7:]
    if layout.size + sum(lengths) != len(raw):
        raise _corrupt("field lengths do not match the record size")
    if version == 1:
        return (*old[3:10], 0, -1, 0, *lengths, 0, old[1], old[2], layout.size)
    return (*old[3:11], old[12], old[13], *lengths, old[11], old[1], old[2], layout.size)


def decode_job(raw: bytes) -> tuple[Job, int]:
    """The job stored in ``raw`` and its enqueue sequence number."""
    (
        seq,
        retries,
        created,
        started,
        finalized,
        retried,
        assigned,
        scheduled,
        max_attempts,
        attempts,
        n_id,
        n_type,
        n_def,
        n_err,
        n_assignee,
        n_result,
        n_tags,
        priority,
        code,
        flags,
        size,
    ) = _head(raw)
    e_id = size + n_id
    e_type = e_id + n_type
    e_def = e_type + n_def
    e_err = e_def + n_err
    e_assignee = e_err + n_assignee
    e_result = e_assignee + n_result
    try:
        job = Job(
            id=raw[size:e_id].decode("utf-8", "surrogatepass"),
            job_type=raw[e_id:e_type].decode("utf-8", "surrogatepass"),
            job_definition=raw[e_type:e_def],
            tags=raw[e_result:].decode("utf-8", "surrogatepass").split("\x00") if n_tags else [],
            status=STATUS_CODES[code],
            created_at=from_micros(created),
            started_at=from_micros(started) if flags & _F_STARTED else None,
            finalized_at=from_micros(finalized) if flags & _F_FINALIZED else None,
            error_message=raw[e_def:e_err].decode("utf-8", "surrogatepass") if n_err else "",
            result=raw[e_assignee:e_result] if flags & _F_RESULT else None,
            retry_count=retries,
            last_retry_at=from_micros(retried) if flags & _F_RETRY else None,
            assignee_id=(
                raw[e_err:e_assignee].decode("utf-8", "surrogatepass") if n_assignee else ""
            ),
            assigned_at=from_micros(assigned) if flags & _F_ASSIGNED else None,
            scheduled_at=from_micros(scheduled) if flags & _F_SCHEDULED else None,
            priority=priority,
            max_attempts=None if max_attempts < 0 else max_attempts,
            attempts=attempts,
        )
    except (UnicodeDecodeError, OverflowError) as exc:
        raise _corrupt(str(exc)) from exc
    return job, seq


def decode_state(raw: bytes) -> tuple[JobStatus, datetime | None]:
    """Only the status and ``assigned_at`` of a record (reads the fixed header)."""
    head = _head(raw)
    code, flags = head[-3], head[-2]
    return STATUS_CODES[code], from_micros(head[6]) if flags & _F_ASSIGNED else None
