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


TE_SECTIONS = {"te_fp8_delayed_vs_bf16_r4", "te_fp8_tensorwise_vs_bf16_r4", "te_fp8_blockwise_vs_bf16_r4",
               "te_bf16_r4"}
GROUPED_SECTIONS = {"train_grouped_features_r4", "resume_grouped_features_r4"}
ESSENTIALS = ["device_placement_bf16", "ep1_step_alltoall", "ep1_step_rexmoe_dedup", "train_grouped_features_r4",
              "resume_grouped_features_r4"]
ORDER = ESSENTIALS + ["triton_kernels", "te_fp8_delayed_vs_bf16_r4", "gpu_tests", "gpu_bench",
                      "te_fp8_tensorwise_vs_bf16_r4", "te_fp8_blockwise_vs_bf16_r4", "train_local_r4", "te_bf16_r4",
                      "train_local_r1"]


def test_plan_without_te_or_grouped_option_skips_only_those(gc, tmp_path):
    sections = {s.name: s for s in gc.plan(tmp_path, sys.executable, _env(te=False, grouped=False))}
    assert list(sections) == ORDER
    assert {n for n in sections if n.startswith("te_")} == TE_SECTIONS
    for name in TE_SECTIONS:
        assert sections[name].skip.startswith("Transformer Engine does not import (ModuleNotFoundError")
    for name in GROUPED_SECTIONS:
        assert sections[name].skip == "model.moe_grouped_gemm is not in the config schema"
    runnable = {n for n, s in sections.items() if s.skip is None}
    assert runnable == {"device_placement_bf16", "ep1_step_alltoall", "ep1_step_rexmoe_dedup", "triton_kernels",
                        "gpu_tests", "train_local_r4", "train_local_r1", "gpu_bench"}
    # without TE the bench is asked for bf16 only (its fp8 rows could only fail)
    bench = sections["gpu_bench"].argv
    assert bench[bench.index("--precisions") + 1] == "bf16" and sections["gpu_bench"].checks == ("bench_rows",)
    # the smoke is the paper's 2.3B dims at 4 layers and seq 4096, and r is what the name says
    r1 = sections["train_local_r1"].argv
    assert "model=rexmoe_2.3b" in r1 and "model.num_layers=4" in r1 and "train.seq_length=4096" in r1
    assert "rexmoe.reuse_group_size=1" in r1 and "run.wandb.mode=disabled" in r1
    assert sections["train_local_r1"].checks == ("finite",)
    # the TE sections assert more than a finite loss: TE modules used, fp8 ran and stayed close to bf16
    for recipe in ("delayed", "tensorwise", "blockwise"):
        s = sections[f"te_fp8_{recipe}_vs_bf16_r4"]
        assert s.argv[1].endswith("bench/gpu_check_probes.py") and s.argv[2:4] == ["te", recipe]
        assert set(s.checks) == {"te_used", "fp8_used", "fp8_close"}
        assert f"train.train_iters={gc.TE_STEPS}" in s.argv and "model.transformer_impl=transformer_engine" in s.argv
    assert set(sections["te_bf16_r4"].checks) == {"te_used", "probe_finite"}


def test_essentials_come_first_and_fit_five_minutes_by_the_budget_table(gc, tmp_path):
    for gpus, ep in (("1", 1), ("2", 2)):
        env = {**_env(te=True, grouped=True), "gpus": {"ok": True, "info": gpus}}
        sections = gc.plan(tmp_path, sys.executable, env)
        essentials = [s for s in sections if s.essential]
        assert [s.name for s in essentials] == [n.replace("ep1", f"ep{ep}") for n in ESSENTIALS]
        assert sections[: len(essentials)] == essentials  # first, in order of value
        table = gc.budget_table(sections)
        assert table["essentials_s"] == sum(s.timeout_s for s in essentials) <= gc.ESSENTIALS_BUDGET_S == 300
        placement = essentials[0]
        assert placement.kind == "probe" and set(placement.checks) == {"on_device", "bf16_counts"}
        assert "train.bf16=true" in placement.argv and "train.global_batch_size=2" in placement.argv
        for dispatcher in ("alltoall", "rexmoe_dedup"):
            step = next(s for s in essentials if s.name == f"ep{ep}_step_{dispatcher}")
            keys = [a.split("=", 1)[0] for a in step.argv if "=" in a]
            assert len(keys) == len(set(keys))  # Hydra refuses a key given twice
            assert f"parallel.moe_token_dispatcher_type={dispatcher}" in step.argv
            assert f"parallel.expert_model_parallel_size={ep}" in step.argv
            assert ("torch.distributed.run" in step.argv) == (ep == 2)
            assert ("dedup_ran" in step.checks) == (dispatcher == "rexmoe_dedup")


