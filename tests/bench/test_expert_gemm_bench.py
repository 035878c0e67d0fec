"""bench/expert_gemm_bench.py at a tiny size: megatron's SequentialMLP and the bare F.linear loop it
is timed against compute the same thing, and the report has every (count, impl) row."""

from __future__ import annotations

import os

import pytest

from tests.helpers import script_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "expert_gemm_bench.py")


@pytest.fixture(scope="module")
def bench():
    with script_module(_PATH, "expert_gemm_bench") as module:
        yield module


def test_both_implementations_agree_and_are_reported(bench, layout):
    from rexmoe_train.config.schema import ParallelConfig

    layout(ParallelConfig())
    report = bench.run([2, 4], rows=16, hidden=8, ffn=16, iters=1)
    rows = report["results"]
    assert [(r["experts"], r["impl"]) for r in rows] == [
        (n, impl) for n in (2, 4) for impl in ("megatron", "plain", "grouped", "grouped_prestacked")]
    assert all(r["max_abs_diff"] < 1e-6 and r["min_ms"] > 0 for r in rows)
    assert [r["rows_per_expert"] for r in rows] == [8] * 4 + [4] * 4
    assert bench.table(report).count("\n") == len(rows) + 1


def test_rows_not_divisible_is_one_line(bench, layout):
    from rexmoe_train.config.schema import ParallelConfig

    layout(ParallelConfig())
    with pytest.raises(SystemExit, match=r"--rows \(10\) must be divisible .*\(4\)"):
        bench.run([4], rows=10, hidden=8, ffn=16, iters=1)
