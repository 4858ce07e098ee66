"""Storage backends. ``base.Backend`` is the contract; each module implements it.

The SQLite, LevelDB and PostgreSQL backends are imported on first use, so the
optional ``plyvel`` and ``asyncpg`` dependencies are needed only by who uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend
from .memory import MemoryBackend
from .registry import open_backend

if TYPE_CHECKING:
    from .leveldb import LevelDBBackend
    from .postgres import PostgresBackend
    from .sqlite import SQLiteBackend

__all__ = [
    "Backend",
    "LevelDBBackend",
    "MemoryBackend",
    "PostgresBackend",
    "SQLiteBackend",
    "open_backend",
]

_LAZY = {
    "SQLiteBackend": ".sqlite",
    "LevelDBBackend": ".leveldb",
    "PostgresBackend": ".postgres",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
