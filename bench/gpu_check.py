"""The GPU check kit's driver: every GPU path of the project in one time-boxed run.

    bench/gpu_check.sh [--budget 480] [--only a,b] [--dry-list]    # the entry point (installs wheels)
    python bench/gpu_check.py --out DIR [--work DIR] ...           # this file, once imports work

Sections, in order of value. The ESSENTIALS first, within ESSENTIALS_BUDGET_S (5 minutes) by their own
budget table (``Section.timeout_s``): device placement and exact bf16 counts after a Trainer step, one
EP training step per dispatcher (``alltoall``, ``rexmoe_dedup``), the grouped-GEMM bank with every
feature, and its resume from step 2, which must continue bitwise. Then the compiled Triton kernels
against their references, the Transformer Engine bank in fp8 against the same run in bf16, the other
GPU-marked tests, bench/gpu_bench.py, the other fp8 recipes, the plain smokes (table: docs/gpu.md).

Verdicts. ``ok``: the command exited 0 AND every claim the section makes holds on what it wrote
(``Section.checks``, asserted by ``CHECKS`` on the figures read back). ``failed`` / ``timeout``: the
command failed, a claim did not hold, or the section ran past its OWN limit. ``not reached``: the
overall budget ran out before the section started or while it ran (not a failure: rerun it with
``--only``). ``not run``: it exited 0 but asserted nothing (a pytest section with 0 tests passed, e.g.
every TE test skipped): never ok. ``skipped``: a requirement is missing (TE, pytest) or a section it
needs did not pass. Exit status: 1 if any section failed or timed out, else 0 (the report's
``verdict`` says ``pass`` only when every section is ok); 2: no CUDA device (one line, nothing run).

Files. The results folder (``--out``, $OUT) gets only ``gpu_check.json``, a one-page ``gpu_check.md``
and ``logs.tar.gz`` (each log's tail), rewritten after every section; everything else (run dirs,
checkpoints, XML, bench JSON, full logs) goes to the work folder (``--work``, under /tmp).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from gpu_check_probes import FP8_LOSS_RTOL, PROBE_CHECKS, TE_STEPS, _probe, probe_environment  # noqa: E402,F401

DEFAULT_BUDGET_S = 480  # 8 minutes: a device command may run 10, and a rerun must still fit
ESSENTIALS_BUDGET_S = 300  # the essential sections' limits add up to at most this (tested on CPU)
MIN_START_S = 20  # a section is not started with less than this left: it could not finish
RESULT_FILES = ("gpu_check.json", "gpu_check.md", "logs.tar.gz")  # all the results folder ever holds
LOG_TAIL_BYTES = 64 * 1024  # of each section's log in logs.tar.gz


@dataclass
class Section:
    name: str
    argv: list[str]
    timeout_s: float
    skip: Optional[str] = None  # why it cannot run here (one line); None: it runs
    kind: str = "command"  # pytest | train | bench: how its figures are read back
    artifact: Optional[str] = None  # junit xml / run dir / bench json, relative to the output dir
    checks: tuple = ()  # names in CHECKS: what the section claims, asserted on its figures
    needs: Optional[str] = None  # a section that must have passed first (the resume's reference run)
    essential: bool = False  # one of the first sections, done within ESSENTIALS_BUDGET_S


@dataclass
class Result:
    name: str
    status: str  # ok | failed | timeout | not reached | not run | skipped
    seconds: float = 0.0
    reason: str = ""
    log: Optional[str] = None
    figures: dict = field(default_factory=dict)


# ---- The plan ----
def gpu_test_files(repo: Path = REPO) -> tuple[list[str], list[str]]:
    """(kernel test files, other test files) holding GPU-marked tests, relative to the repo."""
    kernels, others = [], []
    for path in sorted((repo / "tests").rglob("test_*.py")):
        if "pytest.mark.gpu" in path.read_text(errors="replace"):
            rel = str(path.relative_to(repo))
            (kernels if rel.startswith(os.path.join("tests", "kernels")) else others).append(rel)
    return kernels, others


def train_overrides(run_dir: str, reuse: int, impl: str, *, fp8: Optional[str] = None, grouped: bool = False,
                    features: bool = False, load: Optional[str] = None, layers: int = 4, seq: int = 4096,
                    steps: int = 4, model: str = "rexmoe_2.3b", bf16: bool = True) -> list[str]:
    """Hydra overrides of the training smoke: the 2.3B model's dims (configs/model/rexmoe_2.3b.yaml)
    and the paper's sequence length, at reduced depth on one GPU (EP 1), PSR off (every router sees
    all r*N candidates from step 1), a validation pass and the end-of-run checkpoint included.

    ``fp8``: the recipe (delayed | tensorwise | blockwise) of a ``train.fp8=hybrid`` run. ``features``:
    what the plain smoke leaves out, in one run: PSR ramping N -> r*N within the run, capacity
    dropping, aux-loss-free bias balancing, full activation recompute, 2 micro-batches per step, the
    distributed optimizer, a checkpoint every 2 steps (all kept: the resume section loads step 2).
    ``load``: start from that checkpoint (the resume section). ``model``/``bf16``: for the CPU test
    of the same overrides (tests/bench/test_gpu_check.py)."""
    args = [f"model={model}", "train=paper", f"model.num_layers={layers}",
            f"rexmoe.reuse_group_size={reuse}", "rexmoe.psr.schedule=none",
            "parallel.expert_model_parallel_size=1", f"train.train_iters={steps}",
            "train.global_batch_size=1", "train.micro_batch_size=1", f"train.seq_length={seq}",
            "train.lr_warmup_iters=1", "train.log_interval=1", f"train.eval_interval={steps}",
            "train.eval_iters=1", f"train.bf16={str(bf16).lower()}", f"model.transformer_impl={impl}",
            "run.wandb.mode=disabled", "run.progress=false", f"run.dir={run_dir}"]
    if fp8 is not None:
        args += ["train.fp8=hybrid", f"train.fp8_recipe={fp8}"]
    if grouped:
        args.append("model.moe_grouped_gemm=true")
    if features:
        args = [a for a in args if not a.startswith(("rexmoe.psr.schedule=", "train.global_batch_size="))]
        args += ["rexmoe.psr.schedule=linear", "rexmoe.psr.start_step=1", f"rexmoe.psr.end_step={max(2, steps - 1)}",
                 "model.moe_expert_capacity_factor=1.25",
                 "rexmoe.balance.moe_router_enable_expert_bias=true",
                 "model.recompute_granularity=full", "model.recompute_method=uniform",
                 "model.recompute_num_layers=1",
                 "train.global_batch_size=2", "parallel.use_distributed_optimizer=true",
                 # blocking saves: the async writer process costs a start-up (torch import) per run, and
                 # what is compared is the resumed state, not how it was written (tests/training cover async)
                 "checkpoint.save_interval=2", "checkpoint.keep_last_n=null", "checkpoint.async_save=false"]
    if load is not None:
        args.append(f"checkpoint.load={load}")
    return args


ESSENTIAL_SEQ = 1024  # the essentials' sequence length: they prove paths, they do not time them


def merge_overrides(base: list[str], extra) -> list[str]:
    """``base`` with the keys ``extra`` sets replaced (Hydra refuses a key given twice)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [a for a in base if a.split("=", 1)[0] not in keys] + list(extra)