def test_plan_features_and_resume_sections(gc, tmp_path):
    sections = {s.name: s for s in gc.plan(tmp_path, sys.executable, _env(te=True, grouped=True))}
    assert all(s.skip is None for s in sections.values())
    features, resume = sections["train_grouped_features_r4"], sections["resume_grouped_features_r4"]
    for s in (features, resume):  # deterministic: both through the wrapper, the same overrides
        assert s.argv[1].endswith("bench/gpu_check_train.py")
        assert {"model.moe_grouped_gemm=true", "rexmoe.psr.schedule=linear", "model.moe_expert_capacity_factor=1.25",
                "rexmoe.balance.moe_router_enable_expert_bias=true", "model.recompute_granularity=full",
                "train.global_batch_size=2", "train.micro_batch_size=1", "parallel.use_distributed_optimizer=true",
                "checkpoint.save_interval=2", "checkpoint.async_save=false",
                f"train.seq_length={gc.ESSENTIAL_SEQ}"} <= set(s.argv)
    assert set(features.checks) == {"finite", "grouped", "psr_ramp", "capacity", "expert_bias", "features_config",
                                    "microbatches_2", "checkpoints_every_2"}
    assert resume.needs == features.name and set(resume.checks) == {"finite", "grouped", "resume_bitwise"}
    load = [a for a in resume.argv if a.startswith("checkpoint.load=")]
    assert load == [f"checkpoint.load={tmp_path / 'runs' / features.name / 'checkpoints' / 'iter_0000002'}"]
    other = [a for a in resume.argv if not a.startswith(("checkpoint.load=", "run.dir="))]
    assert other == [a for a in features.argv if not a.startswith("run.dir=")]
    no_pytest = {s.name: s for s in gc.plan(tmp_path, sys.executable, _env(True, True, pytest_ok=False))}
    assert no_pytest["gpu_tests"].skip == "pytest is not installed"
    assert no_pytest["train_local_r4"].skip is None


def test_compare_resumed_is_bitwise(gc):
    ref = [{"step": s, "loss": 1.0 / s, "grad_norm": 2.0 + s, "lm_loss": 0.5} for s in (1, 2, 3, 4)]
    same = [dict(r) for r in ref[2:]]
    assert gc.compare_resumed(ref, same, 2) is None
    off = [dict(r) for r in ref[2:]]
    off[1]["grad_norm"] = ref[3]["grad_norm"] + 1e-15  # one ulp-sized difference fails
    assert gc.compare_resumed(ref, off, 2).startswith("step 4 grad_norm: resumed")
    assert "logged steps [3]" in gc.compare_resumed(ref, same[:1], 2)
    assert "logged steps [2, 3, 4]" in gc.compare_resumed(ref, [dict(r) for r in ref[1:]], 2)
    assert gc.compare_resumed(ref, [], 4) is not None  # nothing to compare is not a pass


def test_checks_read_what_the_sections_claim(gc, tmp_path):
    s = gc.Section("x", [], 1, kind="train", artifact="runs/x",
                   checks=("finite", "grouped", "psr_ramp", "capacity", "expert_bias", "microbatches_2"))
    good = {"loss_finite": True, "grouped_gemm_forwards": 12, "psr_candidates": [64, 160, 256],
            "dropped_fraction_logged": True, "expert_bias_range_max": 0.004, "num_microbatches": 2}
    assert gc.check_section(s, good, tmp_path, {}) == []
    bad = {"loss_finite": False, "psr_candidates": [256, 256], "num_microbatches": 1}
    reasons = gc.check_section(s, bad, tmp_path, {})
    assert len(reasons) == 6 and reasons[1].startswith("the grouped-GEMM bank never ran")
    bench = {"models": [{"precision": "fp8", "r": 4, "dispatcher": "alltoall", "error": "RuntimeError: x"},
                        {"precision": "bf16", "r": 4, "dispatcher": "alltoall"}], "errors": {"kernels": "E: y"}}
    assert gc.CHECKS["bench_rows"](bench) == "fp8/r4/alltoall: RuntimeError: x; kernels: E: y"
    assert gc.CHECKS["bench_rows"]({"models": [bench["models"][1]], "errors": {}}) is None


