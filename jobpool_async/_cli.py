"""The ``jobpool`` command (also ``python -m jobpool_async``), built on click.

Every command that touches a store takes ``--url`` (or ``JOBPOOL_URL``) and
``--json`` (machine-readable output on stdout). Exit status: 0 on success, 1 when
the operation failed (one line on stderr, no traceback), 2 on bad usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, TypeVar

import anyio
import click

from ._config import Config, parse_duration
from ._errors import JobPoolError
from ._listing import MAX_LIMIT
from ._models import Job, JobStats, JobStatus, utcnow
from ._operate import active_assignees, job_json, preview, stats_json
from ._queue import PoolQueue
from .backends import open_backend

__all__ = ["main"]

T = TypeVar("T")
logger = logging.getLogger("jobpool_async.cli")

URL_HELP = "store URL (sqlite:///jobs.db, leveldb:///dir, postgresql://…); env JOBPOOL_URL"
STATUS_NAMES = [s.value for s in JobStatus]


class Failed(click.ClickException):
    """A failed operation: ``Error: <message>`` on stderr, exit status 1."""


def _url_option(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="print JSON on stdout")(f)
    return click.option("--url", envvar="JOBPOOL_URL", metavar="URL", help=URL_HELP)(f)


def _need_url(url: str | None) -> str:
    if not url:
        raise click.UsageError("no store given: pass --url URL or set JOBPOOL_URL")
    return url


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, JobPoolError) else text


def _run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``body`` on a fresh event loop; turn library and OS failures into exit 1."""
    try:
        return asyncio.run(body())
    except click.ClickException:
        raise
    except (JobPoolError, ValueError, TypeError, OSError, LookupError, TimeoutError) as exc:
        raise Failed(_one_line(exc)) from None
    except ImportError as exc:
        raise Failed(f"{exc} (is the backend's extra installed?)") from None


async def _open(url: str) -> PoolQueue:
    queue = PoolQueue(open_backend(url))
    await queue.open()
    return queue


def _with_queue(url: str | None, work: Callable[[PoolQueue], Awaitable[T]]) -> T:
    target = _need_url(url)

    async def body() -> T:
        queue = await _open(target)
        try:
            return await work(queue)
        finally:
            await queue.close()

    return _run(body)


# --- output -------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _emit_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _short(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _stats_text(stats: JobStats) -> str:
    rows = [[s.value, str(stats.by_status.get(s, 0))] for s in JobStatus]
    rows.append(["total", str(stats.total_jobs)])
    head = f"tags: {', '.join(stats.tags)}\n" if stats.tags else ""
    return head + _table(["status", "jobs"], rows)


# --- the command group ---------------------------------------------------------------


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Example: JOBPOOL_URL=sqlite:///jobs.db jobpool stats",
)
@click.version_option(package_name="jobpool_async")
def cli() -> None:
    """Operate a jobpool_async store: run workers, look at jobs, steer them.

    Exit status: 0 on success, 1 if the operation failed (one line on stderr),
    2 on bad usage.
    """


