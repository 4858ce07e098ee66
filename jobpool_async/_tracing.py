"""OpenTelemetry spans, when ``opentelemetry-api`` is importable; otherwise nothing.

Two wrappers, each applied once (at import or when a Worker is built): without
OpenTelemetry they return what they were given, so untraced code runs exactly as
written, and nothing else is imported. With it, spans go to whatever tracer
provider the application configured. With none configured (OpenTelemetry's proxy
provider, whose spans are no-ops until one is set), no span is made: a no-op span
per job run cost a Worker about 30 µs of CPU per job (a fifth of its client work in
the PostgreSQL drain benchmark, ``benchmarks/results/postgres-cpu-before.md``).
Whether one is configured is looked up per call, so a provider set later is used
from then on (by code, or named in ``OTEL_PYTHON_TRACER_PROVIDER`` in ``os.environ``).

* ``jobpool.enqueue``: one span per ``enqueue_jobs``/``enqueue_job`` call
  (attribute ``jobpool.jobs``: how many).
* ``jobpool.job``: one span per job a Worker runs, around its processor, with
  ``jobpool.job.id``, ``jobpool.job.type``, ``jobpool.job.attempt`` (1 for the
  first run), ``jobpool.assignee`` and ``jobpool.outcome`` (``completed``,
  ``failed``, ``cancelled``); a failure records the exception and an error status.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ._models import Job

__all__ = ["trace", "traced_enqueue", "traced_processor"]

try:
    from opentelemetry import trace
except ImportError:  # not installed: every wrapper below is the identity
    trace = None  # type: ignore[assignment]

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])
_NAME = "jobpool_async"


#: ``os.environ``'s own dict and the key ``OTEL_PYTHON_TRACER_PROVIDER`` has in it, when
#: they can be read (CPython's ``os._Environ``); else ``None``.
_ENVIRON: dict[Any, Any] | None = None
_PROVIDER_KEY: Any = None
if trace is not None:
    try:
        _PROVIDER_KEY = os.environ.encodekey(trace.OTEL_PYTHON_TRACER_PROVIDER)  # type: ignore[attr-defined]
        _ENVIRON = os.environ._data  # type: ignore[attr-defined]
    except AttributeError:  # not CPython's ``os._Environ``, or not this OpenTelemetry
        _ENVIRON = None
    if type(_ENVIRON) is not dict:
        _ENVIRON = None
_UNKNOWN = object()


def _configured(otel: Any) -> bool:
    """Whether the application set a tracer provider in ``otel`` (``opentelemetry.trace``);
    else every span would be a no-op.

    Exactly ``get_tracer_provider()`` is not OpenTelemetry's proxy provider, without its
    usual cost when none is set: its test ``OTEL_PYTHON_TRACER_PROVIDER in os.environ``
    raises and catches two ``KeyError`` (about 9.8k instructions, measured; a Worker asks
    once per batch). Here: no provider set yet (OpenTelemetry's global is ``None``) and
    no such variable in ``os.environ``'s own dict is the proxy provider, with no call."""
    if (
        _ENVIRON is not None
        and getattr(otel, "_TRACER_PROVIDER", _UNKNOWN) is None
        and _PROVIDER_KEY not in _ENVIRON
    ):
        return False
    return not isinstance(otel.get_tracer_provider(), otel.ProxyTracerProvider)


def traced_enqueue(method: _F) -> _F:
    """Wrap ``PoolQueue.enqueue_jobs`` in a ``jobpool.enqueue`` span."""
    if trace is None:
        return method
    otel = trace

    @functools.wraps(method)
    async def wrapper(self: Any, jobs: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        if not _configured(otel):
            return await method(self, jobs, *args, **kwargs)
        tracer = otel.get_tracer(_NAME)
        with tracer.start_as_current_span("jobpool.enqueue") as span:
            ids = await method(self, jobs, *args, **kwargs)
            span.set_attribute("jobpool.jobs", len(ids))
            return ids

    return wrapper  # type: ignore[return-value]


def traced_processor(
    processor: Callable[[Job], Awaitable[Any]], assignee_id: str
) -> Callable[[Job], Awaitable[Any]]:
    """Wrap a Worker's processor in one ``jobpool.job`` span per run."""
    if trace is None:
        return processor
    otel = trace

    async def run(job: Job) -> Any:
        if not _configured(otel):
            return await processor(job)
        tracer = otel.get_tracer(_NAME)
        attempts = getattr(job, "attempts", 0)  # the attempts field, where it exists
        attributes = {
            "jobpool.job.id": job.id,
            "jobpool.job.type": job.job_type,
            "jobpool.job.attempt": attempts or job.retry_count + 1,
            "jobpool.assignee": assignee_id,
        }
        with tracer.start_as_current_span(
            "jobpool.job",
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = await processor(job)
            except asyncio.CancelledError:
                span.set_attribute("jobpool.outcome", "cancelled")
                raise
            except BaseException as exc:
                span.set_attribute("jobpool.outcome", "failed")
                span.record_exception(exc)
                span.set_status(otel.Status(otel.StatusCode.ERROR, str(exc) or type(exc).__name__))
                raise
            span.set_attribute("jobpool.outcome", "completed")
            return result

    return run
