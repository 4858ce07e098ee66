"""Key and record encoding for the LevelDB backend (no pickle, versioned).

Everything here is pure Python without plyvel, so it is importable (and testable)
without the optional dependency. The key layout is documented in
:mod:`jobpool_async.backends.leveldb`.
"""

from __future__ import annotations

import functools
import json
import struct
from datetime import UTC, datetime, timedelta

from .._errors import StorageError
from .._models import Job, JobStatus

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
FORMAT_VERSION = 2
RECORD_VERSION = 1

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
)
CODE_OF: dict[JobStatus, int] = {s: i for i, s in enumerate(STATUS_CODES)}
N_STATUS = len(STATUS_CODES)

# --- time ---------------------------------------------------------------------------

_ORIGIN = datetime(1, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


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


# --- the meta marker ----------------------------------------------------------------


def encode_meta() -> bytes:
    return json.dumps({"application": APPLICATION, "format": FORMAT_VERSION}).encode()


def check_meta(raw: bytes, where: str) -> int:
    """The store format of this library's meta ``raw``; :class:`StorageError` if it is not
    ours or is newer than this code."""
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
_GLOBAL = struct.Struct(f">Q{N_STATUS + 1}q")


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
        return Counters([a + b for a, b in zip(self.values, delta.values, strict=True)])

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


def encode_global(next_seq: int, counters: Counters) -> bytes:
    return _GLOBAL.pack(next_seq, *counters.values)


def decode_global(raw: bytes) -> tuple[int, Counters]:
    try:
        next_seq, *values = _GLOBAL.unpack(raw)
    except struct.error as exc:
        raise StorageError(f"corrupt store counters: {exc}") from exc
    return next_seq, Counters(values)


# --- job records --------------------------------------------------------------------
#
# One fixed header, then the variable fields back to back:
#
#   version u8 | status code u8 | presence flags u8 | seq u64 | retry_count u64
#   | created_at, started_at, finalized_at, last_retry_at, assigned_at: u64 micros
#   | byte lengths (u32) of: id, job_type, job_definition, error_message,
#     assignee_id, result, tags
#   | id | job_type | job_definition | error_message | assignee_id | result | tags
#
# Text is UTF-8 (surrogatepass). Tags are joined by NUL, which no tag may contain.

_HEAD = struct.Struct(">BBBQQQQQQQIIIIIII")
_HEAD_SIZE = _HEAD.size
_F_STARTED, _F_FINALIZED, _F_RETRY, _F_ASSIGNED, _F_RESULT = 1, 2, 4, 8, 16
_KNOWN_FLAGS = 31
_VERSION_BYTE = bytes([RECORD_VERSION])


def _opt(dt: datetime | None) -> int:
    return 0 if dt is None else to_micros(dt)


def encode_job(job: Job, seq: int) -> bytes:
    """The stored form of ``job`` (with its enqueue sequence number)."""
    flags = 0
    started = finalized = retried = assigned = 0
    if job.started_at is not None:
        flags |= _F_STARTED
        started = to_micros(job.started_at)
    if job.finalized_at is not None:
        flags |= _F_FINALIZED
        finalized = to_micros(job.finalized_at)
    if job.last_retry_at is not None:
        flags |= _F_RETRY
        retried = to_micros(job.last_retry_at)
    if job.assigned_at is not None:
        flags |= _F_ASSIGNED
        assigned = to_micros(job.assigned_at)
    result = job.result
    if result is not None:
        flags |= _F_RESULT
    else:
        result = b""
    tags = job.tags
    if tags:
        joined = "\x00".join(tags)
        if joined.count("\x00") != len(tags) - 1:
            raise ValueError(f"job {job.id!r}: a tag must not contain NUL")
        tag_bytes = joined.encode("utf-8", "surrogatepass")
    else:
        tag_bytes = b""
    id_ = job.id.encode("utf-8", "surrogatepass")
    type_ = job.job_type.encode("utf-8", "surrogatepass")
    definition = job.job_definition
    error = job.error_message.encode("utf-8", "surrogatepass") if job.error_message else b""
    assignee = job.assignee_id.encode("utf-8", "surrogatepass") if job.assignee_id else b""
    head = _HEAD.pack(
        RECORD_VERSION,
        CODE_OF[job.status],
        flags,
        seq,
        job.retry_count,
        to_micros(job.created_at),
        started,
        finalized,
        retried,
        assigned,
        len(id_),
        len(type_),
        len(definition),
        len(error),
        len(assignee),
        len(result),
        len(tag_bytes),
    )
    return b"".join((head, id_, type_, definition, error, assignee, result, tag_bytes))


def _corrupt(detail: str) -> StorageError:
    return StorageError(f"corrupt job record: {detail}")


def _head(raw: bytes) -> tuple[int, ...]:
    """The checked fixed header of a record."""
    if raw[:1] != _VERSION_BYTE:
        if not raw:
            raise _corrupt("empty record")
        raise StorageError(
            f"job record format {raw[0]} is unknown to this jobpool_async "
            f"(reads format {RECORD_VERSION})"
        )
    try:
        head = _HEAD.unpack_from(raw)
    except struct.error as exc:
        raise _corrupt(str(exc)) from exc
    if head[1] >= N_STATUS or head[2] & ~_KNOWN_FLAGS:
        raise _corrupt("bad status code or flags")
    if _HEAD_SIZE + sum(head[10:]) != len(raw):
        raise _corrupt("field lengths do not match the record size")
    return head


def decode_job(raw: bytes) -> tuple[Job, int]:
    """The job stored in ``raw`` and its enqueue sequence number."""
    (
        _,
        code,
        flags,
        seq,
        retries,
        created,
        started,
        finalized,
        retried,
        assigned,
        n_id,
        n_type,
        n_def,
        n_err,
        n_assignee,
        n_result,
        n_tags,
    ) = _head(raw)
    e_id = _HEAD_SIZE + n_id
    e_type = e_id + n_type
    e_def = e_type + n_def
    e_err = e_def + n_err
    e_assignee = e_err + n_assignee
    e_result = e_assignee + n_result
    try:
        job = Job(
            raw[_HEAD_SIZE:e_id].decode("utf-8", "surrogatepass"),
            raw[e_id:e_type].decode("utf-8", "surrogatepass"),
            raw[e_type:e_def],
            raw[e_result:].decode("utf-8", "surrogatepass").split("\x00") if n_tags else [],
            STATUS_CODES[code],
            from_micros(created),
            from_micros(started) if flags & _F_STARTED else None,
            from_micros(finalized) if flags & _F_FINALIZED else None,
            raw[e_def:e_err].decode("utf-8", "surrogatepass") if n_err else "",
            raw[e_assignee:e_result] if flags & _F_RESULT else None,
            retries,
            from_micros(retried) if flags & _F_RETRY else None,
            raw[e_err:e_assignee].decode("utf-8", "surrogatepass") if n_assignee else "",
            from_micros(assigned) if flags & _F_ASSIGNED else None,
        )
    except (UnicodeDecodeError, OverflowError) as exc:
        raise _corrupt(str(exc)) from exc
    return job, seq


def decode_state(raw: bytes) -> tuple[JobStatus, datetime | None]:
    """Only the status and ``assigned_at`` of a record (reads the fixed header)."""
    head = _head(raw)
    return STATUS_CODES[head[1]], from_micros(head[9]) if head[2] & _F_ASSIGNED else None