def test_probe_claims(gc):
    router = {"step_load_dtype": "torch.float64", "weight_dtype": "torch.bfloat16", "counted": 16384.0,
              "expected": 16384}
    placed = {"checked": 412, "off_device": [], "routers": [router] * 4}
    assert gc.CHECKS["on_device"](placed) is None and gc.CHECKS["bf16_counts"](placed) is None
    assert gc.CHECKS["on_device"]({"checked": 412, "off_device": ["chunk0.x (4,) on cpu"]}).startswith("1 tensor")
    assert gc.CHECKS["on_device"]({"checked": 0, "off_device": []}) is not None  # nothing checked: no pass
    inexact = {"routers": [{**router, "counted": 16383.0}]}
    assert gc.CHECKS["bf16_counts"](inexact).startswith("1 router(s) with inexact")
    assert "not bf16" in gc.CHECKS["bf16_counts"]({"routers": [{**router, "weight_dtype": "torch.float32"}]})
    te = {"bf16": {"losses": [10.4, 10.1, 9.8, 9.5], "te_modules": 24, "fp8_modules": 0},
          "fp8": {"losses": [10.4, 10.2, 9.9, 9.6], "te_modules": 24, "fp8_modules": 20}}
    assert all(gc.CHECKS[c](te) is None for c in ("te_used", "fp8_used", "fp8_close", "probe_finite"))
    far = {**te, "fp8": {**te["fp8"], "losses": [10.4, 10.3, 10.2, 9.5 * (1 + gc.FP8_LOSS_RTOL) + 0.01]}}
    assert "not within 3%" in gc.CHECKS["fp8_close"](far)
    assert gc.CHECKS["fp8_used"]({**te, "fp8": {**te["fp8"], "fp8_modules": 0}}) is not None
    assert gc.CHECKS["te_used"]({"bf16": {"losses": [1.0], "te_modules": 0}}) is not None


def test_runner_skips_what_needs_a_failed_section_and_prunes_checkpoints(gc, tmp_path):
    py = sys.executable
    for name in ("a", "b"):
        (tmp_path / "runs" / name / "checkpoints" / "iter_0000001").mkdir(parents=True)
    sections = [
        gc.Section("a", [py, "-c", "raise SystemExit(1)"], 30, kind="train", artifact="runs/a"),
        gc.Section("needs_a", [py, "-c", "pass"], 30, needs="a"),
        gc.Section("b", [py, "-c", "pass"], 30, kind="train", artifact="runs/b", checks=("finite",)),
    ]
    results = {r.name: r for r in gc.run_sections(sections, tmp_path, budget_s=120, env={})}
    assert results["needs_a"].status == "skipped" and results["needs_a"].reason == "needs a, which failed"
    assert results["b"].status == "failed" and "no finite loss logged" in results["b"].reason
    assert not (tmp_path / "runs" / "a" / "checkpoints").exists()  # nobody later needs them
    assert not (tmp_path / "runs" / "b" / "checkpoints").exists()


