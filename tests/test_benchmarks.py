"""The benchmarks are not run by the suite (they take an hour and assert no timings), but their code must
not rot between two `make bench` runs: every module imports, and the cheapest one measures for real."""

from __future__ import annotations

import importlib

import pytest

from benchmarks import ORDER, transfer
from benchmarks.common import fold

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", [*ORDER, "run", "flower_app", "probe", "profiling"])
def test_every_benchmark_module_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks.{name} says what it measures in its docstring"


def test_fold_reports_median_and_extremes():
    row = fold([{"x": 3.0}, {"x": 1.0}, {"x": 2.0}, {"x": None}], ["x"])
    assert row == {"x": 2.0, "x_min": 1.0, "x_max": 3.0}


def test_transfer_measures_one_small_object_on_a_real_daemon(devnet):
    rows = transfer.measure(devnet.nodes[0].api, sizes_mb=(1,), repeats=1)
    assert len(rows) == 1
    row = rows[0]
    assert row["bytes"] >= 1_000_000 * 0.99 and row["repeats"] == 1
    assert row["grid_MBps"] > 0 and row["raw_MBps"] > 0
    assert row["ratio"] == pytest.approx(row["grid_MBps"] / row["raw_MBps"], rel=0.01)


def test_every_profiled_step_names_a_function_that_exists():
    """The profile benchmark finds steps by function name and file: a move or a rename must show here,
    not as a silent 0.000 s row in the next `make bench`."""
    from pathlib import Path

    from benchmarks import profiling

    root = Path(__file__).resolve().parents[1]
    for label, function, path in [*profiling.CLIENT_STEPS, *profiling.WORKER_STEPS]:
        source = root / path
        assert source.is_file(), f"{label}: no file {path}"
        assert f"def {function}(" in source.read_text(), f"{label}: no function {function} in {path}"
