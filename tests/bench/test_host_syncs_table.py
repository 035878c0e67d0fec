"""bench/host_syncs.py's table (the measurement itself is tests/devicecheck/test_host_syncs.py's)."""

from __future__ import annotations

import os

from tests.helpers import script_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "host_syncs.py")


def test_table_lists_layers_steps_and_call_sites():
    log = {"d2h": 8, "h2d": 2, "sync": 2, "sites": {"d2h": {"megatron/core/x.py:1 item/bool": 8},
                                                     "h2d": {"rexmoe_train/core/gating.py:57 to(device) async": 2},
                                                     "sync": {}}}
    runs = [{"ep": 1, "results": {"ours r=4 alltoall ep=1": {"layer": log, "train_step": log},
                                  "stock megatron MoELayer r=1 alltoall ep=1": {"layer": log}}}]
    with script_module(_PATH, "host_syncs_bench") as bench:
        text = bench.table(runs)
    assert "| ours r=4 alltoall ep=1 | 8 | 2 | 2 |" in text
    assert "| stock megatron MoELayer r=1 alltoall ep=1 | 8 | 2 | 2 |" in text
    assert "| ours r=4 alltoall ep=1 | h2d | rexmoe_train/core/gating.py:57 to(device) async | 2 |" in text
    assert text.count("whole training step") == 1 and text.count("| ours r=4 alltoall ep=1 | 8 |") == 2
