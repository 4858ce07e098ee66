"""The LevelDB measuring tools of session 13, at tiny sizes: ``benchmarks.leveldb_cost
--mode bytes`` (what a drained job writes, by key family) and the garbage collections
``benchmarks.leveldb_threads`` reports."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("plyvel")

pytestmark = pytest.mark.timeout(300)


def _rows(out: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for line in out.splitlines()[1:]:
        *family, ops, size = line.split()
        rows[" ".join(family)] = (float(ops), float(size))
    return rows


def test_bytes_mode_counts_every_write_of_a_drained_job(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A drained job's record is put twice (enqueue, completion: a claim puts its
    ``A`` key only, format 6); its eligible, assignee and status keys come and go;
    the total is the sum of the rows."""
    from benchmarks import leveldb_cost

    leveldb_cost.main(["--mode", "bytes", "--jobs", "40"])
    rows = _rows(capsys.readouterr().out)
    total = rows.pop("total")
    assert rows["put J"][0] == 2.0
    for family in ("put E", "delete E", "put A", "delete A", "put D", "put Y", "delete S"):
        assert rows[family][0] == 1.0, family
    assert rows["put S"][0] == 2.0
    assert rows["put J"][1] > 2 * 100  # (each record holds the job's 100-byte payload)
    assert rows["put A"][1] == pytest.approx(rows["delete A"][1] + 8)  # (the claim's time)
    assert total[0] == pytest.approx(sum(ops for ops, _ in rows.values()), abs=0.01)
    assert total[1] == pytest.approx(sum(size for _, size in rows.values()), abs=0.5)


def test_threads_report_names_the_collections_it_saw(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the young generation's threshold at 1 every allocation collects, so the
    stream's report lists collections of both threads; its callback is removed after."""
    from benchmarks import leveldb_threads

    callbacks = list(gc.callbacks)
    thresholds = gc.get_threshold()
    gc.set_threshold(1, *thresholds[1:])
    try:
        leveldb_threads.main(["--mode", "stream", "--jobs", "30"])
    finally:
        gc.set_threshold(*thresholds)
    out = capsys.readouterr().out
    assert "gc in MainThread, generation 0:" in out
    assert "gc in jobpool-leveldb, generation 0:" in out
    assert gc.callbacks == callbacks
