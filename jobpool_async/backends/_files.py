"""Checks on the paths of the embedded stores (SQLite, LevelDB)."""

from __future__ import annotations

from pathlib import Path

from .base import (
    StorageError,
)

__all__ = ["check_parent"]


def check_parent(path: Path, what: str) -> None:
    """Refuse a store whose directory is missing (SQLite would only say "unable to open
    database file"); creating directories is left to the caller, on purpose."""
    if path.exists():
        return
    parent = path.absolute().parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise StorageError(
            f"cannot create the {what} {str(path)!r}: the directory {str(parent)!r} {why} "
            "(create it first: jobpool_async does not create missing directories)"
        )
