"""bench/profile_step.py at a tiny size: it profiles real trainer steps, ranks operators by self CPU
time and measures the per-step metrics share against a run with logging off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "profile_step.py")


@pytest.mark.slow
def test_profiles_a_reuse_factor(tmp_path):
    out = tmp_path / "prof.json"
    proc = subprocess.run([sys.executable, _PATH, "--reuse", "2", "--steps", "1", "--top", "4",
                           "--out", str(out), "train.micro_batch_size=2", "train.global_batch_size=2",
                           "train.seq_length=32"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    results = json.loads(out.read_text())
    assert [r["reuse"] for r in results] == [2]
    for r in results:
        assert len(r["top"]) == 4 and r["top"][0]["self_cpu_ms"] >= r["top"][-1]["self_cpu_ms"] > 0
        assert r["step_s_median_logged"] > 0 and r["step_s_median_unlogged"] > 0
    assert "| op | self CPU ms/step |" in proc.stdout
