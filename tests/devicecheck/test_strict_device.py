"""The project's real code under the strict-device harness (tests/devicecheck/strict_device.py): CPU data,
accelerator discipline. Two launches (each process pays the torch + megatron import once):

- 1 process: the harness's own promises and each fixed device defect put back (it must be caught),
  then r=4 (alltoall, grouped bank) and r=1 (rexmoe_dedup, per-expert loop) with PSR, capacity
  dropping, the aux-free bias and recompute: 3 steps + saves, resume bitwise, same seed bitwise,
  another seed changes every random parameter, rexmoe-eval and export-hf on the checkpoint, bf16 counts;
- 2 processes (torchrun, gloo), ep=2: r=4 with rexmoe_dedup, r=1 with alltoall, train + save + resume.

The suites are in tests/devicecheck/scenarios.py; each writes a JSON report that is asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _launch(tmp_path: Path, suites: str, nproc: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runner = ["-m", "tests.devicecheck.run_under_harness", suites, str(tmp_path)]
    if nproc == 1:
        cmd = [sys.executable, *runner]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               *runner]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    reports = {}
    for name in suites.split(","):
        for rank in range(nproc):
            path = tmp_path / f"{name}.rank{rank}.json"
            assert path.exists(), f"no report from {name} rank {rank}: {proc.stderr[-6000:]}"
            report = json.loads(path.read_text())
            assert report["ok"], f"{name} rank {rank}: {report['error']}\n{proc.stderr[-4000:]}"
            reports.setdefault(name, []).append(report["results"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return reports


@pytest.mark.slow  # end-to-end runs: `pytest -m "not slow"` skips them
def test_single_process_defects_then_scenarios(tmp_path):
    reports = _launch(tmp_path, "defects,single")

    caught = reports["defects"][0]
    # each promise of the harness, and each device defect put back, raised the expected error
    assert all(caught["primitives"].values()), caught["primitives"]
    assert caught["chunks_not_moved"].startswith(("CPUCollectiveError", "DeviceMixError", "LeftOnCPUError"))
    assert caught["describe_cpu_all_reduce"].startswith("CPUCollectiveError: collective on a CPU tensor")
    assert caught["capacity_cpu_psr_columns"].startswith("DeviceMixError: device mix in aten.index_select")
    assert caught["device_rng_not_saved"] == "AssertionError: RNG states after the resumed step: device differs"
    assert caught["host_rng_unseeded"].startswith("AssertionError: same seed: initial parameters")
    assert ".router.weight" in caught["host_rng_unseeded"]

    single = reports["single"][0]
    for name in ("r4_alltoall", "r1_dedup"):
        assert single[name]["tensors_checked"] > 100, single[name]
        assert sorted(single[name]["losses"]) == ["1", "2", "3"]
    assert single["r4_alltoall"]["same_seed_bitwise"] is True
    assert single["r4_alltoall"]["grouped_gemm_forwards"] > 0  # the grouped bank ran, not its fallback
    assert single["seeds"]["random_parameters"] > 10
    assert any(f.endswith(".safetensors") for f in single["cli"]["export_files"])
    assert single["cli"]["eval_step"] == 3 and single["cli"]["eval_val_loss"] > 0, single["cli"]
    # bf16 stops holding integers above 256: the counts must have gone past it (and stayed exact)
    assert single["bf16"]["max_count"] > 256, single["bf16"]
    assert any(v % 2 for layer in single["bf16"]["layers"] for v in layer["load"] if v > 256), single["bf16"]


@pytest.mark.slow
def test_two_processes_ep2(tmp_path):
    ranks = _launch(tmp_path, "ep2", nproc=2)["ep2"]
    for results in ranks:
        for name in ("r4_dedup_ep2", "r1_alltoall_ep2"):
            assert results[name]["tensors_checked"] > 100, results[name]
        assert results["r4_dedup_ep2"]["grouped_gemm_forwards"] > 0
    # the loss is reduced over the ranks: every rank logs the same
    assert ranks[0]["r4_dedup_ep2"]["losses"] == ranks[1]["r4_dedup_ep2"]["losses"]


def test_platform_device_override_is_the_only_seam():
    """platform.set_device_override: device() and the RNG state follow it; the machine's answers do not."""
    import torch

    from rexmoe_train import platform

    assert platform.device() == torch.device("cpu") and "cuda" not in platform.get_rng_state()
    try:
        platform.set_device_override("meta")
        assert platform.device() == torch.device("meta")
        assert set(platform.get_rng_state()) == {"cpu", "cuda"}  # the device generator is checkpointed
        assert platform.dist_backend() == "gloo" and not platform.has_triton_gpu()
    finally:
        platform.set_device_override(None)
    assert platform.device() == torch.device("cpu") and set(platform.get_rng_state()) == {"cpu"}
