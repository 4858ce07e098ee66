"""Testing tools: a clock that moves only when told to, helpers, and the conformance kit.

* :class:`FakeClock`: ``PoolQueue(backend, clock=FakeClock())`` makes every timestamp
  the queue writes come from the fake clock, and the queue's timer (for scheduled
  jobs) fire when :meth:`FakeClock.advance` passes its time, so tests never sleep
  for a schedule.
* :class:`BackendConformance`: the contract every :class:`~jobpool_async.Backend`
  keeps, as a pytest class to subclass with a ``make_backend`` fixture (see
  ``docs/backends.md``). It needs pytest and pytest-asyncio, so it loads on first
  use; the rest of this module needs neither.
* helpers for tests that drive a queue: :func:`job_in` (a job in any status),
  :func:`take`, :func:`next_batch`, :func:`until` and :func:`assert_pending` (wait,
  or check that nothing happens, with a deadline), :class:`PauseAfter` (hold a
  backend call after its write).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._clock import FakeClock
from ._helpers import (
    DEADLINE,
    PauseAfter,
    PauseAfterApply,
    assert_pending,
    job_in,
    next_batch,
    take,
    until,
)
from ._types import BackendFactory

if TYPE_CHECKING:
    from ._kit import BackendConformance

__all__ = [
    "DEADLINE",
    "BackendConformance",
    "BackendFactory",
    "FakeClock",
    "PauseAfter",
    "PauseAfterApply",
    "assert_pending",
    "job_in",
    "next_batch",
    "take",
    "until",
]


def __getattr__(name: str) -> Any:
    """The kit imports pytest: it loads only when asked for."""
    if name == "BackendConformance":
        from ._kit import BackendConformance

        return BackendConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