@pytest.mark.slow
def test_features_run_and_its_resume_pass_the_kits_own_checks_on_cpu(gc, tmp_path, monkeypatch):
    """The kit's features + resume pair with its real overrides, wrapper, figure reader and checks, on
    the tiny model (CPU, fp32): everything it asserts on a GPU holds here, and the resume is bitwise."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = dict(grouped=True, features=True, layers=2, seq=32, steps=3, model="tiny", bf16=False)
    wrapper = [sys.executable, str(REPO / "bench" / "gpu_check_train.py")]
    ref_dir = tmp_path / "runs" / "ref"
    ref = gc.Section("ref", [*wrapper, *gc.train_overrides(str(ref_dir), 2, "local", **common)], 300,
                     kind="train", artifact="runs/ref",
                     checks=("finite", "grouped", "psr_ramp", "capacity", "expert_bias", "features_config",
                             "microbatches_2", "checkpoints_every_2"))
    load = str(ref_dir / "checkpoints" / "iter_0000002")
    resume = gc.Section("resume", [*wrapper, *gc.train_overrides(str(tmp_path / "runs" / "resume"), 2, "local",
                                                                 load=load, **common)],
                        300, kind="train", artifact="runs/resume", checks=("finite", "grouped", "resume_bitwise"),
                        needs="ref")
    results = gc.run_sections([ref, resume], tmp_path, budget_s=900, env={})
    for result in results:
        assert result.status == "ok", (result.name, result.reason, Path(result.log).read_text()[-2000:])
        assert result.figures["checked"] == list({"ref": ref, "resume": resume}[result.name].checks)
    assert [s["step"] for s in results[0].figures["steps"]] == [1, 2, 3]
    assert [s["step"] for s in results[1].figures["steps"]] == [3]
    assert results[0].figures["checkpoints"] == ["iter_0000002", "iter_0000003"]
    assert not (ref_dir / "checkpoints").exists()  # pruned once the resume no longer needs them


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
    assert result.status == "not reached" and result.reason.startswith("overall budget spent")
    assert not (tmp_path / "logs" / "late.log").exists()
    assert gc.exit_status([result]) == 0 and gc.verdict([result]) == "incomplete"


@pytest.mark.slow
def test_dry_list_names_every_section_and_why_it_skips(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "o")}
    proc = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--dry-list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    heads = [line for line in proc.stdout.splitlines() if not line.startswith((" ", "essentials:"))]
    assert [h.split(":")[0] for h in heads] == ORDER
    assert [h.split(":")[0] for h in heads if h.endswith("[essential]")] == ESSENTIALS
    assert proc.stdout.splitlines()[-1].startswith("essentials: 280 s of limits (at most 300 s)")
    te_lines = [h for h in heads if h.startswith("te_")]
    try:
        import transformer_engine.pytorch  # noqa: F401
        te_ok = True
    except Exception:
        te_ok = False
    assert all(("skip: Transformer Engine does not import" in h) != te_ok for h in te_lines)
    assert not (tmp_path / "o").exists()  # a dry list writes nothing


def _probe_section(gc, name: str, figures: dict, checks: tuple, timeout: float = 30):
    """A probe section whose GPU part is stubbed: the command only writes the figures a GPU run would."""
    code = f"import json, sys; json.dump({figures!r}, open(sys.argv[1], 'w'))"
    return gc.Section(name, [sys.executable, "-c", code, "{work}/" + name + ".json"], timeout, kind="probe",
                      artifact=f"{name}.json", checks=checks)


def test_verdicts_not_reached_not_run_and_stubbed_gpu_claims(gc, tmp_path, monkeypatch):
    """Issue 29 item 7 (a) and (b): cut off by the overall budget is "not reached" (exit 0 if all reached
    sections passed), a section that asserted nothing is "not run" (never ok), its own limit is a timeout."""
    py = sys.executable
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_skips.py").write_text("import pytest\n\n\ndef test_te():\n    pytest.skip('no TE')\n")
    te_ok = {"bf16": {"losses": [10.4, 9.9], "te_modules": 8}, "fp8": {"losses": [10.4, 9.95], "te_modules": 8,
                                                                       "fp8_modules": 6}}
    te_far = {**te_ok, "fp8": {**te_ok["fp8"], "losses": [10.4, 12.0]}}
    sections = [
        _probe_section(gc, "te_close", te_ok, ("te_used", "fp8_used", "fp8_close")),
        gc.Section("only_skips", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tests),
                                  f"--junitxml={tmp_path / 'skips.xml'}", str(tests / "test_skips.py")], 60,
                   kind="pytest", artifact="skips.xml"),
        gc.Section("cut_off", [py, "-c", "import time; time.sleep(60)"], 600),  # its own limit is far
        gc.Section("after", [py, "-c", "pass"], 30),
    ]
    for s in sections:
        s.argv = [a.replace("{work}", str(tmp_path)) for a in s.argv]
    monkeypatch.setattr(gc, "MIN_START_S", 1)
    results = {r.name: r for r in gc.run_sections(sections, tmp_path, budget_s=12, env={})}
    assert results["te_close"].status == "ok", results["te_close"].reason
    assert results["only_skips"].status == "not run" and "0 tests passed" in results["only_skips"].reason
    assert results["cut_off"].status == "not reached" and "overall budget" in results["cut_off"].reason
    assert results["after"].status == "not reached"
    assert gc.exit_status(list(results.values())) == 0 and gc.verdict(list(results.values())) == "incomplete"
    # a stubbed fp8 run far from bf16, and a section past its OWN limit: failures
    monkeypatch.setattr(gc, "MIN_START_S", 20)
    failing = [_probe_section(gc, "te_far", te_far, ("te_used", "fp8_used", "fp8_close")),
               gc.Section("slow", [py, "-c", "import time; time.sleep(60)"], 1)]
    for s in failing:
        s.argv = [a.replace("{work}", str(tmp_path)) for a in s.argv]
    bad = {r.name: r for r in gc.run_sections(failing, tmp_path, budget_s=120, env={})}
    assert bad["te_far"].status == "failed" and "not within 3%" in bad["te_far"].reason
    assert bad["slow"].status == "timeout"
    assert gc.exit_status(list(bad.values())) == 1 and gc.verdict(list(bad.values())) == "fail"
    assert gc.verdict([results["te_close"]]) == "pass"


def test_results_folder_holds_only_the_report_and_one_small_log_tarball(gc, tmp_path, monkeypatch):
    """Issue 29 item 7 (c): main() with the GPU parts stubbed (CUDA probe, environment, the plan's
    commands): $OUT gets gpu_check.json, a one-page gpu_check.md and logs.tar.gz, nothing else; run
    dirs, checkpoints and full logs stay in the work folder."""
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    py = sys.executable
    monkeypatch.setattr(gc, "_probe", lambda python, code, timeout=120: (True, ""))
    monkeypatch.setattr(gc, "probe_environment", lambda python: {"device": {"ok": True, "info": "stub GPU"}})
    writes_a_run = ("import os, sys; d = sys.argv[1]; os.makedirs(d + '/checkpoints/iter_0000001'); "
                    "open(d + '/metrics.jsonl', 'w').write('{\"step\": 1, \"loss\": 2.5}\\n'); print('x' * 200000)")

    def stub_plan(work_dir, python, env, **kw):
        return [gc.Section("train_stub", [py, "-c", writes_a_run, str(work_dir / "runs" / "train_stub")], 60,
                           kind="train", artifact="runs/train_stub", checks=("finite",), essential=True),
                _probe_section(gc, "placement_stub", {"checked": 3, "off_device": [], "routers": [
                    {"step_load_dtype": "torch.float64", "weight_dtype": "torch.bfloat16", "counted": 4.0,
                     "expected": 4}]}, ("on_device", "bf16_counts"))]

    monkeypatch.setattr(gc, "plan", stub_plan)
    original_run_one = gc.run_one

    def run_one(section, work_dir, timeout):
        section.argv = [a.replace("{work}", str(work_dir)) for a in section.argv]
        return original_run_one(section, work_dir, timeout)

    monkeypatch.setattr(gc, "run_one", run_one)
    assert gc.main(["--out", str(out), "--work", str(work), "--budget", "120"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "logs.tar.gz"]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["verdict"] == "pass" and doc["exit_status"] == 0
    assert [s["status"] for s in doc["sections"]] == ["ok", "ok"]
    assert doc["budget_table"]["essentials_s"] == 60
    page = (out / "gpu_check.md").read_text().splitlines()
    assert page[2].startswith("**verdict: pass**") and len(page) < 60
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
        assert names == ["logs/placement_stub.log", "logs/train_stub.log"]
        assert all(m.size <= gc.LOG_TAIL_BYTES for m in tar.getmembers())
    assert (out / "logs.tar.gz").stat().st_size < 256 * 1024
    assert (work / "runs" / "train_stub" / "metrics.jsonl").exists()  # the runs stay in the work folder
    # the work folder may not be inside the results folder
    assert gc.main(["--out", str(out), "--work", str(out / "w")]) == 2