def plan(out: Path, python: str, env: dict, *, layers: int = 4, seq: int = 4096, steps: int = 4,
         repo: Path = REPO) -> list[Section]:
    """The sections in order of value; ``out`` is the WORK folder (run dirs, junit XML, bench JSON)."""
    te = env.get("transformer_engine", {})
    te_skip = None if te.get("ok") else f"Transformer Engine does not import ({te.get('info', 'not probed')})"
    grouped = env.get("grouped_gemm_option", {})
    grouped_info = str(grouped.get("info", "not probed"))
    grouped_skip = None if grouped.get("ok") else (
        grouped_info[len("no: "):] if grouped_info.startswith("no: ")
        else f"could not read the config schema ({grouped_info})")
    has_pytest = env.get("pytest", {}).get("ok")
    gpus = env.get("gpus", {}).get("info", "1")
    ep = 2 if str(gpus).isdigit() and int(gpus) >= 2 else 1
    kernel_files, other_files = gpu_test_files(repo)
    sections = []

    def pytest_section(name: str, files: list[str], timeout: float) -> Section:
        skip = None if has_pytest else "pytest is not installed"
        if not files:
            skip = "no GPU-marked tests found"
        xml = f"{name}.xml"
        return Section(name, [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                              f"--junitxml={out / xml}", *files], timeout, skip, "pytest", xml)

    def train(name: str, reuse: int, impl: str, skip: Optional[str], *, checks=("finite",),
              deterministic: bool = False, needs: Optional[str] = None, timeout: float = 120,
              essential: bool = False, nproc: int = 1, extra: tuple = (), **kw) -> Section:
        run_dir = f"runs/{name}"
        entry = [str(repo / "bench" / "gpu_check_train.py")] if deterministic else ["-m", "rexmoe_train.cli.train"]
        launcher = [python] if nproc == 1 else [python, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc-per-node", str(nproc)]
        kw.setdefault("seq", ESSENTIAL_SEQ if essential else seq)
        argv = [*launcher, *entry, *merge_overrides(train_overrides(
            str(out / run_dir), reuse, impl, layers=layers, steps=kw.pop("steps", steps), **kw), extra)]
        return Section(name, argv, timeout, skip, "train", run_dir, tuple(checks), needs, essential)

    def probe(name: str, args: list[str], overrides: list[str], checks: tuple, timeout: float,
              skip: Optional[str] = None, essential: bool = False) -> Section:
        result = f"{name}.json"
        return Section(name, [python, str(repo / "bench" / "gpu_check_probes.py"), args[0], *args[1:],
                              str(out / result), *overrides], timeout, skip, "probe", result, checks,
                       essential=essential)

    # ---- essentials (ESSENTIALS_BUDGET_S by their limits) ----
    small = dict(layers=layers, seq=ESSENTIAL_SEQ, steps=2)  # the probe runs one of them
    sections.append(probe("device_placement_bf16", ["placement"],
                          merge_overrides(train_overrides(str(out / "runs" / "device_placement_bf16"), 4,
                                                          "local", **small), ["train.global_batch_size=2"]),
                          ("on_device", "bf16_counts"), 45, essential=True))
    for dispatcher in ("alltoall", "rexmoe_dedup"):
        sections.append(train(f"ep{ep}_step_{dispatcher}", 4, "local", None, essential=True, timeout=50,
                              nproc=ep, steps=2,
                              checks=("finite",) + (("dedup_ran",) if dispatcher != "alltoall" else ()),
                              # 16 experts: the end-of-run checkpoint of 64 would cost more than the step
                              extra=("model.num_moe_experts=16", f"parallel.moe_token_dispatcher_type={dispatcher}",
                                     f"parallel.expert_model_parallel_size={ep}",
                                     f"train.global_batch_size={ep}")))
    # the grouped bank with everything the plain smoke leaves out, then a resume from its step-2
    # checkpoint that must continue bitwise (both deterministic: bench/gpu_check_train.py)
    features = "train_grouped_features_r4"
    sections.append(train(features, 4, "local", grouped_skip, grouped=True, features=True, deterministic=True,
                          timeout=75, essential=True,
                          checks=("finite", "grouped", "psr_ramp", "capacity", "expert_bias",
                                  "features_config", "microbatches_2", "checkpoints_every_2")))
    sections.append(train(f"resume_{features[len('train_'):]}", 4, "local", grouped_skip, grouped=True,
                          features=True, deterministic=True, needs=features, timeout=60, essential=True,
                          load=str(out / "runs" / features / "checkpoints" / f"iter_{2:07d}"),
                          checks=("finite", "grouped", "resume_bitwise")))
    # ---- then by value ----
    sections.append(pytest_section("triton_kernels", kernel_files, 90))
    te_overrides = train_overrides(str(out / "runs" / "te"), 4, "transformer_engine", layers=layers,
                                   seq=ESSENTIAL_SEQ, steps=TE_STEPS)
    sections.append(probe("te_fp8_delayed_vs_bf16_r4", ["te", "delayed"], te_overrides,
                          ("te_used", "fp8_used", "fp8_close"), 120, te_skip))
    sections.append(pytest_section("gpu_tests", other_files, 150))
    precisions = "bf16,fp8" if te.get("ok") else "bf16"  # without TE the fp8 rows could only fail
    sections.append(Section(
        "gpu_bench", [python, str(repo / "bench" / "gpu_bench.py"), "--models", "2.3b", "--layers",
                      str(layers), "--seq", str(seq), "--reuse", "1,4", "--precisions", precisions,
                      "--warmup", "2", "--iters", "5", "--out", str(out / "gpu_bench.json")],
        180, None, "bench", "gpu_bench.json", ("bench_rows",)))
    for recipe in ("tensorwise", "blockwise"):
        sections.append(probe(f"te_fp8_{recipe}_vs_bf16_r4", ["te", recipe], te_overrides,
                              ("te_used", "fp8_used", "fp8_close"), 120, te_skip))
    sections.append(train("train_local_r4", 4, "local", None))
    sections.append(probe("te_bf16_r4", ["te", "none"], te_overrides, ("te_used", "probe_finite"), 60, te_skip))
    sections.append(train("train_local_r1", 1, "local", None))
    return sections


# ---- Running ----
def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_one(section: Section, out: Path, timeout: float) -> Result:
    """Run one section's command in its own process group (its children are killed with it)."""
    log_path = out / "logs" / f"{section.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(section.argv) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(section.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    start_new_session=True)
        except OSError as err:
            return Result(section.name, "failed", 0.0, f"could not start: {err}", str(log_path))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Result(section.name, "timeout", time.monotonic() - start,
                          f"killed after {timeout:.0f} s", str(log_path))
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    if rc == 0:
        return Result(section.name, "ok", seconds, "", str(log_path))
    return Result(section.name, "failed", seconds, f"exit {rc}: {_last_line(text)}", str(log_path))


def read_figures(section: Section, out: Path) -> dict:
    """The section's own figures: test counts, the training run's last logged step, bench rows."""
    if section.artifact is None:
        return {}
    path = out / section.artifact
    try:
        if section.kind == "pytest":
            root = ET.parse(path).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            return counts
        if section.kind == "train":
            records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()
                       if line.strip()]
            steps = [r for r in records if "loss" in r]
            if not steps:
                return {}
            last = steps[-1]
            figures = {k: last.get(k) for k in ("step", "loss", "tokens_per_s", "mfu", "memory_gib",
                                                "step_time_s", "grouped_gemm_forwards")}
            figures["loss_finite"] = all(math.isfinite(r["loss"]) for r in steps)
            figures["steps"] = [{k: r.get(k) for k in RESUME_KEYS if k in r} | {"step": r["step"]}
                                for r in steps]
            figures["psr_candidates"] = [r.get("psr_candidates") for r in steps]
            figures["dropped_fraction_logged"] = all("dropped_fraction" in r for r in steps)
            figures["dispatch_bytes_logged"] = all("dispatch_bytes" in r for r in steps)
            figures["expert_bias_range_max"] = max(
                (max(r["expert_bias_range"]) for r in steps if r.get("expert_bias_range")), default=None)
            evals = [r["val_loss"] for r in records if "val_loss" in r]
            if evals:
                figures["val_loss"] = evals[-1]
            described = path / "model.json"
            if described.exists():
                figures["num_microbatches"] = json.loads(described.read_text()).get("num_microbatches")
            figures["checkpoints"] = sorted(p.name for p in (path / "checkpoints").glob("iter_*"))
            return figures
        if section.kind == "probe":
            return json.loads(path.read_text())
        if section.kind == "bench":
            data = json.loads(path.read_text())
            return {"models": data.get("models", []), "kernels": data.get("kernels", []),
                    "errors": data.get("errors", {})}
    except (OSError, ValueError, AttributeError, KeyError, TypeError, ET.ParseError) as err:
        return {"unreadable": f"{type(err).__name__}: {err}"}
    return {}


