"""The shipped conformance kit (``jobpool_async.testing.BackendConformance``) on every
backend of this package: the same class a third-party backend's tests subclass."""

from __future__ import annotations

import pytest

from jobpool_async.testing import BackendConformance, BackendFactory


class TestConformance(BackendConformance):
    @pytest.fixture
    def make_backend(self, make_backend: BackendFactory) -> BackendFactory:
        """The project's factory (``tests/conftest.py``): once per backend name."""
        return make_backend
