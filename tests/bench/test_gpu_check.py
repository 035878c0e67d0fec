"""The GPU check kit on CPU: the no-CUDA exit, the plan's degradation by section, and the runner's
time-boxing and failure handling (with real subprocesses; only the GPU sections themselves need a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rexmoe_train import platform
from tests.helpers import script_module

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gc():
    with script_module(REPO / "bench" / "gpu_check.py", "gpu_check") as module:
        yield module


def _env(te: bool, grouped: bool, pytest_ok: bool = True) -> dict:
    return {"transformer_engine": {"ok": te, "info": "2.11.0" if te else
                                   "ModuleNotFoundError: No module named 'transformer_engine'"},
            "grouped_gemm_option": {"ok": grouped, "info": "yes" if grouped else
                                    "no: model.moe_grouped_gemm is not in the config schema"},
            "pytest": {"ok": pytest_ok, "info": "8.3.5"}}


def test_no_cuda_exits_2_with_one_line_and_writes_nothing(tmp_path):
    if platform.HAS_CUDA:
        pytest.skip("CUDA present: the kit would run")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(REPO / "bench" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "no CUDA device" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no output folder, nothing installed


def test_gpu_test_files_are_the_marked_ones(gc):
    kernels, others = gc.gpu_test_files()
    assert "tests/kernels/test_dedup_permute.py" in kernels and "tests/kernels/test_fused_router.py" in kernels
    assert "tests/config/test_gpu_options.py" in others
    for rel in kernels + others:
        assert "pytest.mark.gpu" in (REPO / rel).read_text()
    assert all(not rel.startswith("tests/kernels") for rel in others)


def test_plan_without_te_or_grouped_option_skips_only_those(gc, tmp_path):
    sections = {s.name: s for s in gc.plan(tmp_path, sys.executable, _env(te=False, grouped=False))}
    te = [n for n in sections if n.startswith("train_te_")]
    grouped = [n for n in sections if n.startswith("train_grouped_")]
    assert set(te) == {"train_te_fp8_r4", "train_te_bf16_r4", "train_te_fp8_r1"}
    assert set(grouped) == {"train_grouped_r4", "train_grouped_r1"}
    for name in te:
        assert sections[name].skip.startswith("Transformer Engine does not import (ModuleNotFoundError")
    for name in grouped:
        assert sections[name].skip == "model.moe_grouped_gemm is not in the config schema"
    runnable = {n for n, s in sections.items() if s.skip is None}
    assert runnable == {"triton_kernels", "gpu_tests", "train_local_r4", "train_local_r1", "gpu_bench"}
    # the smoke is the paper's 2.3B dims at 4 layers and seq 4096, and r is what the name says
    r1 = sections["train_local_r1"].argv
    assert "model=rexmoe_2.3b" in r1 and "model.num_layers=4" in r1 and "train.seq_length=4096" in r1
    assert "rexmoe.reuse_group_size=1" in r1 and "run.wandb.mode=disabled" in r1
    assert "train.fp8=hybrid" in sections["train_te_fp8_r4"].argv
    assert "train.fp8=hybrid" not in sections["train_te_bf16_r4"].argv


def test_plan_with_everything_skips_nothing(gc, tmp_path):
    sections = gc.plan(tmp_path, sys.executable, _env(te=True, grouped=True))
    assert all(s.skip is None for s in sections)
    assert "model.moe_grouped_gemm=true" in {a for s in sections if s.name == "train_grouped_r4" for a in s.argv}
    no_pytest = {s.name: s for s in gc.plan(tmp_path, sys.executable, _env(True, True, pytest_ok=False))}
    assert no_pytest["gpu_tests"].skip == "pytest is not installed"
    assert no_pytest["train_local_r4"].skip is None


def test_runner_records_failures_and_timeouts_and_continues(gc, tmp_path):
    py = sys.executable
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "test_two.py").write_text(textwrap.dedent("""
        def test_passes():
            assert True

        def test_fails():
            assert 1 == 2
    """))
    sections = [
        gc.Section("fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
        gc.Section("hangs", [py, "-c", "import time; time.sleep(60)"], 2),
        gc.Section("needs_te", [py, "-c", "pass"], 30, skip="Transformer Engine does not import"),
        gc.Section("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path / "t"),
                             f"--junitxml={tmp_path / 'tests.xml'}", str(tmp_path / "t" / "test_two.py")],
                   60, kind="pytest", artifact="tests.xml"),
        gc.Section("passes", [py, "-c", "print('fine')"], 30),
    ]
    reports = []
    results = gc.run_sections(sections, tmp_path, budget_s=120, env={},
                              on_result=lambda rs: reports.append(len(rs)))
    status = {r.name: r for r in results}
    assert [r.name for r in results] == [s.name for s in sections]
    assert status["fails"].status == "failed" and status["fails"].reason == "exit 3: boom"
    assert status["hangs"].status == "timeout" and status["hangs"].seconds < 30
    assert status["needs_te"].status == "skipped" and "Transformer Engine" in status["needs_te"].reason
    assert status["tests"].status == "failed"
    assert status["tests"].figures == {"tests": 2, "failures": 1, "errors": 0, "skipped": 0, "passed": 1}
    assert status["passes"].status == "ok"
    assert "print('fine')" in Path(status["passes"].log).read_text()
    assert reports == [1, 2, 3, 4, 5]  # the report is rewritten after every section
    assert gc.exit_status(results) == 1
    assert gc.exit_status([status["passes"], status["needs_te"]]) == 0

    gc.write_report(tmp_path, {"device": {"ok": True, "info": "test"}}, results, 120)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["status"] for s in doc["sections"]] == ["failed", "timeout", "skipped", "failed", "ok"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| hangs | timeout |" in table and "| tests | failed | " in table


def test_runner_does_not_start_a_section_it_cannot_finish(gc, tmp_path):
    sections = [gc.Section("late", [sys.executable, "-c", "raise SystemExit(5)"], 30)]
    (result,) = gc.run_sections(sections, tmp_path, budget_s=gc.MIN_START_S - 1, env={})
    assert result.status == "skipped" and result.reason.startswith("out of time")
    assert not (tmp_path / "logs" / "late.log").exists()


@pytest.mark.slow
def test_dry_list_names_every_section_and_why_it_skips(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "o")}
    proc = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--dry-list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    heads = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert [h.split(":")[0] for h in heads] == [
        "triton_kernels", "gpu_tests", "train_local_r4", "train_te_fp8_r4", "gpu_bench", "train_local_r1",
        "train_grouped_r4", "train_te_bf16_r4", "train_grouped_r1", "train_te_fp8_r1"]
    te_lines = [h for h in heads if h.startswith("train_te_")]
    try:
        import transformer_engine.pytorch  # noqa: F401
        te_ok = True
    except Exception:
        te_ok = False
    assert all(("skip: Transformer Engine does not import" in h) != te_ok for h in te_lines)
    assert not (tmp_path / "o").exists()  # a dry list writes nothing
