"""Runs the workloads, floors and peers in one process and collects :class:`Row` records.

Order matters on a shared, noisy machine: each figure is measured right after
the floor it is compared with, on the same backend, in the same run.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ._common import Row, Sizes, machine_info, percentile, rate
from ._targets import Store, Target, find_targets
from .floors import FLOOR_FOR, Floor, make_floor
from .peers import PEERS, PeerResult, run_peer
from .workloads import (
    Outcome,
    bulk_enqueue,
    end_to_end_stream,
    end_to_end_worker,
    fan_out,
    memory_profile,
    scale,
    wake_latency,
    worker_available,
)

__all__ = ["WORKLOADS", "Options", "run"]

logger = logging.getLogger("benchmarks")

WORKLOADS = ("bulk", "e2e", "worker", "fanout", "wake", "scale", "memory", "peers")

T = TypeVar("T")


@dataclass(slots=True)
class Options:
    sizes: Sizes
    backends: list[str]
    postgres_dsn: str | None = None
    redis_url: str | None = None
    workloads: tuple[str, ...] = WORKLOADS
    peers: tuple[str, ...] = tuple(PEERS)
    workdir: Path | None = None
    progress: Callable[[str], None] = field(default=lambda msg: None)


@dataclass(slots=True)
class Report:
    machine: dict[str, Any]
    sizes: dict[str, Any]
    command: str
    rows: list[Row]
    unavailable: dict[str, str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "sizes": self.sizes,
            "command": self.command,
            "seconds": self.seconds,
            "unavailable": self.unavailable,
            "rows": [r.to_json() for r in self.rows],
        }


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 300 else text[:297] + "..."


class _Run:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.s = options.sizes
        self.workdir = workdir
        self.rows: list[Row] = []
        self.unavailable: dict[str, str] = {}
        self._hold: list[Row] | None = None

    def say(self, msg: str) -> None:
        self.o.progress(msg)

    def add(self, row: Row) -> Row:
        if self._hold is not None:  # repeated rounds: the best is added later
            self._hold.append(row)
            return row
        self.rows.append(row)
        rate_txt = f"{row.jobs_per_s:,.0f} jobs/s" if row.jobs_per_s is not None else ""
        extra = " ".join(f"{k}={v:.3g}" for k, v in row.metrics.items() if k.endswith("_ms"))
        ratio = f"ratio={row.ratio:.2f}" if row.ratio is not None else ""
        status = "" if row.ok else f"FAILED: {row.note}"
        self.say(f"  {row.workload:<10} {row.system:<32} {rate_txt:>16} {extra} {ratio} {status}")
        return row

    async def with_store(self, target: Target, body: Callable[[Store], Awaitable[T]]) -> T:
        store = target.new_store(self.workdir)
        try:
            return await asyncio.wait_for(body(store), self.s.timeout)
        finally:
            try:
                await store.backend.close()
            except Exception:
                logger.debug("closing %s failed", target.name, exc_info=True)
            await store.cleanup()

    async def with_floor(
        self, backend: str, body: Callable[[Floor], Awaitable[T]], name: str = ""
    ) -> T:
        floor = make_floor(name or FLOOR_FOR[backend], self.workdir, self.o.postgres_dsn)
        await floor.open()
        try:
            return await asyncio.wait_for(body(floor), self.s.timeout)
        finally:
            await floor.close()

    def failed(
        self,
        workload: str,
        system: str,
        kind: str,
        backend: str,
        params: dict[str, Any],
        exc: BaseException,
    ) -> Row:
        logger.debug("%s %s failed", workload, system, exc_info=exc)
        return self.add(
            Row(workload, system, kind, backend, params, ok=False, note=_error_text(exc))
        )

    def ours(
        self,
        workload: str,
        backend: str,
        params: dict[str, Any],
        out: Outcome,
        floor: Row | None,
        system: str = "",
        throughput: bool = True,
    ) -> Row:
        row = Row(
            workload,
            system or f"jobpool_async[{backend}]",
            "ours",
            backend,
            params,
            jobs=out.jobs,
            seconds=out.seconds,
            jobs_per_s=rate(out.jobs, out.seconds) if throughput else None,
            metrics=dict(out.metrics),
            ok=not out.problem,
            note=out.problem,
        )
        if floor is not None and floor.ok and floor.jobs_per_s and row.jobs_per_s is not None:
            row.baseline = floor.system if floor.kind != "ours" else "the empty store"
            row.ratio = row.jobs_per_s / floor.jobs_per_s
        return self.add(row)

    def _keep_best(self, backend: str) -> None:
        """Add the best round of each held system (a failed round wins: it must show),
        with ratios recomputed against the best round of the floor."""
        held, self._hold = self._hold or [], None
        by_system: dict[str, list[Row]] = {}
        for row in held:
            by_system.setdefault(row.system, []).append(row)
        best: list[Row] = []
        for rows in by_system.values():
            failed = [r for r in rows if not r.ok]
            pick = failed[0] if failed else max(rows, key=lambda r: r.jobs_per_s or 0.0)
            if len(rows) > 1:
                pick.metrics["rounds"] = float(len(rows))
            best.append(pick)
        floor = next(
            (r for r in best if r.kind == "floor" and r.system == FLOOR_FOR[backend]), None
        )
        for row in best:
            if row.kind == "ours":
                row.baseline = row.ratio = None
                if floor is not None and floor.ok and floor.jobs_per_s and row.jobs_per_s:
                    row.baseline = floor.system
                    row.ratio = row.jobs_per_s / floor.jobs_per_s
            self.add(row)

    # --- floors ---------------------------------------------------------------------------

    async def floor_e2e(
        self, backend: str, n: int, batch: int, workload: str, name: str = ""
    ) -> Row | None:
        system = name or FLOOR_FOR[backend]
        params = {"jobs": n, "batch": batch}
        try:
            seconds, claimed = await self.with_floor(
                backend, lambda f: f.e2e(n, batch, self.s.enqueue_batch), name
            )
        except Exception as exc:
            return self.failed(workload, system, "floor", backend, params, exc)
        dups = len(claimed) - len(set(claimed))
        problem = f"{dups} duplicate claims" if dups else ""
        if len(set(claimed)) != n:
            problem = f"claimed {len(set(claimed))} distinct of {n} jobs"
        return self.add(
            Row(
                workload,
                system,
                "floor",
                backend,
                params,
                n,
                seconds,
                rate(n, seconds),
                ok=not problem,
                note=problem,
            )
        )

    # --- per backend ------------------------------------------------------------------------

    async def backend(self, target: Target) -> None:
        name = target.name
        w = self.o.workloads
        s = self.s
        self.say(f"backend {name}")
        if "bulk" in w:
            params = {"jobs": s.bulk_jobs, "batch": s.bulk_batch}
            floor_row: Row | None
            try:
                secs = await self.with_floor(name, lambda f: f.bulk(s.bulk_jobs, s.bulk_batch))
                floor_row = self.add(
                    Row(
                        "bulk",
                        FLOOR_FOR[name],
                        "floor",
                        name,
                        params,
                        s.bulk_jobs,
                        secs,
                        rate(s.bulk_jobs, secs),
                    )
                )
            except Exception as exc:
                floor_row = self.failed("bulk", FLOOR_FOR[name], "floor", name, params, exc)
            try:
                out = await self.with_store(
                    target, lambda st: bulk_enqueue(st.backend, s.bulk_jobs, s.bulk_batch)
                )
                self.ours("bulk", name, params, out, floor_row)
            except Exception as exc:
                self.failed("bulk", f"jobpool_async[{name}]", "ours", name, params, exc)

        if "e2e" in w or "worker" in w:
            for slots in s.e2e_slots:
                params = {"jobs": s.e2e_jobs, "slots": slots}
                self._hold = []
                for _ in range(s.e2e_rounds):
                    floor_row = await self.floor_e2e(name, s.e2e_jobs, slots, "e2e")
                    if name == "sqlite":
                        await self.floor_e2e(name, s.e2e_jobs, slots, "e2e", "raw aiosqlite")
                    if "e2e" in w:
                        try:
                            out = await self.with_store(
                                target,
                                partial(_e2e, end_to_end_stream, s, slots),
                            )
                            self.ours("e2e", name, params, out, floor_row)
                        except Exception as exc:
                            self.failed("e2e", f"jobpool_async[{name}]", "ours", name, params, exc)
                    if "worker" in w:
                        system = f"jobpool_async[{name}] Worker"
                        ok, why = worker_available()
                        if not ok:
                            self.unavailable[system] = why
                            continue
                        try:
                            out = await self.with_store(
                                target,
                                partial(_e2e, end_to_end_worker, s, slots),
                            )
                            self.ours("e2e", name, params, out, floor_row, system)
                        except Exception as exc:
                            self.failed("e2e", system, "ours", name, params, exc)
                self._keep_best(name)

        if "fanout" in w:
            params = {
                "jobs": s.fanout_jobs,
                "streams": s.fanout_streams,
                "slots": s.fanout_slots,
                "tags": s.fanout_tags,
            }
            floor_row = await self.floor_e2e(name, s.fanout_jobs, s.fanout_slots, "fanout")
            try:
                out = await self.with_store(
                    target,
                    lambda st: fan_out(
                        st.backend,
                        s.fanout_jobs,
                        s.fanout_streams,
                        s.fanout_slots,
                        s.fanout_tags,
                        s.enqueue_batch,
                        s.timeout,
                    ),
                )
                self.ours("fanout", name, params, out, floor_row)
            except Exception as exc:
                self.failed("fanout", f"jobpool_async[{name}]", "ours", name, params, exc)

        if "wake" in w:
            params = {"samples": s.wake_samples}
            floor_p50: float | None = None
            try:
                lat = await self.with_floor(name, lambda f: f.wake(s.wake_samples))
                floor_p50 = percentile(lat, 0.5) * 1000
                self.add(
                    Row(
                        "wake",
                        FLOOR_FOR[name],
                        "floor",
                        name,
                        params,
                        len(lat),
                        sum(lat),
                        None,
                        {"p50_ms": floor_p50, "p99_ms": percentile(lat, 0.99) * 1000},
                        note="one claim of a just-inserted job, no waking",
                    )
                )
            except Exception as exc:
                self.failed("wake", FLOOR_FOR[name], "floor", name, params, exc)
            row = None
            try:
                out = await self.with_store(
                    target, lambda st: wake_latency(st.backend, s.wake_samples, s.timeout)
                )
                p50 = out.metrics.get("p50_ms", 0.0)
                row = Row(
                    "wake",
                    f"jobpool_async[{name}]",
                    "ours",
                    name,
                    params,
                    out.jobs,
                    out.seconds,
                    None,
                    dict(out.metrics),
                    ok=not out.problem,
                    note=out.problem,
                )
                if floor_p50 is not None and p50 > 0:
                    row.baseline = FLOOR_FOR[name]
                    row.ratio = floor_p50 / p50
                self.add(row)
            except Exception as exc:
                self.failed("wake", f"jobpool_async[{name}]", "ours", name, params, exc)
            if name == "postgres":
                await self.wake_from_another_queue(target, params, row)

        if "scale" in w:
            try:
                levels = await self.with_store(
                    target,
                    lambda st: scale(
                        st.backend,
                        s.scale_levels,
                        s.scale_jobs,
                        s.scale_rounds,
                        s.scale_slots,
                        s.stats_calls,
                        s.enqueue_batch,
                        s.timeout,
                    ),
                )
                base: Row | None = None
                for level, out in levels:
                    params = {
                        "completed_in_store": level,
                        "jobs": s.scale_jobs,
                        "slots": s.scale_slots,
                    }
                    row = self.ours("scale", name, params, out, base)
                    if base is None:
                        base = row
            except Exception as exc:
                self.failed("scale", f"jobpool_async[{name}]", "ours", name, {}, exc)

        if "memory" in w:
            params = {"jobs": s.memory_jobs, "batch": s.memory_batch}
            try:
                out = await self.with_store(
                    target,
                    lambda st: memory_profile(
                        target, st.location, s.memory_jobs, s.memory_batch, 100, s.timeout
                    ),
                )
                row = Row(
                    "memory",
                    f"jobpool_async[{name}]",
                    "ours",
                    name,
                    params,
                    out.jobs,
                    out.seconds,
                    rate(out.jobs, out.seconds),
                    dict(out.metrics),
                    "RSS after the first tenth",
                    out.metrics.get("end_over_warm"),
                    ok=not out.problem,
                    note=out.problem,
                )
                row.metrics["samples"] = float(len(out.series))
                self.add(row)
                self.memory_series[name] = out.series
            except Exception as exc:
                self.failed("memory", f"jobpool_async[{name}]", "ours", name, params, exc)

    memory_series: dict[str, list[dict[str, float]]]

    async def wake_from_another_queue(
        self, target: Target, params: dict[str, Any], same_queue: Row | None
    ) -> None:
        """Wake latency across processes: enqueued through a second backend on the
        same store (its own connections and listener), the consumer's queue polling
        only every 30 s, so the wake-up is the pushed notification. Compared with
        ``same_queue``, the wake within one queue measured just before."""
        s = self.s
        system = f"jobpool_async[{target.name}] from another queue (NOTIFY, polls every 30 s)"

        async def body(st: Store) -> Outcome:
            assert st.twin is not None
            return await wake_latency(st.backend, s.wake_samples, s.timeout, st.twin())

        try:
            out = await self.with_store(target, body)
        except Exception as exc:
            self.failed("wake", system, "ours", target.name, params, exc)
            return
        row = self.ours("wake", target.name, params, out, None, system, throughput=False)
        p50, base = out.metrics.get("p50_ms", 0.0), same_queue and same_queue.metrics.get("p50_ms")
        if same_queue is not None and same_queue.ok and base and p50 > 0:
            row.baseline, row.ratio = same_queue.system, base / p50

    # --- peers ----------------------------------------------------------------------------

    async def peers(self, targets: dict[str, Target]) -> None:
        s = self.s
        n, conc = s.peer_jobs, s.peer_concurrency
        self.say(f"peers: {n} jobs, concurrency {conc}")
        params = {"jobs": n, "concurrency": conc}
        for name in ("sqlite", "postgres", "memory"):
            target = targets.get(name)
            if target is None or not target.available:
                continue
            try:
                out = await self.with_store(
                    target,
                    lambda st: end_to_end_stream(st.backend, n, conc, s.enqueue_batch, s.timeout),
                )
                self.ours("peers", name, params, out, None)
            except Exception as exc:
                self.failed("peers", f"jobpool_async[{name}]", "ours", name, params, exc)
            if worker_available()[0] and "worker" in self.o.workloads:
                system = f"jobpool_async[{name}] Worker"
                try:
                    out = await self.with_store(
                        target,
                        lambda st: end_to_end_worker(
                            st.backend, n, conc, s.enqueue_batch, s.timeout
                        ),
                    )
                    self.ours("peers", name, params, out, None, system)
                except Exception as exc:
                    self.failed("peers", system, "ours", name, params, exc)
        for peer in self.o.peers:
            await self._peer(peer, targets.get(PEERS[peer].compare_with), params)

    async def _paired_ours(
        self, target: Target | None, workload: Any, slots: int, system: str, peer: str
    ) -> float | None:
        """Our rate on the peer workload (``end_to_end_stream`` or ``end_to_end_worker``)
        with ``slots`` slots, run right before the peer; None if it could not run or
        failed its check, which then shows as a FAILED row of ``system``."""
        s = self.s
        if target is None or not target.available:
            return None
        params = {"jobs": s.peer_jobs, "slots": slots, "paired_with": peer}
        try:
            out = await self.with_store(
                target,
                lambda st: workload(st.backend, s.peer_jobs, slots, s.enqueue_batch, s.timeout),
            )
        except Exception as exc:
            self.failed("peers", system, "ours", target.name, params, exc)
            return None
        if out.problem:
            self.ours("peers", target.name, params, out, None, system)
            return None
        return rate(out.jobs, out.seconds)

    async def _peer(self, peer: str, target: Target | None, params: dict[str, Any]) -> None:
        """``peer_rounds`` runs of the peer, each right after one of ours on the same
        storage (the machine drifts by 2x within minutes); the median of the pairs."""
        s = self.s
        n, conc = s.peer_jobs, s.peer_concurrency
        spec = PEERS[peer]
        seconds: list[float] = []
        ratios: list[float] = []
        mine: list[float] = []
        worker_ratios: list[float] = []
        mine_worker: list[float] = []
        result: PeerResult | None = None
        with_worker = worker_available()[0] and "worker" in self.o.workloads
        slots = conc * spec.in_flight  # as many jobs in flight as the peer holds
        ours = f"jobpool_async[{spec.compare_with}]"
        for _ in range(s.peer_rounds):
            ours_rate = await self._paired_ours(
                target, end_to_end_stream, slots, f"{ours} paired", spec.label
            )
            worker_rate = (
                await self._paired_ours(
                    target, end_to_end_worker, slots, f"{ours} Worker paired", spec.label
                )
                if with_worker
                else None
            )
            result = await run_peer(
                peer, n, conc, self.workdir, self.o.postgres_dsn, self.o.redis_url, s.timeout
            )
            if not result.ok:
                break
            seconds.append(result.seconds)
            peer_rate = rate(n, result.seconds)
            if ours_rate is not None:
                mine.append(ours_rate)
                ratios.append(ours_rate / peer_rate)
            if worker_rate is not None:
                mine_worker.append(worker_rate)
                worker_ratios.append(worker_rate / peer_rate)
            if sum(seconds) > _SLOW_PEER_SECONDS:  # far behind anyway: one pair will do
                break
        assert result is not None
        ok = result.ok
        median_s = statistics.median(seconds) if seconds else result.seconds
        metrics = dict(result.metrics)
        # Pairs actually run (both sides passed their checks): the medians' sample size.
        metrics["pairs"] = float(len(ratios))
        if with_worker:
            metrics["worker_pairs"] = float(len(worker_ratios))
        if mine:
            metrics["ours_paired"] = statistics.median(mine)
        if mine_worker:
            metrics["worker_paired"] = statistics.median(mine_worker)
            metrics["worker_ratio"] = statistics.median(worker_ratios)
        row = Row(
            "peers",
            spec.label,
            "peer",
            spec.storage,
            params | spec.params,
            n,
            median_s,
            rate(n, median_s) if ok else None,
            metrics=metrics,
            ok=ok,
            note=result.note,
        )
        if ok and ratios:
            row.baseline = ours
            row.ratio = statistics.median(ratios)
        if not ok and result.unavailable:
            self.unavailable[spec.label] = result.note
        self.add(row)


#: A peer whose runs have taken this long in all is not run again (see ``_peer``).
_SLOW_PEER_SECONDS = 60.0


async def run(options: Options, command: str = "python -m benchmarks") -> Report:
    """Run everything ``options`` asks for; never raises for one failed workload."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jpbench-", dir=options.workdir) as tmp:
        r = _Run(options, Path(tmp))
        r.memory_series = {}
        targets = find_targets(options.backends, options.postgres_dsn)
        for target in targets:
            if not target.available:
                r.unavailable[f"jobpool_async[{target.name}]"] = target.reason
                options.progress(f"backend {target.name}: unavailable ({target.reason})")
                continue
            try:
                await r.backend(target)
            except Exception:  # a harness bug must not hide the other backends' figures
                options.progress(traceback.format_exc())
        if "peers" in options.workloads and options.peers:
            await r.peers({t.name: t for t in targets})
    machine = machine_info()
    machine["memory_series"] = r.memory_series
    return Report(
        machine=machine,
        sizes=_sizes_json(options.sizes),
        command=command,
        rows=r.rows,
        unavailable=r.unavailable,
        seconds=time.perf_counter() - t0,
    )


async def _e2e(
    fn: Callable[[Any, int, int, int, float], Awaitable[Outcome]],
    s: Sizes,
    slots: int,
    store: Store,
) -> Outcome:
    return await fn(store.backend, s.e2e_jobs, slots, s.enqueue_batch, s.timeout)


def _sizes_json(sizes: Sizes) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(sizes)
