"""The backend registry: every backend this package ships, by name and URL scheme.

One :class:`BackendInfo` per backend says where its class lives, what its URL
holds (nothing, a path, or a PostgreSQL DSN) and how a temporary store for tests
and benchmarks is made and removed. :func:`open_backend`, the pytest plugin, the
test suite and the benchmarks all read it, so adding a backend means writing its
module and adding one entry to :data:`BACKENDS`.

URL query strings are the constructor's keyword options, converted to the types
its signature declares (``sqlite:///jobs.db?synchronous=FULL&busy_timeout=2``,
``leveldb:///jobs.ldb?sync=true``, ``postgresql://host/db?schema=app&pool_max_size=20``).
An option the constructor does not take is a ``ValueError`` naming it and the
accepted ones, raised before anything is opened.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import shutil
import types
import typing
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from .base import Backend

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "BackendInfo",
    "TemporaryStore",
    "backend_info",
    "drop_postgres_schema",
    "open_backend",
    "temporary_store",
]

#: Connection parameters asyncpg reads from a DSN's query string (libpq's names), and
#: ``application_name``: left in the DSN for asyncpg. Any other name that is not a
#: constructor option would reach the server as a setting; it is refused instead.
_LIBPQ_PARAMETERS = frozenset(
    {
        "application_name",
        "database",
        "dbname",
        "gsslib",
        "host",
        "krbsrvname",
        "passfile",
        "password",
        "port",
        "service",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "sslcert",
        "sslcrl",
        "sslkey",
        "sslmode",
        "sslnegotiation",
        "sslpassword",
        "sslrootcert",
        "target_session_attrs",
        "user",
    }
)


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """How to find, build and make temporary stores of one backend."""

    #: The name used by ``--jobpool-backend``, the test suite and the benchmarks.
    name: str
    #: URL schemes that :func:`open_backend` maps to this backend (lower case).
    schemes: tuple[str, ...]
    #: ``module:Class`` of the backend (imported on first use: optional dependencies).
    target: str
    #: What the URL holds: ``"none"`` (``memory://``), ``"path"`` (a file or a
    #: directory after ``scheme:///``) or ``"dsn"`` (the whole URL is the DSN).
    location: Literal["none", "path", "dsn"]
    #: File name suffix of temporary stores (``"path"`` backends).
    suffix: str = ""
    #: Query parameter names left in a ``"dsn"`` URL for the driver.
    passthrough: frozenset[str] = frozenset()

    def load(self) -> type[Backend]:
        """The backend class (``ImportError`` if its module cannot be imported)."""
        module, _, cls = self.target.partition(":")
        loaded: type[Backend] = getattr(importlib.import_module(module), cls)
        return loaded

    def options(self) -> dict[str, Callable[[str], Any]]:
        """The constructor's keyword options, each with its converter from URL text."""
        cls = self.load()
        hints = typing.get_type_hints(cls.__init__)
        return {
            p.name: _converter(p.name, hints.get(p.name, str))
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    @property
    def needs_server(self) -> bool:
        """A temporary store needs a server DSN (see :func:`temporary_store`)."""
        return self.location == "dsn"


#: Every shipped backend, in the order tests and benchmarks run them.
BACKENDS: tuple[BackendInfo, ...] = (
    BackendInfo("memory", ("memory",), "jobpool_async.backends.memory:MemoryBackend", "none"),
    BackendInfo(
        "sqlite", ("sqlite",), "jobpool_async.backends.sqlite:SQLiteBackend", "path", ".db"
    ),
    BackendInfo(
        "leveldb", ("leveldb",), "jobpool_async.backends.leveldb:LevelDBBackend", "path", ".ldb"
    ),
    BackendInfo(
        "postgres",
        ("postgresql", "postgres"),
        "jobpool_async.backends.postgres:PostgresBackend",
        "dsn",
        passthrough=_LIBPQ_PARAMETERS,
    ),
)

BACKEND_NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)


def backend_info(name: str) -> BackendInfo:
    """The registry entry named ``name`` (``ValueError`` naming the known ones)."""
    for info in BACKENDS:
        if info.name == name:
            return info
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


# --- URL options --------------------------------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _converter(name: str, hint: Any) -> Callable[[str], Any]:
    """Text → the type ``hint`` declares (bool, int, float, str, a Literal, or ``X | None``)."""
    args = typing.get_args(hint)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    optional = union and type(None) in args
    core = [a for a in args if a is not type(None)] if union else [hint]
    kind = core[0] if len(core) == 1 else str
    if typing.get_origin(kind) is Literal:
        kind = str  # the constructor checks the value itself

    def convert(text: str) -> Any:
        low = text.strip().lower()
        if optional and low in ("", "none", "null"):
            return None
        if kind is bool:
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
            expected = "true or false"
        elif kind in (int, float):
            with contextlib.suppress(ValueError):
                return kind(text)
            expected = "an integer" if kind is int else "a number"
        else:
            return text
        raise ValueError(f"option {name}={text!r}: expected {expected}")

    return convert


def _split_path(url: str, parts: SplitResult) -> str:
    """``scheme:///relative`` → ``relative``; ``scheme:////abs`` → ``/abs``."""
    scheme = parts.scheme
    if parts.netloc or not parts.path.startswith("/"):
        raise ValueError(f"{scheme} URL needs three slashes before the path, got {url!r}")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"{scheme} URL has a '#' (write it as %23 in a path): {url!r}")
    path = unquote(parts.path[1:])
    if not path:
        raise ValueError(f"{scheme} URL has no path: {url!r}")
    return path


