"""Which jobpool_async backends can run here, and how to make a fresh store for each run.

A backend whose module is missing, whose optional dependency is not installed or
that needs a server nobody configured is reported as unavailable with the reason,
never a crash: the harness picks backends up as they land.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from jobpool_async import Backend
from jobpool_async.backends.registry import (
    BACKEND_NAMES,
    BackendInfo,
    backend_info,
    temporary_store,
)

from .floors import FLOOR_FOR

__all__ = ["BACKEND_NAMES", "Store", "Target", "find_targets"]


@dataclass(slots=True)
class Store:
    """A fresh, empty backend plus what removes its data afterwards."""

    backend: Backend
    cleanup: Callable[[], Awaitable[None]]
    #: Its URL (``open_backend(location)`` opens it), for child processes.
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


def new_schema() -> str:
    return f"jpbench_{uuid.uuid4().hex[:12]}"


def _target(info: BackendInfo, postgres_dsn: str | None) -> Target:
    if info.name not in FLOOR_FOR:  # a registered backend this harness cannot compare yet
        return Target(info.name, False, "no raw storage floor for it in benchmarks/floors.py")
    if info.needs_server and not postgres_dsn:
        reason = "no DSN: set JOBPOOL_BENCH_POSTGRES_DSN or pass --postgres-dsn"
        return Target(info.name, False, reason)
    try:
        cls = info.load()
    except ImportError as exc:
        return Target(info.name, False, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a half-written module must not stop the whole run
        return Target(
            info.name, False, f"importing {info.target} failed: {type(exc).__name__}: {exc}"
        )
    # A second backend on the same store, as another process would have its own, where
    # the backend pushes changes between processes (it overrides set_listener).
    pushes = cls.set_listener is not Backend.set_listener

    def factory(workdir: Path) -> Store:
        store = temporary_store(
            info.name,
            workdir,
            postgres_dsn=postgres_dsn,
            schema=new_schema() if info.needs_server else None,
            stem=f"jp-{uuid.uuid4().hex[:8]}",
        )
        return Store(
            store.new_backend(), store.remove, store.url, store.new_backend if pushes else None
        )

    return Target(info.name, True, _factory=factory, postgres_dsn=postgres_dsn)


def find_targets(names: list[str], postgres_dsn: str | None) -> list[Target]:
    """The requested backends, each available or not (with the reason)."""
    return [_target(backend_info(name), postgres_dsn) for name in names]