# --------------------------------------------------------------------------------------------------
# What each section claims, asserted on its figures: None when it holds, else why not (one line)
# --------------------------------------------------------------------------------------------------
RESUME_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "val_loss")


def compare_resumed(reference: list[dict], resumed: list[dict], from_step: int) -> Optional[str]:
    """A run resumed from step ``from_step`` must log exactly the reference's later steps, each value of
    RESUME_KEYS equal to the last bit (json round-trips floats exactly)."""
    ref = {r["step"]: r for r in reference if r["step"] > from_step}
    got = {r["step"]: r for r in resumed}
    if sorted(got) != sorted(ref) or not ref:
        return f"resumed run logged steps {sorted(got)}, the reference {sorted(ref)} after step {from_step}"
    for step in sorted(ref):
        for key in RESUME_KEYS:
            if key in ref[step] and ref[step][key] != got[step].get(key):
                return (f"step {step} {key}: resumed {got[step].get(key)!r} != reference {ref[step][key]!r} "
                        "(not bitwise)")
    return None


def _config_text(section: Section, out: Path) -> str:
    path = out / section.artifact / "config.yaml"
    return path.read_text() if path.exists() else ""


def _check_resume(f: dict, section: Section, out: Path, figures_of: dict) -> Optional[str]:
    reference = figures_of.get(section.needs, {}).get("steps")
    if not reference:
        return f"no steps logged by {section.needs}"
    load = next((a.split("=", 1)[1] for a in section.argv if a.startswith("checkpoint.load=")), "")
    from_step = int(Path(load).name[len("iter_"):]) if Path(load).name.startswith("iter_") else 0
    return compare_resumed(reference, f.get("steps", []), from_step)


