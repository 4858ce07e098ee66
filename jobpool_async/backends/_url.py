"""``open_backend(url)``: build a backend from a URL (SQLAlchemy-style paths)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from .base import Backend

__all__ = ["open_backend"]


def _path(url: str, scheme: str) -> str:
    """``scheme:///relative`` → ``relative``; ``scheme:////abs`` → ``/abs``."""
    rest = url[len(scheme) + 3 :]  # after "scheme://"
    if not rest.startswith("/"):
        raise ValueError(f"{scheme} URL needs three slashes before the path, got {url!r}")
    path = unquote(rest[1:])
    if not path:
        raise ValueError(f"{scheme} URL has no path: {url!r}")
    return path


def open_backend(url: str, **options: Any) -> Backend:
    """Build a backend from ``memory://``, ``sqlite:///file.db``, ``leveldb:///dir``
    or ``postgresql://…``; ``options`` go to the backend's constructor."""
    if not isinstance(url, str):
        raise TypeError(f"url must be str, got {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from .memory import MemoryBackend

        if options:
            raise TypeError(f"MemoryBackend takes no options, got {sorted(options)}")
        return MemoryBackend()
    if scheme == "sqlite":
        from .sqlite import SQLiteBackend

        return SQLiteBackend(_path(url, "sqlite"), **options)
    if scheme == "leveldb":
        from .leveldb import LevelDBBackend

        return LevelDBBackend(_path(url, "leveldb"), **options)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresBackend

        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [v for k, v in query if k == "schema"]
        if schemas:  # ours, not the server's: the store's schema (one URL names a store)
            if "schema" in options or len(schemas) > 1:
                raise ValueError(f"the schema is given twice in {url!r}")
            options["schema"] = schemas[0]
            rest = urlencode([(k, v) for k, v in query if k != "schema"])
            url = urlunsplit(parts._replace(query=rest))
        return PostgresBackend(url, **options)
    raise ValueError(
        f"unknown backend URL scheme {scheme!r} in {url!r}; "
        "use memory://, sqlite:///path, leveldb:///path or postgresql://..."
    )
