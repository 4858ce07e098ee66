"""Raw storage floors: the minimal insert / claim / complete work, without a job queue.

Each floor stores rows shaped like a job (id, type, payload, tags, status,
timestamps, assignee, result), keeps an index of pending rows in selection order,
and does exactly the storage work a queue cannot avoid:

* ``raw sqlite3``: ``executemany`` insert in one transaction per batch, a claim
  of the same batch size as one ``UPDATE … RETURNING`` statement, and completion
  as one ``executemany`` in one transaction. Synchronous, on the event loop
  thread: no thread hops at all. WAL, ``synchronous=NORMAL`` (as our SQLite
  backend's default).
* ``raw aiosqlite``: the same through aiosqlite with the fewest awaits (one per
  claim, one per completion batch, via ``UPDATE … FROM (VALUES …)``). Shown for
  reference: each await is a hop to aiosqlite's thread.
* ``raw plyvel``: one ``WriteBatch`` per insert batch (record + pending-index
  key), claims by iterating the pending index and writing one ``WriteBatch``,
  completion as one ``WriteBatch``. Synchronous, no thread hops.
* ``raw asyncpg``: insert with one ``unnest`` statement, claim with
  ``FOR UPDATE SKIP LOCKED`` in one ``UPDATE … RETURNING``, completion with one
  ``UPDATE … FROM unnest(…)``. Durable commits (server default).
* ``raw dict``: a dict and a deque, the floor for the in-memory backend.

The same floor instance serves the bulk-enqueue, end-to-end and wake-latency
workloads; every end-to-end run checks that each job was claimed exactly once.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import importlib
import json
import os
import sqlite3
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._common import now

__all__ = ["FLOOR_FOR", "Floor", "make_floor"]

#: One job's work in the drain workload: its payload in, its result out.
Work = Callable[[bytes], Awaitable[bytes]]

#: The floor each backend is compared to (the target ratios use these).
FLOOR_FOR = {
    "memory": "raw dict",
    "sqlite": "raw sqlite3",
    "leveldb": "raw plyvel",
    "postgres": "raw asyncpg",
}


def _iso() -> str:
    return datetime.now(UTC).isoformat()


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:08d}" for i in range(n)]


class Floor(abc.ABC):
    """A raw storage loop. ``e2e`` returns (seconds, claimed ids in order)."""

    name: str

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def insert(self, ids: Sequence[str]) -> None: ...

    @abc.abstractmethod
    async def claim(self, limit: int) -> list[str]: ...

    @abc.abstractmethod
    async def complete(self, ids: Sequence[str]) -> None: ...

    async def bulk(self, n: int, batch: int) -> float:
        ids = _ids(f"b{uuid.uuid4().hex[:6]}-", n)
        t0 = now()
        for i in range(0, n, batch):
            await self.insert(ids[i : i + batch])
        return now() - t0

    async def e2e(self, n: int, claim_batch: int, insert_batch: int) -> tuple[float, list[str]]:
        """Insert ``n`` jobs in batches, then claim/complete ``claim_batch`` at a time."""
        ids = _ids(f"e{uuid.uuid4().hex[:6]}-", n)
        claimed: list[str] = []
        t0 = now()
        for i in range(0, n, insert_batch):
            await self.insert(ids[i : i + insert_batch])
        while len(claimed) < n:
            got = await self.claim(claim_batch)
            if not got:
                break
            claimed.extend(got)
            await self.complete(got)
        return now() - t0, claimed

    async def drain(
        self, n: int, batch: int, payload: Callable[[int], bytes], work: Work
    ) -> tuple[float, list[str], float]:
        """The drain workload (issue #20): insert ``n`` jobs in one call, then claim
        ``batch`` at a time, run ``work`` on each job's payload and complete the batch.
        (The floor stores no payload: ``work`` gets it from memory, so the floor does
        the same per-job Python work as the queue without its payload's storage cost.)
        Returns the seconds, the ids claimed and the process CPU seconds of that time."""
        prefix = f"d{uuid.uuid4().hex[:6]}-"
        ids = _ids(prefix, n)
        payloads = {job_id: payload(i) for i, job_id in enumerate(ids)}
        claimed: list[str] = []
        t0, cpu0 = now(), time.process_time()
        await self.insert(ids)
        while len(claimed) < n:
            got = await self.claim(batch)
            if not got:
                break
            for job_id in got:
                await work(payloads[job_id])
            claimed.extend(got)
            await self.complete(got)
        return now() - t0, claimed, time.process_time() - cpu0

    async def wake(self, samples: int) -> list[float]:
        """Seconds to claim one just-inserted job: the storage work a wake cannot avoid
        between ``enqueue_job`` returning and the consumer holding the job."""
        out = []
        prefix = f"w{uuid.uuid4().hex[:6]}-"
        for i in range(samples):
            await self.insert([f"{prefix}{i:08d}"])
            t0 = now()
            got = await self.claim(1)
            out.append(now() - t0)
            await self.complete(got)
        return out


# --- raw sqlite3 ---------------------------------------------------------------------

_SQL_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_type TEXT NOT NULL,
    job_definition BLOB NOT NULL,
    tags TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finalized_at TEXT,
    result BLOB,
    assignee_id TEXT NOT NULL DEFAULT '',
    assigned_at TEXT
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (created_at, seq) WHERE status = 'p';
"""
_SQL_INSERT = (
    "INSERT INTO jobs (id, job_type, job_definition, tags, status, created_at) "
    "VALUES (?, 'bench', x'', '[]', 'p', ?)"
)
_SQL_CLAIM = (
    "UPDATE jobs SET status = 'r', assignee_id = ?, assigned_at = ?, "
    "started_at = COALESCE(started_at, ?) WHERE seq IN "
    "(SELECT seq FROM jobs WHERE status = 'p' ORDER BY created_at, seq LIMIT ?) "
    "RETURNING id, job_type, job_definition, tags, status, created_at, started_at, "
    "finalized_at, result, assignee_id, assigned_at"
)
_SQL_COMPLETE = (
    "UPDATE jobs SET status = 'c', result = ?, finalized_at = ? WHERE id = ? AND status = 'r'"
)


class RawSqlite3(Floor):
    name = "raw sqlite3"

    def __init__(self, workdir: Path) -> None:
        self._path = workdir / f"floor-{uuid.uuid4().hex[:8]}.db"
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    async def open(self) -> None:
        self._db = sqlite3.connect(self._path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SQL_SCHEMA)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{self._path}{suffix}")

    async def insert(self, ids: Sequence[str]) -> None:
        ts = _iso()
        self.db.execute("BEGIN")
        self.db.executemany(_SQL_INSERT, [(i, ts) for i in ids])
        self.db.execute("COMMIT")

    async def claim(self, limit: int) -> list[str]:
        ts = _iso()
        rows = self.db.execute(_SQL_CLAIM, ("floor", ts, ts, limit)).fetchall()
        return [r[0] for r in rows]

    async def complete(self, ids: Sequence[str]) -> None:
        ts = _iso()
        self.db.execute("BEGIN")
        self.db.executemany(_SQL_COMPLETE, [(b"", ts, i) for i in ids])
        self.db.execute("COMMIT")


class RawAiosqlite(RawSqlite3):
    name = "raw aiosqlite"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._adb: Any = None

    async def open(self) -> None:
        aiosqlite: Any = importlib.import_module("aiosqlite")
        self._adb = await aiosqlite.connect(self._path, isolation_level=None)
        await self._adb.execute("PRAGMA journal_mode=WAL")
        await self._adb.execute("PRAGMA synchronous=NORMAL")
        await self._adb.executescript(_SQL_SCHEMA)

    async def close(self) -> None:
        if self._adb is not None:
            await self._adb.close()
            self._adb = None
        await super().close()

    async def insert(self, ids: Sequence[str]) -> None:
        ts = _iso()
        await self._adb.execute("BEGIN")
        await self._adb.executemany(_SQL_INSERT, [(i, ts) for i in ids])
        await self._adb.execute("COMMIT")

    async def claim(self, limit: int) -> list[str]:
        ts = _iso()
        rows = await self._adb.execute_fetchall(_SQL_CLAIM, ("floor", ts, ts, limit))
        return [r[0] for r in rows]

    async def complete(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        values = ",".join("(?, ?)" for _ in ids)
        params: list[object] = [_iso()]
        for i in ids:
            params.extend((i, b""))
        await self._adb.execute(
            "UPDATE jobs SET status = 'c', result = v.column2, finalized_at = ? "
            f"FROM (VALUES {values}) AS v WHERE jobs.id = v.column1 AND jobs.status = 'r'",
            params,
        )


# --- raw plyvel ----------------------------------------------------------------------


class RawPlyvel(Floor):
    """Records under ``j<id>``; pending index ``p<created µs><seq>`` → id.

    Claims iterate from the lowest pending key not yet claimed (a cursor, moved
    back when an insert sorts before it), so they do not wade through the
    tombstones that earlier claims left until LevelDB compacts them away.
    """

    name = "raw plyvel"

    def __init__(self, workdir: Path) -> None:
        self._path = workdir / f"floor-{uuid.uuid4().hex[:8]}.ldb"
        self._db: Any = None
        self._seq = 0
        self._cursor = b"p"

    async def open(self) -> None:
        plyvel: Any = importlib.import_module("plyvel")
        self._db = plyvel.DB(str(self._path), create_if_missing=True)

    async def close(self) -> None:
        import shutil

        if self._db is not None:
            self._db.close()
            self._db = None
        shutil.rmtree(self._path, ignore_errors=True)

    async def insert(self, ids: Sequence[str]) -> None:
        created = int(time.time() * 1_000_000)
        ts = _iso()
        with self._db.write_batch() as wb:
            for job_id in ids:
                self._seq += 1
                key = job_id.encode()
                rec = {
                    "id": job_id,
                    "job_type": "bench",
                    "tags": [],
                    "status": "p",
                    "created_at": ts,
                    "seq": self._seq,
                }
                wb.put(b"j" + key, json.dumps(rec).encode())
                idx = b"p" + struct.pack(">QQ", created, self._seq)
                wb.put(idx, key)
                self._cursor = min(self._cursor, idx)

    async def claim(self, limit: int) -> list[str]:
        ts = _iso()
        out = []
        with self._db.write_batch() as wb:
            for idx_key, key in self._db.iterator(start=self._cursor, stop=b"q"):
                rec = json.loads(self._db.get(b"j" + key))
                rec.update(status="r", assignee_id="floor", assigned_at=ts, started_at=ts)
                wb.delete(idx_key)
                wb.put(b"j" + key, json.dumps(rec).encode())
                out.append(rec["id"])
                self._cursor = idx_key + b"\x00"
                if len(out) >= limit:
                    break
        return out

    async def complete(self, ids: Sequence[str]) -> None:
        ts = _iso()
        with self._db.write_batch() as wb:
            for job_id in ids:
                key = b"j" + job_id.encode()
                rec = json.loads(self._db.get(key))
                if rec["status"] == "r":
                    rec.update(status="c", result="", finalized_at=ts)
                    wb.put(key, json.dumps(rec).encode())

    async def drain(
        self, n: int, batch: int, payload: Callable[[int], bytes], work: Work
    ) -> tuple[float, list[str], float]:
        """The drain workload as issue #20 defines its floor: a key-move loop.

        One ``WriteBatch`` puts every job's pending key ``P<id>`` (ids sort in enqueue
        order) with its payload as the value; then each round reads the next
        ``batch`` pending keys from a cursor, runs ``work`` on each payload and moves
        the keys in one ``WriteBatch`` (the pending key deleted, ``Q<id>`` put with
        the result). Synchronous, no thread hops, no record to decode or encode: the
        least a store can do per job (it keeps each job's payload and result).
        Returns the seconds, the ids claimed and the process CPU seconds of that time."""
        tag = uuid.uuid4().hex[:6]
        ids = _ids(f"d{tag}-", n)
        bodies = [payload(i) for i in range(n)]
        pending, done = f"P{tag}".encode(), f"Q{tag}".encode()
        cut = len(pending)
        db = self._db
        keys = [pending + job_id.encode() for job_id in ids]
        claimed: list[str] = []
        t0, cpu0 = now(), time.process_time()
        with db.write_batch() as wb:
            for key, body in zip(keys, bodies, strict=True):
                wb.put(key, body)
        start, stop = pending, pending + b"\xff"
        while len(claimed) < n:
            got: list[tuple[bytes, bytes]] = []
            with db.iterator(start=start, stop=stop) as it:
                for item in it:
                    got.append(item)
                    if len(got) >= batch:
                        break
            if not got:
                break
            with db.write_batch() as wb:
                for key, body in got:
                    result = await work(body)
                    wb.delete(key)
                    wb.put(done + key[cut:], result)
            start = got[-1][0] + b"\x00"
            claimed.extend(key[cut:].decode() for key, _ in got)
        return now() - t0, claimed, time.process_time() - cpu0


# --- raw asyncpg ---------------------------------------------------------------------


class RawAsyncpg(Floor):
    name = "raw asyncpg"

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._schema = f"jpfloor_{uuid.uuid4().hex[:12]}"
        self._conn: Any = None

    async def open(self) -> None:
        asyncpg: Any = importlib.import_module("asyncpg")
        self._conn = await asyncpg.connect(self._dsn)
        await self._conn.execute(
            f"""
            CREATE SCHEMA "{self._schema}";
            SET search_path TO "{self._schema}";
            CREATE TABLE jobs (
                seq BIGSERIAL PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                job_type TEXT NOT NULL,
                job_definition BYTEA NOT NULL,
                tags TEXT[] NOT NULL,
                status TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                started_at TIMESTAMPTZ,
                finalized_at TIMESTAMPTZ,
                result BYTEA,
                assignee_id TEXT NOT NULL DEFAULT '',
                assigned_at TIMESTAMPTZ
            );
            CREATE INDEX jobs_pending ON jobs (created_at, seq) WHERE status = 'p';
            """
        )

    async def close(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.execute(f'DROP SCHEMA IF EXISTS "{self._schema}" CASCADE')
            finally:
                await self._conn.close()
                self._conn = None

    async def insert(self, ids: Sequence[str]) -> None:
        await self._conn.execute(
            "INSERT INTO jobs (id, job_type, job_definition, tags, status, created_at) "
            "SELECT i, 'bench', '', '{}', 'p', $2 FROM unnest($1::text[]) AS i",
            list(ids),
            datetime.now(UTC),
        )

    async def claim(self, limit: int) -> list[str]:
        rows = await self._conn.fetch(
            "UPDATE jobs SET status = 'r', assignee_id = 'floor', assigned_at = $1, "
            "started_at = COALESCE(started_at, $1) WHERE seq IN ("
            "SELECT seq FROM jobs WHERE status = 'p' ORDER BY created_at, seq "
            "FOR UPDATE SKIP LOCKED LIMIT $2) RETURNING *",
            datetime.now(UTC),
            limit,
        )
        return [r["id"] for r in rows]

    async def complete(self, ids: Sequence[str]) -> None:
        await self._conn.execute(
            "UPDATE jobs SET status = 'c', result = v.r, finalized_at = $3 "
            "FROM unnest($1::text[], $2::bytea[]) AS v(id, r) "
            "WHERE jobs.id = v.id AND jobs.status = 'r'",
            list(ids),
            [b""] * len(ids),
            datetime.now(UTC),
        )


# --- raw dict ------------------------------------------------------------------------


class RawDict(Floor):
    name = "raw dict"

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._pending: collections.deque[str] = collections.deque()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._jobs.clear()
        self._pending.clear()

    async def insert(self, ids: Sequence[str]) -> None:
        ts = datetime.now(UTC)
        for job_id in ids:
            if job_id in self._jobs:
                raise ValueError(f"duplicate {job_id}")
            self._jobs[job_id] = {"status": "p", "created_at": ts, "tags": []}
            self._pending.append(job_id)

    async def claim(self, limit: int) -> list[str]:
        ts = datetime.now(UTC)
        out: list[str] = []
        while self._pending and len(out) < limit:
            job_id = self._pending.popleft()
            self._jobs[job_id].update(status="r", assignee_id="floor", assigned_at=ts)
            out.append(job_id)
        return out

    async def complete(self, ids: Sequence[str]) -> None:
        ts = datetime.now(UTC)
        for job_id in ids:
            rec = self._jobs[job_id]
            if rec["status"] == "r":
                rec.update(status="c", result=b"", finalized_at=ts)


def make_floor(name: str, workdir: Path, postgres_dsn: str | None = None) -> Floor:
    if name == "raw sqlite3":
        return RawSqlite3(workdir)
    if name == "raw aiosqlite":
        return RawAiosqlite(workdir)
    if name == "raw plyvel":
        return RawPlyvel(workdir)
    if name == "raw asyncpg":
        if not postgres_dsn:
            raise ValueError("raw asyncpg needs a PostgreSQL DSN")
        return RawAsyncpg(postgres_dsn)
    if name == "raw dict":
        return RawDict()
    raise ValueError(f"unknown floor {name!r}")