def _check_bench(f: dict) -> Optional[str]:
    """Every bench row measured (none carries an error) and no section of the bench failed."""
    problems = [f"{m.get('precision')}/r{m.get('r')}/{m.get('dispatcher')}: {m['error']}"
                for m in f.get("models", []) if "error" in m]
    problems += [f"{k}: {v}" for k, v in (f.get("errors") or {}).items()]
    if not f.get("models"):
        problems.insert(0, "no model rows")
    return "; ".join(problems) or None


CHECKS: dict[str, Callable[[dict, Section, Path, dict], Optional[str]]] = {
    **{name: (lambda f, *_, check=check: check(f)) for name, check in PROBE_CHECKS.items()},
    "dedup_ran": lambda f, *_: None if f.get("dispatch_bytes_logged") else
    "no dispatch_bytes in metrics.jsonl: the rexmoe_dedup dispatcher did not run",
    "finite": lambda f, *_: None if f.get("loss_finite") else "no finite loss logged",
    "grouped": lambda f, *_: None if (f.get("grouped_gemm_forwards") or 0) > 0 else
    "the grouped-GEMM bank never ran (metrics.jsonl: no grouped_gemm_forwards)",
    "psr_ramp": lambda f, *_: None if (c := [x for x in f.get("psr_candidates", []) if x is not None])
    and c[-1] > c[0] else f"PSR did not open candidates during the run (psr_candidates {f.get('psr_candidates')})",
    "capacity": lambda f, *_: None if f.get("dropped_fraction_logged") else
    "no dropped_fraction logged (capacity dropping did not run)",
    "expert_bias": lambda f, *_: None if (f.get("expert_bias_range_max") or 0) > 0 else
    f"expert bias never moved (expert_bias_range max {f.get('expert_bias_range_max')})",
    "features_config": lambda f, s, out, _: None if all(
        needle in _config_text(s, out) for needle in ("recompute_granularity: full", "use_distributed_optimizer: true",
                                                      "moe_router_enable_expert_bias: true")) else
    "config.yaml lacks full recompute / the distributed optimizer / bias balancing",
    "microbatches_2": lambda f, *_: None if f.get("num_microbatches") == 2 else
    f"model.json says {f.get('num_microbatches')} micro-batches per step, not 2",
    "checkpoints_every_2": lambda f, *_: None if {f"iter_{2:07d}", f"iter_{f.get('step') or 0:07d}"} <= set(
        f.get("checkpoints", [])) else f"checkpoints {f.get('checkpoints')}: step 2 and the last step's expected",
    "resume_bitwise": _check_resume,
    "bench_rows": lambda f, *_: _check_bench(f),
}


