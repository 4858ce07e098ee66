"""Developer sessions: ``nox -s tests lint types examples bench``.

``./dev`` does the same without nox (and is what CI runs); nox builds fresh
virtualenvs, which is the better check that pyproject.toml installs everything.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "types", "examples"]
PG_DSN = "JOBPOOL_TEST_POSTGRES_DSN"


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The whole test suite (PostgreSQL tests run when JOBPOOL_TEST_POSTGRES_DSN is set)."""
    session.install("-e", ".[dev]")
    env = {PG_DSN: os.environ[PG_DSN]} if PG_DSN in os.environ else {}
    session.run("pytest", *session.posargs, env=env)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def types(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python="3.11")
def examples(session: nox.Session) -> None:
    """Run every example as a user would."""
    session.install("-e", ".[dev]")
    for path in sorted(os.listdir("examples")):
        if path.endswith(".py"):
            session.run("python", f"examples/{path}")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """The benchmarks with their peers; writes benchmarks/results/."""
    session.install("-e", ".[dev,bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
