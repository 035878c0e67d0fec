"""bench/recompute_bench.py: the summary compares each setting with `off` (measured and predicted),
and one worker really trains a recompute setting and reports the dry run's prediction for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import script_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "recompute_bench.py")


@pytest.fixture(scope="module")
def bench():
    with script_module(_PATH, "recompute_bench") as module:
        yield module


def test_summary_is_relative_to_off(bench):
    def run(setting, step, peak, act, extra):
        return {"setting": setting, "step_s": step, "peak_over_start_gib": peak,
                "predicted_activations_gib": act, "predicted_extra_compute": extra}

    runs = [run("off", 1.0, 2.0, 1.5, 0.0), run("full uniform 1", 1.3, 1.0, 0.4, 1 / 3),
            run("off", 1.2, 2.2, 1.5, 0.0), run("full uniform 1", 1.5, 1.2, 0.4, 1 / 3)]
    rows = {r["setting"]: r for r in bench.summarise(runs)}
    full = rows["full uniform 1"]
    assert full["step_s"] == pytest.approx(1.4) and full["measured_slowdown"] == pytest.approx(1.4 / 1.1 - 1)
    assert full["measured_saving_gib"] == pytest.approx(2.1 - 1.1)
    assert full["predicted_saving_gib"] == pytest.approx(1.1)
    assert rows["off"]["measured_slowdown"] == 0


@pytest.mark.slow
def test_worker_trains_with_recompute():
    proc = subprocess.run([sys.executable, _PATH, "--worker", "full uniform 1", "--steps", "1",
                           "train.micro_batch_size=2", "train.global_batch_size=2", "train.seq_length=32"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["setting"] == "full uniform 1" and out["step_s"] > 0
    assert out["predicted_extra_compute"] == pytest.approx(1 / 3, abs=1e-3)
    assert out["predicted_activations_gib"] > 0