def check_section(section: Section, figures: dict, out: Path, figures_of: dict) -> list[str]:
    """The reasons ``section``'s claims fail (empty: all hold)."""
    return [why for name in section.checks if (why := CHECKS[name](figures, section, out, figures_of))]


def prune_checkpoints(sections: list[Section], done: int, out: Path) -> None:
    """Delete the checkpoints of finished training sections no later section needs (~4-5 GB each)."""
    needed = {s.needs for s in sections[done + 1:]}
    for s in sections[: done + 1]:
        if s.kind == "train" and s.artifact and s.name not in needed:
            shutil.rmtree(out / s.artifact / "checkpoints", ignore_errors=True)


def run_sections(sections: list[Section], work: Path, budget_s: float, env: dict,
                 clock: Callable[[], float] = time.monotonic,
                 on_result: Optional[Callable[[list[Result]], None]] = None) -> list[Result]:
    """Run the sections in order within ``budget_s`` seconds in all; never stops at a failure.
    ``work`` holds what they write (logs, run dirs, junit XML)."""
    deadline = clock() + budget_s
    results: list[Result] = []
    by_name: dict[str, Result] = {}
    for index, section in enumerate(sections):
        left = deadline - clock()
        needed = by_name.get(section.needs) if section.needs else None
        if section.skip is not None:
            result = Result(section.name, "skipped", reason=section.skip)
        elif section.needs and (needed is None or needed.status != "ok"):
            status = "not reached" if needed is not None and needed.status == "not reached" else "skipped"
            result = Result(section.name, status, reason=f"needs {section.needs}, which "
                                                         f"{needed.status if needed else 'did not run'}")
        elif left < MIN_START_S:
            result = Result(section.name, "not reached", reason=f"overall budget spent ({max(left, 0):.0f} s "
                                                                f"of {budget_s:.0f} s left)")
        else:
            limit = min(section.timeout_s, left)
            result = run_one(section, work, limit)
            if result.status == "timeout" and limit < section.timeout_s:
                result.status = "not reached"
                result.reason = (f"cut off by the overall budget after {result.seconds:.0f} s (its own limit: "
                                 f"{section.timeout_s:.0f} s)")
            result.figures = read_figures(section, work)
            if result.status == "ok" and section.kind == "pytest":
                if result.figures.get("failures") or result.figures.get("errors"):
                    result.status, result.reason = "failed", "junit reports failures"
                elif not result.figures.get("passed"):
                    result.status = "not run"
                    result.reason = f"0 tests passed ({_summary(result) or 'no junit report'}): nothing asserted"
            if result.status not in ("not reached", "not run"):
                figures_of = {r.name: r.figures for r in results}
                failed_checks = check_section(section, result.figures, work, figures_of)
                if failed_checks:
                    result.reason = "; ".join(([result.reason] if result.reason else []) + failed_checks)[:1000]
                    if result.status == "ok":
                        result.status = "failed"
                elif section.checks and result.status == "ok":
                    result.figures["checked"] = list(section.checks)
        print(format_row(result), flush=True)
        results.append(result)
        by_name[section.name] = result
        prune_checkpoints(sections, index, work)
        if on_result is not None:
            on_result(results)
    return results


