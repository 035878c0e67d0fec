"""rexmoe_train/threads.py: the intra-op thread choice, the cgroup quota reader, passive waiting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rexmoe_train.threads import (
    LAUNCHER_MARK,
    ThreadsError,
    available_cores,
    cgroup_cpu_limit,
    choose_threads,
    parse_cfs_quota,
    parse_cpu_max,
    prefer_passive_wait,
)

REPO = Path(__file__).resolve().parents[1]


def test_parse_quotas():
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("garbage") is None
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_cfs_quota("300000\n", "100000\n") == 3.0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_tightest_ancestor_wins(tmp_path):
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(root / "job" / "cpu.max", "250000 100000\n")  # parent: 2.5 CPUs
    _write(root / "job" / "step" / "cpu.max", "max 100000\n")  # the process's own: unlimited
    _write(tmp_path / "self", "0::/job/step\n")
    assert cgroup_cpu_limit(str(tmp_path / "self"), str(root)) == 2.5


def test_cgroup_v1_and_namespaced_path(tmp_path):
    root = tmp_path / "cg"
    # the recorded path does not exist under the mount (cgroup namespace): the mount's own counts
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "100000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "self", "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n")
    assert cgroup_cpu_limit(str(tmp_path / "self"), str(root)) == 1.0
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(str(tmp_path / "self"), str(root)) is None
    assert cgroup_cpu_limit(str(tmp_path / "missing"), str(root)) is None


def test_available_cores_quota_caps_affinity():
    assert available_cores(affinity=8, quota=None) == (8, "8 in the CPU affinity mask")
    cores, how = available_cores(affinity=8, quota=2.5)
    assert cores == 2 and "quota 2.5" in how
    assert available_cores(affinity=2, quota=16.0)[0] == 2
    assert available_cores(affinity=4, quota=0.5)[0] == 1
    assert available_cores()[0] == len(os.sched_getaffinity(0)) or cgroup_cpu_limit() is not None


@pytest.mark.parametrize("env,configured,cores,want,reason", [
    ({}, None, 8, 8, "8 cores"),
    ({"LOCAL_WORLD_SIZE": "2"}, None, 8, 4, "/ 2 processes"),
    ({"LOCAL_WORLD_SIZE": "4"}, None, 2, 1, "/ 4 processes"),  # never 0
    ({}, 3, 8, 3, "run.num_threads=3"),
    ({"OMP_NUM_THREADS": "5"}, 3, 8, 5, "OMP_NUM_THREADS=5"),  # the environment wins
    ({"OMP_NUM_THREADS": "4,2"}, None, 8, 4, "OMP_NUM_THREADS=4,2"),  # OpenMP's nesting list
    # the launcher's own split is a default: the config overrides it, the auto rule redoes it
    ({"OMP_NUM_THREADS": "1", LAUNCHER_MARK: "1", "LOCAL_WORLD_SIZE": "2"}, 3, 8, 3, "run.num_threads"),
    ({"OMP_NUM_THREADS": "1", LAUNCHER_MARK: "1", "LOCAL_WORLD_SIZE": "2"}, None, 6, 3, "/ 2 processes"),
    ({"OMP_NUM_THREADS": "2", LAUNCHER_MARK: "1"}, None, 6, 2, "OMP_NUM_THREADS=2"),
])
def test_choice(env, configured, cores, want, reason):
    choice = choose_threads(env, configured, cores, f"{cores} in the CPU affinity mask")
    assert choice.threads == want and reason in choice.reason


@pytest.mark.parametrize("env,configured,phrase", [
    ({"OMP_NUM_THREADS": "0"}, None, "OMP_NUM_THREADS='0': must be a positive integer"),
    ({"OMP_NUM_THREADS": "lots"}, None, "OMP_NUM_THREADS='lots'"),
    ({}, 0, "run.num_threads=0: must be >= 1"),
])
def test_bad_explicit_values(env, configured, phrase):
    with pytest.raises(ThreadsError, match=phrase.replace("(", r"\(")):
        choose_threads(env, configured, 4, "4 in the CPU affinity mask")


def test_passive_wait_respects_user_and_import_order():
    import torch  # noqa: F401  (loaded: too late to change this process's OpenMP runtime)

    env = {}
    assert prefer_passive_wait(env, load=9.0, cores=2)[0] is None and env == {}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert prefer_passive_wait(env, load=9.0, cores=2)[0] == "ACTIVE" and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_passive_only_when_busy(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as before the first import (restored after the test)
    env = {}
    assert prefer_passive_wait(env, load=0.2, cores=2)[0] is None and env == {}
    policy, reason = prefer_passive_wait(env, load=1.3, cores=2)
    assert policy == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"} and "load 1.3 on 2 cores" in reason


def _spincount(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    if not lines:
        pytest.skip("torch's OpenMP runtime is not GNU libgomp (no GOMP_SPINCOUNT to read back)")
    return lines[0].split("=")[1].strip().strip("'")


def test_passive_wait_reaches_the_openmp_runtime():
    """What libgomp itself reports: spinning off when set before torch loads, its default after."""
    before = ("from rexmoe_train.threads import prefer_passive_wait as p; "
              "assert p(load=99.0)[0] == 'PASSIVE'; import torch")
    after = "import torch; from rexmoe_train.threads import prefer_passive_wait as p; assert p(load=99.0)[0] is None"
    assert _spincount(before) == "0"
    assert int(_spincount(after)) > 0
