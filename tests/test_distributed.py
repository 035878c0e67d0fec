"""Runs the multi-process checks in tests/dist under torchrun (2 gloo processes on CPU).

One launch for all of them: each process pays ~7 s importing torch + megatron.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dist_suite_two_processes():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/dist"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert "passed" in proc.stdout and "failed" not in proc.stdout, tail