# ---- Report ----
def _summary(result: Result) -> str:
    f = result.figures
    if "passed" in f:
        return f"{f['passed']}/{f['tests']} passed, {f['skipped']} skipped"
    if "loss" in f:
        parts = [f"loss {f['loss']:.3f}"]
        if f.get("tokens_per_s") is not None:
            parts.append(f"{f['tokens_per_s']:.0f} tok/s")
        if f.get("mfu") is not None:
            parts.append(f"MFU {100 * f['mfu']:.1f}%")
        if f.get("memory_gib") is not None:
            parts.append(f"{f['memory_gib']:.1f} GiB")
        return ", ".join(parts)
    if "off_device" in f:
        return f"{f.get('checked')} tensors on the GPU, {len(f.get('routers') or [])} routers' counts exact"
    if "bf16" in f:
        last = {k: (f.get(k) or {}).get("losses", [None])[-1] for k in ("bf16", "fp8")}
        return ", ".join(f"{k} loss {v:.4f}" for k, v in last.items() if isinstance(v, float)) + \
            f", {(f.get('bf16') or {}).get('te_modules')} TE modules"
    if "models" in f:
        ran = [m for m in f["models"] if "error" not in m]
        return f"{len(ran)}/{len(f['models'])} model cases, {len(f['kernels'])} kernel rows"
    return f.get("unreadable", "")


def format_row(result: Result, width: int = 1000) -> str:
    detail = result.reason if result.status != "ok" else _summary(result)
    detail = detail.replace("|", "/").replace("\n", " ")
    detail = detail if len(detail) <= width else detail[: width - 3] + "..."
    return f"| {result.name} | {result.status} | {result.seconds:.0f} | {detail} |"


def verdict(results: list[Result]) -> str:
    """fail: something failed or timed out; pass: every section ok; else incomplete."""
    if any(r.status in ("failed", "timeout") for r in results):
        return "fail"
    return "pass" if results and all(r.status == "ok" for r in results) else "incomplete"


def budget_table(sections: list[Section]) -> dict:
    essentials = [s for s in sections if s.essential]
    return {"sections": {s.name: {"limit_s": s.timeout_s, "essential": s.essential} for s in sections},
            "essentials_s": sum(s.timeout_s for s in essentials), "essentials_budget_s": ESSENTIALS_BUDGET_S}


