"""Which jobpool_async backends can run here, and how to make a fresh store for each run.

A backend whose module is missing, whose optional dependency is not installed or
that needs a server nobody configured is reported as unavailable with the reason,
never a crash: the harness picks backends up as they land.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobpool_async import Backend, MemoryBackend

__all__ = ["BACKEND_NAMES", "Store", "Target", "drop_schema", "find_targets"]

BACKEND_NAMES = ("memory", "sqlite", "leveldb", "postgres")


@dataclass(slots=True)
class Store:
    """A fresh, empty backend plus what removes its data afterwards."""

    backend: Backend
    cleanup: Callable[[], Awaitable[None]]
    #: Where it lives (a path or ``dsn#schema``), for child processes.
    location: str
    #: Makes a second backend on the same store, as another process would have its
    #: own (where the backend pushes changes between processes: PostgreSQL).
    twin: Callable[[], Backend] | None = None


@dataclass(slots=True)
class Target:
    """One backend: available with a way to make stores, or unavailable with a reason."""

    name: str
    available: bool
    reason: str = ""
    _factory: Callable[[Path], Store] | None = None
    postgres_dsn: str | None = None

    def new_store(self, workdir: Path) -> Store:
        if self._factory is None:
            raise RuntimeError(f"backend {self.name} is unavailable: {self.reason}")
        return self._factory(workdir)


async def _nothing() -> None:
    return None


def _load(module: str, cls: str) -> tuple[Any, str]:
    try:
        mod = importlib.import_module(module)
        return getattr(mod, cls), ""
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    except AttributeError as exc:
        return None, f"{module} has no {cls}: {exc}"
    except Exception as exc:  # a half-written module must not stop the whole run
        return None, f"importing {module} failed: {type(exc).__name__}: {exc}"


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop a PostgreSQL schema the harness created (and everything in it)."""
    asyncpg: Any = importlib.import_module("asyncpg")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def new_schema() -> str:
    return f"jpbench_{uuid.uuid4().hex[:12]}"


def find_targets(names: list[str], postgres_dsn: str | None) -> list[Target]:
    """The requested backends, each available or not (with the reason)."""
    out: list[Target] = []
    for name in names:
        if name == "memory":

            def memory(workdir: Path) -> Store:
                return Store(MemoryBackend(), _nothing, "memory://")

            out.append(Target("memory", True, _factory=memory))
        elif name == "sqlite":
            cls, reason = _load("jobpool_async.backends.sqlite", "SQLiteBackend")
            if cls is None:
                out.append(Target("sqlite", False, reason))
                continue

            def sqlite(workdir: Path, cls: Any = cls) -> Store:
                path = workdir / f"jp-{uuid.uuid4().hex[:8]}.db"

                async def cleanup() -> None:
                    for suffix in ("", "-wal", "-shm", "-journal"):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(f"{path}{suffix}")

                return Store(cls(path), cleanup, str(path))

            out.append(Target("sqlite", True, _factory=sqlite))
        elif name == "leveldb":
            cls, reason = _load("jobpool_async.backends.leveldb", "LevelDBBackend")
            if cls is None:
                out.append(Target("leveldb", False, reason))
                continue

            def leveldb(workdir: Path, cls: Any = cls) -> Store:
                path = workdir / f"jp-{uuid.uuid4().hex[:8]}.ldb"

                async def cleanup() -> None:
                    shutil.rmtree(path, ignore_errors=True)

                return Store(cls(path), cleanup, str(path))

            out.append(Target("leveldb", True, _factory=leveldb))
        elif name == "postgres":
            if not postgres_dsn:
                out.append(
                    Target(
                        "postgres",
                        False,
                        "no DSN: set JOBPOOL_BENCH_POSTGRES_DSN or pass --postgres-dsn",
                    )
                )
                continue
            cls, reason = _load("jobpool_async.backends.postgres", "PostgresBackend")
            if cls is None:
                out.append(Target("postgres", False, reason))
                continue

            def postgres(workdir: Path, cls: Any = cls, dsn: str = postgres_dsn) -> Store:
                schema = new_schema()

                async def cleanup() -> None:
                    await drop_schema(dsn, schema)

                return Store(
                    cls(dsn, schema=schema),
                    cleanup,
                    f"{dsn}#{schema}",
                    lambda: cls(dsn, schema=schema),
                )

            out.append(Target("postgres", True, _factory=postgres, postgres_dsn=postgres_dsn))
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    return out
