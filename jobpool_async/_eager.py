"""Running a coroutine's first step at once: no task (and no loop iteration) for a
call that finishes without suspending, as every call to the memory backend does; and
driving one that suspends on in its caller's task, safe from the caller's
cancellation, with no task either until the caller gives up on it.

``asyncio.ensure_future`` only schedules a coroutine: its first step runs in the next
loop iteration, and its result reaches a waiter in the one after. The queue's calls
that must survive their caller's cancellation (a claim, a refilling apply) used a
task each, shielded; :func:`start` runs the first step here instead, and
:func:`carry` runs the rest in the awaiting task, each future the call awaits hidden
behind one of its own (a cancellation of the awaiting task cancels that, never what
the call awaits). Only a call whose caller is cancelled (or closed) meanwhile
becomes a task (driven on from where it suspended: :func:`resume`), which the caller
then watches for the outcome.
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["Started", "carry", "handed_to", "note_handed", "resume", "start"]

_T = TypeVar("_T")
_partial = functools.partial


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
    """A started call: finished (``done``: its ``result()`` returns or raises), or
    suspended, to be driven on by :func:`carry` (``task``: the task it went on in,
    once its caller gave up on it)."""

    __slots__ = ("_coro", "_error", "_first", "_value", "done", "task")

    def __init__(self) -> None:
        self.done = False
        self.task: asyncio.Task[_T] | None = None
        self._value: _T | None = None
        self._error: BaseException | None = None
        self._coro: Coroutine[Any, Any, _T] | None = None
        self._first: Any = None

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
    the returned :class:`Started`, else :func:`carry` drives it on."""
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
    out._coro = coro
    out._first = first
    return out


def _wake(proxy: asyncio.Future[None], awaited: asyncio.Future[Any]) -> None:
    """Done callback of a future a carried call awaits: its awaiting task goes on
    (unless that task gave up on it: the call went on in a task of its own)."""
    if not proxy.done():
        proxy.set_result(None)


@types.coroutine
def carry(started: Started[_T], in_task: bool = False) -> Generator[Any, Any, _T]:
    """Drive a suspended :func:`start`-ed call on to its end for the awaiting task.

    Each future the call awaits is awaited through one of this function's own: a
    cancellation of the awaiting task cancels that one, and reaches the call only as
    it would reach a shielded task's (``asyncio.shield``'s promise): not at all. Any
    exception thrown in meanwhile (a cancellation, a close) hands the call over to a
    task of its own, ``started.task``, which runs the rest (from where it suspended,
    as the awaiting task would have) while the exception is raised; the caller, who
    sees it (``started.task`` set), watches that task for the call's outcome. If the
    call itself raises, ``started.task`` stays ``None``.

    The call runs in the awaiting task (its context, ``current_task()``): only for a
    call whose awaits are plain futures, none under a timeout of its own (an
    ``asyncio.timeout`` cancels the task it was entered in: the awaiting task, whose
    cancellation the call then never sees). With ``in_task`` it runs in its task
    from the start (``started.task``: the first step ran here), awaited as above.

    Per suspension this costs a future and a done callback; a shielded task cost a
    task (its registration, two steps, a done callback) and a second future."""
    coro, value = started._coro, started._first
    started._coro = started._first = None  # (no references kept)
    assert coro is not None
    loop = asyncio.get_running_loop()
    if in_task:
        task = _hand_off(started, coro, value)
        assert task is not None
        proxy = loop.create_future()
        task.add_done_callback(_partial(_wake, proxy))
        proxy._asyncio_future_blocking = True  # (as ``Future.__await__`` sets it)
        yield proxy  # (an exception thrown in is raised: ``started.task`` goes on)
        return task.result()
    me = asyncio.current_task(loop)
    asked = me.cancelling() if me is not None else 0
    while True:
        if value is None:  # a bare ``yield`` (``asyncio.sleep(0)``)
            try:
                yield None
            except BaseException:
                _hand_off(started, coro, value)
                raise
            sent = None
        elif getattr(value, "_asyncio_future_blocking", False):  # a future it awaits
            proxy = loop.create_future()
            value.add_done_callback(_partial(_wake, proxy))
            proxy._asyncio_future_blocking = True
            try:
                yield proxy
            except BaseException:
                _hand_off(started, coro, value)
                raise
            sent = None
        else:  # anything else: the task's answer (an error) goes to the call itself
            try:
                sent = yield value
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    result = stop.value
                    break
                continue
        try:
            value = coro.send(sent)
        except StopIteration as stop:
            result = stop.value
            break
    if me is not None and me.cancelling() != asked:
        # The awaiting task was cancelled during the call's last step (by that step's
        # own code): the cancellation waits for the task's next suspension, and
        # would be lost with the result if the caller ended first. It is taken here,
        # and the result handed over as a finished task's (``started.task``).
        try:
            yield None
        except BaseException:
            done: asyncio.Future[_T] = loop.create_future()
            done.set_result(result)
            started.task = done  # type: ignore[assignment]
            raise
    return result  # type: ignore[no-any-return]


def _hand_off(
    started: Started[_T], coro: Coroutine[Any, Any, _T], value: Any
) -> asyncio.Task[_T] | None:
    """The call's caller gave up on it: it goes on in a task (``started.task``) from
    where it suspended at ``value``; closed if no loop runs any more (a task destroyed
    at the loop's end)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        coro.close()
        return None
    task = started.task = loop.create_task(_rest(coro, value))
    return task


def note_handed(exc: BaseException, task: asyncio.Future[Any]) -> None:
    """Mark ``exc``, which a carried call's caller raises as it gives up on the call,
    with the task the call goes on in (``started.task``): a caller further out that
    sees ``exc`` can tell that the call was not given up (it is still being written)
    and watch that task for its outcome (:func:`handed_to`)."""
    exc.__dict__["_jobpool_handed_to"] = task


def handed_to(exc: BaseException) -> asyncio.Future[Any] | None:
    """The task that a call given up on with ``exc`` goes on in (:func:`note_handed`),
    or ``None``."""
    task: asyncio.Future[Any] | None = exc.__dict__.get("_jobpool_handed_to")
    return task
