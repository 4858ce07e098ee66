"""docs/backends.md: the snippet that runs the conformance kit on a backend works as a
third party would use it (an inner test suite run with ``pytester``), in both of
pytest-asyncio's modes, and the kit's failures name what went wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "backends.md"
#: A part of the kit: backend level and through a queue (the whole runs in test_kit.py).
PART = "claim_order or refill or transition_table or lease"


def snippet() -> str:
    text = DOC.read_text(encoding="utf-8")
    found = re.search(
        r"tests/test_backend_docs.py runs this block -->\n```python\n(.*?)```", text, re.S
    )
    assert found, "docs/backends.md lost its kit snippet"
    return found.group(1)


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_the_documented_kit_snippet_runs(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makeini(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
        "addopts = -p no:hypothesispytest\n"
    )
    pytester.makepyfile(test_my_backend=snippet())
    result = pytester.runpytest("-k", PART)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 10, result.stdout.str()
    assert "failed" not in outcomes and "error" not in outcomes, result.stdout.str()


def test_a_kit_failure_shows_the_values(pytester: pytest.Pytester) -> None:
    """A backend that forgets priorities fails the claim-order test, and the report
    shows what it claimed (the kit's asserts are rewritten by pytest)."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "addopts = -p no:hypothesispytest\n"
    )
    pytester.makepyfile(
        test_broken="""
import dataclasses
import pytest
from jobpool_async import MemoryBackend
from jobpool_async.testing import BackendConformance

class ForgetsPriority(MemoryBackend):
    async def insert(self, jobs):
        await super().insert([dataclasses.replace(j, priority=0) for j in jobs])

class TestBroken(BackendConformance):
    @pytest.fixture
    def make_backend(self):
        backend = ForgetsPriority()
        return lambda: backend
"""
    )
    result = pytester.runpytest("-k", "claim_order_is_priority")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*At index 0 diff: 'low-old' != 'high'*"])


def test_a_kit_subclass_without_make_backend_is_told_what_to_write(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "addopts = -p no:hypothesispytest\n"
    )
    pytester.makepyfile(
        test_forgot="""
from jobpool_async.testing import BackendConformance

class TestForgot(BackendConformance):
    pass
"""
    )
    result = pytester.runpytest("-k", "claim_order_is_priority")
    result.stdout.fnmatch_lines(["*TestForgot must override the make_backend fixture*"])
    assert result.ret != 0