def _info_for_url(url: str) -> BackendInfo:
    scheme = urlsplit(url).scheme.lower()
    for info in BACKENDS:
        if scheme in info.schemes:
            return info
    forms = [f"{i.schemes[0]}://{_URL_TAIL[i.location]}" for i in BACKENDS]
    raise ValueError(
        f"unknown backend URL scheme {scheme!r} in {url!r}; "
        f"use {', '.join(forms[:-1])} or {forms[-1]}"
    )


_URL_TAIL = {"none": "", "path": "/path", "dsn": "..."}


def open_backend(url: str, **options: Any) -> Backend:
    """Build a backend from ``memory://``, ``sqlite:///file.db``, ``leveldb:///dir``
    or ``postgresql://…``.

    The URL's query string and ``options`` are the constructor's keyword options
    (URL text converted to the declared types); an option given both ways is a
    ``ValueError``, as is an unknown name in the URL (an unknown keyword is a
    ``TypeError``, as for any call). Nothing is opened: call ``open()`` (or open a
    :class:`~jobpool_async.PoolQueue` on it).
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be str, got {type(url).__name__}")
    info = _info_for_url(url)
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    location: str | None = None
    kept: list[tuple[str, str]] = []
    if info.location == "path":
        location = _split_path(url, parts)
    elif info.location == "none" and (parts.netloc or parts.path.strip("/")):
        raise ValueError(f"{info.name} URL takes no path or host, got {url!r}")
    accepted = info.options()
    for key in options:
        if key not in accepted:
            raise TypeError(
                f"{info.name} backend has no option {key!r}; "
                f"it accepts: {', '.join(sorted(accepted)) or 'none'}"
            )
    given: dict[str, Any] = dict(options)
    from_url: set[str] = set()
    for key, text in query:
        if key in info.passthrough:
            kept.append((key, text))
            continue
        if key not in accepted:
            raise ValueError(
                f"unknown option {key!r} in {url!r}; the {info.name} backend accepts: "
                f"{', '.join(sorted(accepted)) or 'no options'}"
                + (
                    f", and the connection parameters {', '.join(sorted(info.passthrough))}"
                    if info.passthrough
                    else ""
                )
            )
        if key in given:
            how = "in the URL" if key in from_url else "in the URL and as a keyword"
            raise ValueError(f"option {key!r} is given twice ({how}): {url!r}")
        try:
            given[key] = accepted[key](text)
        except ValueError as exc:
            raise ValueError(f"{exc} in {url!r}") from None
        from_url.add(key)
    cls = info.load()
    if info.location == "none":
        return cls(**given)
    if info.location == "path":
        return cls(location, **given)  # type: ignore[call-arg]
    dsn = urlunsplit(parts._replace(query=urlencode(kept)))
    return cls(dsn, **given)  # type: ignore[call-arg]


# --- temporary stores for tests and benchmarks --------------------------------------------


@dataclass(frozen=True, slots=True)
class TemporaryStore:
    """A fresh, empty store of one backend, and what removes it afterwards."""

    name: str
    #: ``open_backend(url)`` builds a backend on this same store (memory: a new one).
    url: str
    #: A new (unopened) backend on this store; for ``memory`` the same instance each time.
    new_backend: Callable[[], Backend]
    #: Deletes the store's files, or drops its PostgreSQL schema.
    remove: Callable[[], Awaitable[None]]
    #: The PostgreSQL schema of the store, else ``None``.
    schema: str | None = None


async def drop_postgres_schema(dsn: str, schema: str) -> None:
    """Drop a PostgreSQL schema and everything in it (a test or benchmark store)."""
    asyncpg: Any = importlib.import_module("asyncpg")
    conn = await asyncpg.connect(dsn)
    try:
        quoted = '"' + schema.replace('"', '""') + '"'
        await conn.execute(f"DROP SCHEMA IF EXISTS {quoted} CASCADE")
    finally:
        await conn.close()


def _remove_files(path: Path) -> None:
    """``path`` (a file or a directory) and its companions (SQLite's ``-wal`` etc.)."""
    for item in [path, *path.parent.glob(f"{path.name}-*")]:
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def temporary_store(
    name: str,
    directory: str | Path,
    *,
    postgres_dsn: str | None = None,
    schema: str | None = None,
    stem: str = "jobs",
    prefix: str = "jobpool_test_",
) -> TemporaryStore:
    """A fresh store of backend ``name``: ``directory / (stem + suffix)`` for file
    backends; for a server backend a new schema (``schema``, else ``prefix`` and a
    random suffix) on ``postgres_dsn``, which is then required (``ValueError``)."""
    info = backend_info(name)
    cls = info.load()
    if info.location == "none":
        shared = cls()

        async def nothing() -> None:
            return None

        return TemporaryStore(name, f"{info.schemes[0]}://", lambda: shared, nothing)
    if info.location == "path":
        path = Path(directory) / f"{stem}{info.suffix}"

        async def remove_files() -> None:
            _remove_files(path)

        return TemporaryStore(
            name,
            f"{info.schemes[0]}:///{quote(str(path))}",
            lambda: cls(path),  # type: ignore[call-arg]
            remove_files,
        )
    if not postgres_dsn:
        raise ValueError(f"a temporary {name} store needs a server: pass postgres_dsn")
    dsn = postgres_dsn
    schema_name = schema or f"{prefix}{uuid.uuid4().hex[:12]}"
    parts = urlsplit(dsn)
    query = [*parse_qsl(parts.query, keep_blank_values=True), ("schema", schema_name)]

    async def drop() -> None:
        await drop_postgres_schema(dsn, schema_name)

    return TemporaryStore(
        name,
        urlunsplit(parts._replace(query=urlencode(query))),
        lambda: cls(dsn, schema=schema_name),  # type: ignore[call-arg]
        drop,
        schema_name,
    )