@cli.command()
@click.argument("processor", metavar="MODULE:FUNC")
@click.option("--concurrency", "-c", type=click.IntRange(1), default=None, help="jobs at once")
@click.option("--tags", "tags", multiple=True, help="take only jobs with these tags (repeat)")
@click.option("--assignee", default=None, help="assignee id (default: host-pid)")
@click.option("--grace", type=click.FloatRange(0), default=10.0, show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option("--url", envvar="JOBPOOL_URL", metavar="URL", help=URL_HELP)
def worker(
    processor: str,
    concurrency: int | None,
    tags: tuple[str, ...],
    assignee: str | None,
    grace: float,
    log_level: str,
    url: str | None,
) -> None:
    """Run a Worker calling MODULE:FUNC (``async def f(job) -> bytes``) for each job.

    SIGINT or SIGTERM stops it gracefully (running jobs get --grace seconds to
    finish); a second signal stops it at once (running jobs go back to
    FAILED_RETRY). Logs to stderr.

    Example: jobpool worker app.tasks:process --concurrency 20 --tags gpu
    """
    target = _need_url(url)
    func = _load_processor(processor)
    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    name = assignee or f"{os.uname().nodename}-{os.getpid()}"
    config = Config.from_env()
    if concurrency is not None:
        config = dataclasses.replace(config, concurrency=concurrency)

    async def body() -> None:
        from ._worker import Worker

        queue = await _open(target)
        try:
            w = Worker(queue, func, assignee_id=name, config=config, tags=list(tags), grace=grace)
            task = asyncio.ensure_future(w.run())
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                stopping: list[asyncio.Future[None]] = []

                async def on_signals() -> None:
                    async for signum in signals:
                        sig = signal.Signals(signum).name
                        if not stopping:
                            logger.info("%s: stopping (grace %gs; again to stop now)", sig, grace)
                            stopping.append(asyncio.ensure_future(w.stop()))
                        else:
                            logger.warning("%s: stopping now", sig)
                            _hurry(w)

                watcher = asyncio.ensure_future(on_signals())
                logger.info(
                    "worker %s on %s: %s, %d at once, tags %s",
                    name,
                    _redact(target),
                    processor,
                    config.concurrency,
                    list(tags) or "any",
                )
                try:
                    await task
                except asyncio.CancelledError:
                    if not task.cancelled():
                        raise
                finally:
                    watcher.cancel()
            logger.info("worker %s stopped", name)
        finally:
            await queue.close()

    _run(body)


def _hurry(w: Any) -> None:
    """End a Worker's grace period now: cancel its running processors the way its
    shutdown does when the grace period ends (their jobs go back to FAILED_RETRY)."""
    w._end_grace()


def _worker_json(row: dict[str, Any]) -> dict[str, Any]:
    lease = row["lease"]
    if lease is not None:
        lease = {k: _iso(v) if isinstance(v, datetime) else v for k, v in lease.items()}
    return {**row, "since": _iso(row["since"]), "lease": lease}


def _redact(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return url


def _load_processor(spec: str) -> Callable[[Job], Awaitable[bytes | None]]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(
            f"{spec!r} is not MODULE:FUNC (e.g. app.tasks:process)", param_hint="MODULE:FUNC"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failing as it loads
        raise Failed(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise Failed(f"module {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise Failed(f"{spec} is not callable")
    return obj  # type: ignore[no-any-return]


@cli.command()
@click.option("--tags", "tags", multiple=True, help="count only jobs with all these tags")
@click.option(
    "--watch",
    type=click.FloatRange(0.2),
    default=None,
    metavar="SECONDS",
    help="refresh every SECONDS until Ctrl-C",
)
@_url_option
def stats(tags: tuple[str, ...], watch: float | None, url: str | None, as_json: bool) -> None:
    """Job counts by status.

    Example: jobpool stats --url sqlite:///jobs.db --watch 2
    """

    async def work(queue: PoolQueue) -> None:
        while True:
            s = await queue.get_job_stats(list(tags) or None)
            if as_json:
                click.echo(json.dumps(stats_json(s), ensure_ascii=False))
            else:
                if watch is not None:
                    click.clear()
                    click.echo(f"{utcnow():%H:%M:%S} UTC, every {watch:g} s (Ctrl-C to end)")
                click.echo(_stats_text(s))
            if watch is None:
                return
            await asyncio.sleep(watch)

    with contextlib.suppress(KeyboardInterrupt):
        _with_queue(url, work)


@cli.command()
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUS_NAMES),
    help="any of these statuses (repeat)",
)
@click.option("--tag", "tags", multiple=True, help="all of these tags (repeat)")
@click.option("--type", "job_type", default=None, help="this job type")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=50, show_default=True)
@click.option("--after", default=None, metavar="CURSOR", help="next_after of the previous page")
@_url_option
def jobs(
    statuses: tuple[str, ...],
    tags: tuple[str, ...],
    job_type: str | None,
    limit: int,
    after: str | None,
    url: str | None,
    as_json: bool,
) -> None:
    """List jobs, newest first (a page; --after for the next).

    Example: jobpool jobs --status failed_retry --tag gpu --limit 20
    """

    async def work(queue: PoolQueue) -> None:
        page = await queue.list_jobs(
            statuses=[JobStatus(s) for s in statuses] or None,
            tags=list(tags) or None,
            job_type=job_type,
            limit=limit,
            after=after,
        )
        if as_json:
            _emit_json({"jobs": [job_json(j) for j in page.jobs], "next_after": page.next_after})
            return
        rows = [
            [
                j.id,
                j.job_type,
                j.status.value,
                ",".join(j.tags),
                _short(j.created_at),
                str(j.retry_count),
                j.assignee_id,
            ]
            for j in page.jobs
        ]
        click.echo(_table(["id", "type", "status", "tags", "created", "retries", "assignee"], rows))
        if page.next_after:
            click.echo(f"next page: --after {page.next_after}", err=True)

    _with_queue(url, work)


@cli.command()
@click.argument("job_id")
@_url_option
def show(job_id: str, url: str | None, as_json: bool) -> None:
    """Every field of one job, with a preview of its payload and result.

    Example: jobpool show 7f3c2a --json
    """

    async def work(queue: PoolQueue) -> None:
        job = await queue.get_job(job_id)
        if as_json:
            _emit_json(job_json(job, full=True))
            return
        for key, value in job_json(job).items():
            click.echo(f"{key:>16}: {value}")
        for name, data in (("job_definition", job.job_definition), ("result", job.result)):
            if data is not None:
                kind, text = preview(data)
                click.echo(f"--- {name} ({len(data)} bytes, {kind})")
                if text:
                    click.echo(text)

    _with_queue(url, work)


@cli.command()
@click.option("--type", "job_type", required=True, help="job type")
@click.option("--id", "job_id", default=None, help="job id (default: a random one)")
@click.option("--tag", "tags", multiple=True, help="a tag (repeat)")
@click.option("--payload", default=None, help="payload text (UTF-8)")
@click.option(
    "--payload-file", type=click.File("rb"), default=None, help="payload from a file ('-': stdin)"
)
@_url_option
def enqueue(
    job_type: str,
    job_id: str | None,
    tags: tuple[str, ...],
    payload: str | None,
    payload_file: Any,
    url: str | None,
    as_json: bool,
) -> None:
    """Enqueue one job; prints its id.

    Example: jobpool enqueue --type resize --tag gpu --payload '{"w": 640}'
    """
    if payload is not None and payload_file is not None:
        raise click.UsageError("give --payload or --payload-file, not both")
    data = payload.encode() if payload is not None else payload_file.read() if payload_file else b""
    job = Job(
        id=job_id or uuid.uuid4().hex, job_type=job_type, job_definition=data, tags=list(tags)
    )

    async def work(queue: PoolQueue) -> None:
        await queue.enqueue_job(job)
        click.echo(json.dumps({"id": job.id}) if as_json else job.id)

    _with_queue(url, work)


def _selection(
    ids: tuple[str, ...], tags: tuple[str, ...]
) -> tuple[list[str] | None, list[str] | None]:
    if not ids and not tags:
        raise click.UsageError("give job ids and/or --tag")
    return list(tags) or None, list(ids) or None


@cli.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--tag", "tags", multiple=True, help="jobs with all these tags (repeat)")
@_url_option
def cancel(ids: tuple[str, ...], tags: tuple[str, ...], url: str | None, as_json: bool) -> None:
    """Cancel jobs by id and/or by tags.

    Example: jobpool cancel 7f3c2a 9b1d04   or   jobpool cancel --tag batch:42
    """
    by_tags, by_ids = _selection(ids, tags)

    async def work(queue: PoolQueue) -> None:
        res = await queue.cancel_jobs(tags=by_tags, job_ids=by_ids)
        if as_json:
            _emit_json({"cancelled": res.cancelled, "unknown": res.unknown})
        else:
            click.echo(f"cancelled {len(res.cancelled)}, unknown or final {len(res.unknown)}")
            for job_id in res.unknown:
                click.echo(f"not cancelled (missing or final): {job_id}", err=True)

    _with_queue(url, work)


@cli.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--tag", "tags", multiple=True, help="jobs with all these tags (repeat)")
@click.option(
    "--in",
    "delay",
    default=None,
    metavar="DURATION",
    help="due after this long (e.g. 10m, 2h) instead of at once",
)
@_url_option
def requeue(
    ids: tuple[str, ...],
    tags: tuple[str, ...],
    delay: str | None,
    url: str | None,
    as_json: bool,
) -> None:
    """Run DISCARDED, STOPPED or UNKNOWN_STOPPED jobs again (they go to FAILED_RETRY).

    Example: jobpool requeue 7f3c2a --in 10m   or   jobpool requeue --tag batch:42
    """
    by_tags, by_ids = _selection(ids, tags)
    try:
        wait = parse_duration(delay) if delay is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--in") from None

    async def work(queue: PoolQueue) -> None:
        when = utcnow() + wait if wait is not None else None
        moved = await queue.requeue_jobs(tags=by_tags, job_ids=by_ids, scheduled_at=when)
        rest = [i for i in by_ids or [] if i not in set(moved)]
        if as_json:
            _emit_json({"requeued": moved, "not_requeued": rest})
            return
        click.echo(f"requeued {len(moved)}")
        for job_id in rest:
            click.echo(f"not requeued (missing, or not discarded/stopped): {job_id}", err=True)

    _with_queue(url, work)


@cli.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--tag", "tags", multiple=True, help="jobs with all these tags (repeat)")
@_url_option
def delete(ids: tuple[str, ...], tags: tuple[str, ...], url: str | None, as_json: bool) -> None:
    """Delete final jobs by id and/or tags (all or nothing: none if one is not final).

    Example: jobpool delete --tag batch:42
    """
    by_tags, by_ids = _selection(ids, tags)

    async def work(queue: PoolQueue) -> None:
        n = await queue.delete_jobs(tags=by_tags, job_ids=by_ids)
        click.echo(json.dumps({"deleted": n}) if as_json else f"deleted {n}")

    _with_queue(url, work)


@cli.command()
@click.option(
    "--ttl",
    default=None,
    metavar="DURATION",
    help="age of COMPLETED jobs to delete, e.g. 30d, 12h (default: JOBPOOL_TTL or 30d)",
)
@_url_option
def cleanup(ttl: str | None, url: str | None, as_json: bool) -> None:
    """Delete COMPLETED jobs finished longer than --ttl ago.

    Example: jobpool cleanup --ttl 7d
    """
    try:
        age = parse_duration(ttl) if ttl is not None else Config.from_env().ttl
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None

    async def work(queue: PoolQueue) -> None:
        n = await queue.cleanup_expired_jobs(age)
        click.echo(json.dumps({"deleted": n}) if as_json else f"deleted {n}")

    _with_queue(url, work)


@cli.command()
@_url_option
def workers(url: str | None, as_json: bool) -> None:
    """Workers: assignees holding RUNNING/CANCELLING jobs now, and their leases.

    Example: jobpool workers --json
    """

    async def work(queue: PoolQueue) -> None:
        rows = await active_assignees(queue)
        if as_json:
            _emit_json([_worker_json(r) for r in rows])
            return
        table = []
        for r in rows:
            lease = r["lease"]
            state = "-" if lease is None else "live" if lease["live"] else "expired"
            table.append(
                [
                    r["assignee_id"],
                    str(r["running"]),
                    str(r["cancelling"]),
                    _short(r["since"]),
                    state,
                    "-" if lease is None else _short(lease["expires_at"]),
                    "-" if lease is None else str(len(lease["holders"])),
                ]
            )
        headers = ["assignee", "running", "cancelling", "held since", "lease", "expires", "holders"]
        click.echo(_table(headers, table))

    _with_queue(url, work)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--read-only", is_flag=True, help="no actions (cancel, requeue, delete)")
@click.option(
    "--auth",
    envvar="JOBPOOL_DASHBOARD_AUTH",
    default=None,
    metavar="USER:PASS",
    help="require HTTP basic auth (env JOBPOOL_DASHBOARD_AUTH)",
)
@click.option(
    "--token",
    envvar="JOBPOOL_DASHBOARD_TOKEN",
    default=None,
    help="require 'Authorization: Bearer TOKEN' (env JOBPOOL_DASHBOARD_TOKEN)",
)
@click.option("--url", envvar="JOBPOOL_URL", metavar="URL", help=URL_HELP)
def dashboard(
    host: str, port: int, read_only: bool, auth: str | None, token: str | None, url: str | None
) -> None:
    """Serve the web dashboard (needs the 'web' extra).

    Example: jobpool dashboard --url postgresql://localhost/app --port 8000 --read-only
    """
    target = _need_url(url)
    if auth is not None and ":" not in auth:
        raise click.BadParameter("use USER:PASS", param_hint="--auth")
    try:
        import uvicorn

        from .web import create_app
    except ImportError as exc:
        raise Failed(f"{exc}: pip install 'jobpool_async[web]'") from None

    queue = PoolQueue(open_backend(target))
    app = create_app(queue, read_only=read_only, basic_auth=auth, token=token, own_queue=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    except (JobPoolError, OSError) as exc:
        raise Failed(_one_line(exc)) from None


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def demo(args: tuple[str, ...]) -> None:
    """Run a few thousand jobs through Workers on a SQLite file (--help for options).

    Example: jobpool demo --jobs 2000 --workers 4
    """
    from ._demo import main as demo_main

    code = demo_main(list(args))
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: returns the exit status."""
    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="jobpool", standalone_mode=True
        )
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
