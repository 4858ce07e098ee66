"""Running a coroutine's first step at once: no task (and no loop iteration) for a
call that finishes without suspending, as every call to the memory backend does.

``asyncio.ensure_future`` only schedules a coroutine: its first step runs in the next
loop iteration, and its result reaches a waiter in the one after. The queue's calls
that must survive their caller's cancellation (a claim, a refilling apply) used a
task each; :func:`start` runs the first step here instead, and only a call that
suspends becomes a task (driven on from where it suspended: :func:`resume`).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["Started", "resume", "shielded", "start"]

_T = TypeVar("_T")


@types.coroutine
def resume(
    coro: Coroutine[Any, Any, _T], value: Any, run: Callable[..., Any] | None = None
) -> Generator[Any, Any, _T]:
    """Drive ``coro`` on from a suspension at which it yielded ``value`` (``yield
    from`` by hand, as its task would), every step in ``run`` (a context's ``run``)
    if given."""
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # CancelledError above all: it goes to ``coro``
            try:
                value = run(coro.throw, exc) if run is not None else coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                value = run(coro.send, sent) if run is not None else coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def _rest(coro: Coroutine[Any, Any, _T], value: Any) -> _T:
    return await resume(coro, value)


class Started(Generic[_T]):
    """A started call: finished (``done``: its ``result()`` returns or raises) or
    running on in ``task``."""

    __slots__ = ("_error", "_value", "done", "task")

    def __init__(self) -> None:
        self.done = False
        self.task: asyncio.Task[_T] | None = None
        self._value: _T | None = None
        self._error: BaseException | None = None

    def result(self) -> _T:
        """The finished call's value, or its exception raised."""
        if self._error is not None:
            error, self._error = self._error, None  # (no reference cycle kept)
            raise error
        return self._value  # type: ignore[return-value]

    def failed(self) -> bool:
        """Whether the finished call raised."""
        return self._error is not None


def start(coro: Coroutine[Any, Any, _T]) -> Started[_T]:
    """Run ``coro`` up to its first suspension now; if it finished, the result is in
    the returned :class:`Started`, else its ``task`` runs the rest (like
    ``ensure_future(coro)``, one loop iteration sooner)."""
    out: Started[_T] = Started()
    try:
        first = coro.send(None)
    except StopIteration as stop:
        out.done = True
        out._value = stop.value
        return out
    except BaseException as exc:  # KeyboardInterrupt and the like are raised here too
        if not isinstance(exc, Exception):
            raise
        out.done = True
        out._error = exc
        return out
    out.task = asyncio.get_running_loop().create_task(_rest(coro, first))
    return out


def shielded(
    task: asyncio.Task[_T], first: Callable[[asyncio.Task[_T]], object]
) -> asyncio.Future[_T]:
    """A future with ``task``'s outcome, for its caller to await: cancelling that
    caller cancels the future, not the task (``asyncio.shield``'s promise), and
    ``first(task)`` runs when the task ends, before the future gets its outcome.

    One done callback for both (each done callback is a turn of the event loop's
    own: ``shield``'s and the caller's were two, in that order, as here)."""
    outer: asyncio.Future[_T] = task.get_loop().create_future()

    def done(inner: asyncio.Task[_T]) -> None:
        try:
            first(inner)
        finally:
            if outer.cancelled():  # its caller gave up: nobody takes the outcome
                if not inner.cancelled():
                    inner.exception()  # (retrieved: no "never retrieved" log)
            elif inner.cancelled():
                outer.cancel()
            else:
                exc = inner.exception()
                if exc is not None:
                    outer.set_exception(exc)
                else:
                    outer.set_result(inner.result())

    task.add_done_callback(done)
    return outer
