"""The public driver layer: ``jobpool_async.backends.base`` is all a backend imports.

Issue #15: backends, the benchmarks, the pytest plugin and the tests import only
names that ``jobpool_async``, ``jobpool_async.backends.base``, a backend's own
public module, ``jobpool_async.testing`` or the registry export. Checked here by
reading their imports, so a new private import fails the suite with its place.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import jobpool_async
from jobpool_async import Job
from jobpool_async.backends import base
from jobpool_async.backends.base import (
    COMPLETE,
    TRANSITIONS,
    UPDATE_TO,
    JobStatus,
    Transition,
)

ROOT = Path(__file__).resolve().parent.parent

#: White-box unit tests of one private module (the module is their subject).
WHITE_BOX = {
    "tests/test_config.py": {"jobpool_async._config"},
    "tests/test_leases.py": {"jobpool_async._leases"},
    "tests/test_notifier.py": {"jobpool_async._notifier"},
    "tests/test_clock.py": {"jobpool_async._clock"},
    "tests/test_queue_eager.py": {"jobpool_async._eager"},
    "tests/test_memory_backend.py": {
        "jobpool_async.backends.memory._Lazy",
        "jobpool_async.backends.memory._Taken",
    },
    "tests/test_worker_thread.py": {"jobpool_async.backends._thread"},
    "tests/test_leveldb.py": {"jobpool_async.backends._leveldb_codec"},
    "tests/test_listing_upgrade.py": {"jobpool_async.backends._leveldb_codec"},
    "tests/test_postgres.py": {"jobpool_async.backends.postgres._maintenance"},
    "tests/test_sql_rows.py": {"jobpool_async.backends._sql"},
    # prices the tracing wrapper by swapping it out (its worker-notrace arm)
    "benchmarks/postgres_cpu.py": {"jobpool_async._tracing"},
    # counts the clock's sleeps by swapping the clock module's view of ``time``
    "benchmarks/dense_timers.py": {"jobpool_async._clock"},
}


def _sources() -> Iterator[Path]:
    yield ROOT / "jobpool_async" / "pytest_plugin.py"
    for folder in ("jobpool_async/backends", "benchmarks", "tests"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _package(path: Path) -> str:
    """The package a module's relative imports start from (its folder)."""
    return ".".join(path.relative_to(ROOT).parts[:-1])


def _imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, absolute module, names imported from it) for every import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                pkg = _package(path).split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                module = ".".join([*pkg, module] if module else pkg)
            names = [a.name for a in node.names]
            yield node.lineno, module, [n for n in names if not _private(n)]
            for name in filter(_private, names):  # a private submodule or name
                yield node.lineno, f"{module}.{name}", []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _allowed(source: str, module: str) -> bool:
    if not module.startswith("jobpool_async"):
        return True  # the harness's and the tests' own modules, and third parties
    if not any(_private(part) for part in module.split(".")):
        return True
    if source == "jobpool_async/backends/base.py":
        return True  # the one module that re-exports the core's names
    if source.startswith("jobpool_async/backends/"):
        # A shipped backend may use the backends' shared private helpers (_sql, _files,
        # its own package's modules), never the core's private modules.
        return module.startswith("jobpool_async.backends.")
    return any(module == m or module.startswith(m + ".") for m in WHITE_BOX.get(source, ()))


def test_backends_benchmarks_plugin_and_tests_import_only_public_names() -> None:
    problems = []
    for path in _sources():
        source = path.relative_to(ROOT).as_posix()
        for line, module, names in _imports(path):
            if not _allowed(source, module):
                problems.append(f"{source}:{line}: imports private module {module}")
                continue
            if module in ("jobpool_async", "jobpool_async.backends.base"):
                exported = set(importlib.import_module(module).__all__)
                private = [n for n in names if n != "*" and n not in exported]
                if private:
                    problems.append(f"{source}:{line}: {module} does not export {private}")
    assert not problems, "\n".join(problems)


def test_the_white_box_list_names_real_imports() -> None:
    """An entry left behind when its test stops importing the module is removed."""
    for source, modules in WHITE_BOX.items():
        found = {m for _, m, _ in _imports(ROOT / source)}
        unused = {m for m in modules if not any(f == m or f.startswith(m + ".") for f in found)}
        assert not unused, (source, unused)


def test_base_exports_everything_it_lists() -> None:
    missing = [name for name in base.__all__ if not hasattr(base, name)]
    assert not missing
    for name in ("Backend", "Change", "Moved", "Refill", "Selection", "JobState", "Lease"):
        assert name in base.__all__
    for name in ("ListQuery", "Job", "JobStatus", "ELIGIBLE", "ACTIVE", "FINAL", "StorageError"):
        assert name in base.__all__
    assert {"Clock", "utcnow", "TRANSITIONS", "UPDATE_TO", "apply_transition"} <= set(base.__all__)
    assert jobpool_async.Job is base.Job and jobpool_async.StorageError is base.StorageError
    doc = base.__doc__ or ""
    assert "jobpool_async._" not in doc and "tests/conformance" not in doc


def test_the_transition_table_is_complete() -> None:
    names = {t.name for t in TRANSITIONS}
    assert {"assign", "complete", "fail", "cancel", "lease_expired", "release"} <= names
    assert all(isinstance(t, Transition) for t in [*TRANSITIONS, *UPDATE_TO.values()])
    job = Job(id="a", job_type="t")
    job.status = JobStatus.RUNNING
    assert base.apply_transition(job, COMPLETE, datetime.now(UTC), result=b"r") is (
        JobStatus.COMPLETED
    )
    assert job.result == b"r" and job.finalized_at is not None