def pack_logs(work: Path, out: Path) -> None:
    """OUT/logs.tar.gz: the last LOG_TAIL_BYTES of every log in the work folder (written atomically)."""
    import io
    import tarfile

    logs = sorted((work / "logs").glob("*.log")) + sorted(work.glob("*.txt")) + sorted(work.glob("*.log"))
    if not logs:
        return
    partial = out / "logs.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        for path in logs:
            data = path.read_bytes()[-LOG_TAIL_BYTES:]
            info = tarfile.TarInfo(f"logs/{path.name}")
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    partial.replace(out / "logs.tar.gz")


def write_report(out: Path, env: dict, results: list[Result], budget_s: float, work: Optional[Path] = None,
                 sections: Optional[list[Section]] = None) -> None:
    """OUT/gpu_check.json (everything), OUT/gpu_check.md (one page), OUT/logs.tar.gz; nothing else."""
    out.mkdir(parents=True, exist_ok=True)
    outcome = verdict(results)
    doc = {"verdict": outcome, "exit_status": exit_status(results), "env": env, "budget_s": budget_s,
           "work": str(work) if work else None, "budget_table": budget_table(sections or []),
           "sections": [dataclasses.asdict(r) for r in results]}
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1) + "\n")
    counts = {s: sum(r.status == s for r in results) for s in
              ("ok", "failed", "timeout", "not reached", "not run", "skipped")}
    lines = ["# GPU check", "", f"**verdict: {outcome}** ({', '.join(f'{n} {s}' for s, n in counts.items() if n)};"
             f" budget {budget_s:.0f} s)", ""]
    lines += [f"- {k}: {str(v['info'] if isinstance(v, dict) else v)[:120]}" for k, v in env.items()]
    lines += ["", "| section | status | s | result |", "|---|---|---|---|"]
    lines += [format_row(r, width=240) for r in results]
    lines += ["", "Details: gpu_check.json; logs: logs.tar.gz (last 64 KiB of each)."]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    if work is not None:
        pack_logs(work, out)


def exit_status(results: list[Result]) -> int:
    """1 if a section failed or ran past its own limit; not reached / not run / skipped are not failures."""
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"),
                        help="results folder: gpu_check.json, gpu_check.md, logs.tar.gz only")
    parser.add_argument("--work", default=None,
                        help="where runs, checkpoints, XML and logs go (default: a new /tmp/rexmoe_gpu_check.*)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all sections")
    parser.add_argument("--only", default=None, help="comma list of section names (a rerun)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of each training smoke")
    parser.add_argument("--dry-list", action="store_true",
                        help="probe this machine, print the sections (and why any would skip), run none")
    args = parser.parse_args(argv)
    out, python = Path(args.out).resolve(), sys.executable

    if not args.dry_list:
        ok, line = _probe(python, "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)")
        if not ok:
            print("gpu_check: no CUDA device on this machine; nothing run", file=sys.stderr)
            return 2
    import tempfile

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rexmoe_gpu_check.", dir="/tmp"))
    if work.resolve() == out or out in work.resolve().parents:
        print(f"gpu_check: --work {work} must not be inside --out {out} (the results folder stays flat)",
              file=sys.stderr)
        return 2
    env = probe_environment(python)
    install = work / "install.txt"
    if install.exists():
        env["installed_wheels"] = {"ok": True, "info": install.read_text().strip()}
    sections = plan(work, python, env, layers=args.layers, seq=args.seq, steps=args.steps)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in sections}
        if unknown:
            print(f"gpu_check: unknown section(s) {', '.join(sorted(unknown))}; known: "
                  f"{', '.join(s.name for s in sections)}", file=sys.stderr)
            return 2
        sections = [s for s in sections if s.name in wanted]
    if args.dry_list:
        table = budget_table(sections)
        for s in sections:
            state = f"skip: {s.skip}" if s.skip else f"run (limit {s.timeout_s:.0f} s)"
            print(f"{s.name}: {state}{' [essential]' if s.essential else ''}\n    {' '.join(s.argv)}")
        print(f"essentials: {table['essentials_s']:.0f} s of limits (at most {ESSENTIALS_BUDGET_S} s)")
        return 0
    for key, value in env.items():
        print(f"[env] {key}: {value['info']}", flush=True)
    print(f"[work] {work}", flush=True)
    results = run_sections(sections, work, args.budget, env,
                           on_result=lambda rs: write_report(out, env, rs, args.budget, work, sections))
    write_report(out, env, results, args.budget, work, sections)
    print(f"gpu_check: {verdict(results)}; wrote {', '.join(str(out / f) for f in RESULT_FILES)}")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
