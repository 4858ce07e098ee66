from __future__ import annotations

from collections.abc import Callable

from jobpool_async import Backend

#: What a kit user's ``make_backend`` fixture returns: each call builds a new,
#: unopened backend on the same store (so a test can close one and reopen the store).
BackendFactory = Callable[[], Backend]
