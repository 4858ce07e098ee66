"""The memory backend's lazily applied indexes (``_Lazy``) against a plain sorted set."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jobpool_async.backends.memory import _Lazy

# (op, value): add a value absent from the index, remove one present, or read it.
_OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "read"]), st.integers(0, 40)))


@given(_OPS)
def test_a_lazy_index_reads_as_its_changes_applied_in_order(ops: list[tuple[str, int]]) -> None:
    lazy: _Lazy[tuple[int]] = _Lazy()
    model: set[tuple[int]] = set()
    for op, value in ops:
        if op == "add" and (value,) not in model:
            lazy.add((value,))
            model.add((value,))
        elif op == "remove" and model:
            present = sorted(model)[value % len(model)]
            lazy.remove(present)
            model.discard(present)
        elif op == "read":
            assert list(lazy.sorted()) == sorted(model)
    assert list(lazy.sorted()) == sorted(model)
    assert list(lazy.sorted()) == sorted(model)  # a second read changes nothing


def test_many_removals_rebuild_the_index_and_few_remove_entry_by_entry() -> None:
    lazy: _Lazy[tuple[int]] = _Lazy()
    for value in range(100):
        lazy.add((value,))
    first = lazy.sorted()
    lazy.remove((5,))
    assert lazy.sorted() is first and list(first) == [(v,) for v in range(100) if v != 5]
    for value in range(10, 90):
        lazy.remove((value,))
    rebuilt = lazy.sorted()
    assert rebuilt is not first
    assert list(rebuilt) == [(v,) for v in range(100) if v != 5 and not 10 <= v < 90]
