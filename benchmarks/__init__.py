"""Benchmarks for jobpool_async: throughput, wake latency, scale and memory, per backend.

Run ``python -m benchmarks`` (or ``nox -s bench``); see ``docs/benchmarks.md``.
Every figure is measured beside a baseline in the same run (a raw storage floor,
or a peer job queue on the same workload) and reported as a ratio, because the
machines these run on are shared and noisy.
"""

from __future__ import annotations

from ._common import Row, Sizes
from .runner import WORKLOADS, Options, Report, run

__all__ = ["WORKLOADS", "Options", "Report", "Row", "Sizes", "run"]
