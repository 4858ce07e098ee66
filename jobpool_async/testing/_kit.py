"""The conformance kit: every test of the backend contract, as one pytest class.

A backend author subclasses :class:`BackendConformance` and provides a
``make_backend`` fixture; pytest then runs the whole contract on that backend,
once at the backend level (its methods called directly) and once through a
:class:`~jobpool_async.PoolQueue`. See ``docs/backends.md``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from jobpool_async import Backend, PoolQueue

from ._api_tests import QueueApiTests
from ._backend_tests import BackendTests, LeaseTests
from ._clock import FakeClock
from ._input_tests import BadInputTests
from ._listing_tests import ListingTests
from ._refill_tests import RefillTests
from ._stream_tests import StreamTests
from ._time_tests import T0, TimeTests
from ._transition_tests import TransitionTests
from ._types import BackendFactory

__all__ = ["BackendConformance", "BackendFactory"]


class BackendConformance(
    BackendTests,
    LeaseTests,
    QueueApiTests,
    TransitionTests,
    BadInputTests,
    StreamTests,
    RefillTests,
    TimeTests,
    ListingTests,
):
    """The backend contract as tests. Subclass it (as ``Test...``) and override
    :meth:`make_backend`; every test gets a fresh store.

    Works in pytest-asyncio's ``auto`` and ``strict`` modes (the tests carry the
    ``asyncio`` mark; the fixtures are pytest-asyncio fixtures).
    """

    pytestmark = [pytest.mark.asyncio]

    @pytest.fixture
    def make_backend(self) -> BackendFactory:
        """Override: return a function making a new, unopened backend on one fresh store
        per test (every call the same store: a test may close one and open the next).
        Clean the store up after the ``yield`` if it outlives the test."""
        raise pytest.UsageError(
            f"{type(self).__name__} must override the make_backend fixture: "
            "return a callable that builds an unopened Backend on a fresh store"
        )

    @pytest_asyncio.fixture
    async def backend(self, make_backend: BackendFactory) -> AsyncIterator[Backend]:
        """An open backend, closed after the test."""
        backend = make_backend()
        await backend.open()
        try:
            yield backend
        finally:
            await backend.close()

    @pytest_asyncio.fixture
    async def queue(self, make_backend: BackendFactory) -> AsyncIterator[PoolQueue]:
        """An open queue on a backend from ``make_backend``, closed after the test."""
        async with PoolQueue(make_backend()) as queue:
            yield queue

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(T0)

    @pytest_asyncio.fixture
    async def tq(self, make_backend: BackendFactory, clock: FakeClock) -> AsyncIterator[PoolQueue]:
        """An open queue whose time is ``clock``."""
        async with PoolQueue(make_backend(), clock=clock) as queue:
            yield queue
