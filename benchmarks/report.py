"""Writes a run's results: JSON (everything), Markdown (the tables) and a PNG chart."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._common import Row
from .runner import Report

__all__ = ["markdown", "write"]

_TITLES = {
    "bulk": "Bulk enqueue",
    "e2e": "End to end (enqueue, one stream, no-op, batched completion)",
    "fanout": "Fan-out (many streams, tag filters)",
    "wake": "Wake latency (enqueue_job returned → consumer has the job)",
    "scale": "Scale (completed jobs already in the store)",
    "memory": "Memory (RSS while jobs stream through)",
    "peers": "Peers (same workload, same run)",
}


_COLORS = {"memory": "C0", "sqlite": "C1", "leveldb": "C2", "postgres": "C3"}


def _count(x: int) -> str:
    if x >= 1_000_000 and x % 1_000_000 == 0:
        return f"{x // 1_000_000}M"
    if x >= 1000 and x % 1000 == 0:
        return f"{x // 1000}k"
    return str(x)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}"


def _params(row: Row) -> str:
    skip = {"jobs"} if row.workload != "memory" else set()
    return ", ".join(
        f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}"
        for k, v in row.params.items()
        if k not in skip
    )


def _ratio(row: Row) -> str:
    if row.ratio is None or row.baseline is None:
        return ""
    if row.kind == "peer":
        return f"{row.baseline} is {row.ratio:.1f}x faster"
    if row.workload == "wake":
        return f"{row.ratio:.0%} of {row.baseline} speed (p50)"
    if row.workload == "memory":
        return f"end RSS = {row.ratio:.2f} x {row.baseline}"
    return f"{row.ratio:.0%} of {row.baseline}"


def _metrics(row: Row) -> str:
    keys = {
        "wake": ("p50_ms", "p99_ms"),
        "scale": ("stats_ms", "stats_tagged_ms"),
        "memory": ("rss_warm_mb", "rss_end_mb", "peak_mb"),
        "e2e": ("mean_batch",),
        "peers": ("enqueue_s", "ours_paired", "worker_paired", "worker_ratio", "pairs"),
    }.get(row.workload, ())
    parts = []
    for k in keys:
        if k in row.metrics:
            value = row.metrics[k]
            parts.append(f"{k}={value:,.0f}" if abs(value) >= 1000 else f"{k}={value:.3g}")
    return " ".join(parts)


def _table(rows: Iterable[Row]) -> list[str]:
    out = [
        "| system | backend | params | jobs | jobs/s | other | vs baseline | check |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for r in rows:
        check = "ok" if r.ok else f"**FAILED**: {r.note}"
        if r.ok and r.note:
            check = f"ok ({r.note})"
        out.append(
            f"| {r.system} | {r.backend} | {_params(r)} | {_num(r.jobs)} | "
            f"{_num(r.jobs_per_s)} | {_metrics(r)} | {_ratio(r)} | {check} |"
        )
    return out


def markdown(report: Report) -> str:
    m = report.machine
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    lines = [
        "# jobpool_async benchmark results",
        "",
        f"Command: `{report.command}` ({report.sizes['label']} sizes), "
        f"{report.seconds / 60:.1f} min, {m['time_utc']}.",
        "",
        f"Machine: {m['cpu_count']} cores ({m['processor']}), {m['platform']}, "
        f"Python {m['python']}, SQLite {m['sqlite_library']}. Libraries: {libs}.",
        "",
        "Ratios compare figures measured in the same run, one right after the other: "
        "ours against the raw storage floor (the minimal insert/claim/complete loop on "
        "the same storage), and peers against our figure on the same workload.",
        "",
    ]
    if report.unavailable:
        lines += ["Not measured here:", ""]
        lines += [f"- {name}: {why}" for name, why in report.unavailable.items()]
        lines.append("")
    for workload, title in _TITLES.items():
        rows = [r for r in report.rows if r.workload == workload]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        lines += _table(rows)
        lines.append("")
    return "\n".join(lines)


def _chart(report: Report, path: Path) -> str:
    """Draw the scaling chart; returns ``""`` or why it was not drawn."""
    try:
        mpl: Any = importlib.import_module("matplotlib")
        mpl.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); pip install 'jobpool_async[bench]'"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_e2e, ax_scale), (ax_stats, ax_mem) = axes
    backends = sorted({r.backend for r in report.rows if r.kind == "ours"})

    # End to end: ours as a share of the raw floor, per backend and slots.
    slots_seen = sorted(
        {int(r.params["slots"]) for r in report.rows if r.workload == "e2e" and r.kind == "ours"}
    )
    e2e_backends = [
        b for b in backends if any(r.workload == "e2e" and r.backend == b for r in report.rows)
    ]
    width = 0.8 / max(len(slots_seen), 1)
    for k, slots in enumerate(slots_seen):
        values = []
        for b in e2e_backends:
            row = next(
                (
                    r
                    for r in report.rows
                    if r.workload == "e2e"
                    and r.kind == "ours"
                    and r.backend == b
                    and "Worker" not in r.system
                    and r.params.get("slots") == slots
                    and r.ok
                ),
                None,
            )
            values.append(100 * row.ratio if row is not None and row.ratio else 0.0)
        xs = [i + (k - (len(slots_seen) - 1) / 2) * width for i in range(len(e2e_backends))]
        ax_e2e.bar(xs, values, width, label=f"{slots} slots")
    ax_e2e.set_xticks(list(range(len(e2e_backends))), e2e_backends)
    ax_e2e.set_ylabel("% of the raw storage floor's jobs/s")
    ax_e2e.set_title("End to end, as a share of the raw floor (same run)")
    if e2e_backends:
        ax_e2e.legend()
    else:
        ax_e2e.axis("off")
        ax_e2e.text(0.5, 0.5, "no end-to-end figures in this run", ha="center", va="center")

    levels = sorted(
        {int(r.params["completed_in_store"]) for r in report.rows if r.workload == "scale"}
    )
    for b in backends:
        rows = [r for r in report.rows if r.workload == "scale" and r.backend == b and r.ok]
        if not rows:
            continue
        xs_s = [r.params["completed_in_store"] for r in rows]
        color = _COLORS.get(b)
        ax_scale.plot(xs_s, [r.jobs_per_s for r in rows], marker="o", label=b, color=color)
        ax_stats.plot(
            xs_s, [r.metrics.get("stats_ms") for r in rows], marker="o", label=b, color=color
        )
    for ax, title, ylabel in (
        (ax_scale, "Assignment throughput vs completed jobs stored", "jobs/s"),
        (ax_stats, "get_job_stats() latency vs completed jobs stored", "ms (median)"),
    ):
        ax.set_xscale("symlog", linthresh=max(min((x for x in levels if x), default=1), 1))
        if levels:
            ax.set_xticks(levels, [_count(x) for x in levels])
        ax.set_xlabel("completed jobs in the store")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()

    series = report.machine.get("memory_series", {})
    for b, samples in series.items():
        ax_mem.plot(
            [s["processed"] for s in samples],
            [s["rss_mb"] for s in samples],
            marker=".",
            label=b,
            color=_COLORS.get(b),
        )
    ax_mem.set_xlabel("jobs processed")
    ax_mem.set_ylabel("RSS (MiB)")
    ax_mem.set_ylim(bottom=0)
    ax_mem.set_title("Memory while jobs stream through")
    if series:
        ax_mem.legend()
    sizes, cores = report.sizes["label"], report.machine["cpu_count"]
    fig.suptitle(f"jobpool_async benchmarks ({sizes} sizes, {cores} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ""


def write(report: Report, out_dir: Path, stem: str = "latest") -> dict[str, Path | str]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    png_path = out_dir / f"{stem}.png"
    json_path.write_text(
        json.dumps(report.to_json(), indent=2, default=str) + "\n", encoding="utf-8"
    )
    md_path.write_text(markdown(report) + "\n", encoding="utf-8")
    why = _chart(report, png_path)
    result: dict[str, Path | str] = {"json": json_path, "markdown": md_path}
    if why:
        result["chart_skipped"] = why
    else:
        result["chart"] = png_path
    return result
