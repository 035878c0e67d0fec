"""The GPU check kit's driver: every GPU path of the project in one time-boxed run.

    bench/gpu_check.sh [--budget 480] [--only a,b] [--dry-list]    # the entry point (installs wheels)
    python bench/gpu_check.py --out DIR ...                        # this file, once imports work

Sections, in priority order (the most telling first, so a short budget still says the most):
the compiled Triton kernels against their torch references, forward and backward (the GPU-marked
tests of tests/kernels), the other GPU-marked tests (fp8 through the padded TE bank among them), the
grouped-GEMM bank training the 2.3B dims (4 layers, seq 4096) with PSR ramping, capacity dropping,
bias balancing, full recompute, 2 micro-batches per step and the distributed optimizer, then a
resume from its step-2 checkpoint that must continue bitwise (both through
bench/gpu_check_train.py, deterministic), the Transformer Engine bank in fp8 (delayed), bench/gpu_bench.py,
fp8 tensorwise and blockwise, and the plain local / TE bf16 / r=1 smokes. docs/gpu.md has the table.

A section passes when its command exits 0 AND every claim it makes holds on what it wrote
(``Section.checks``, asserted by ``CHECKS`` on the figures read back: junit counts, metrics.jsonl,
model.json, config.yaml, the checkpoints, the bench JSON): e.g. ``grouped`` needs the grouped bank's
forward count in metrics.jsonl to be > 0, ``resume_bitwise`` every logged loss and grad norm of the
resumed steps equal to the reference run's to the last bit. A section that ``needs`` another is
skipped unless that one passed. Checkpoints no later section needs are deleted as soon as possible
(a 2.3B-dims checkpoint with Adam state is several GB).

Each section is a subprocess with its own time limit, clipped to what is left of the budget; a
section that fails or times out is recorded and the next one runs. A section whose requirement is
missing (TE, the grouped option, pytest) is skipped with one line saying why. After every section
the results are rewritten to OUT/gpu_check.json and OUT/gpu_check.md, so a run killed from
outside still leaves what it measured. Exit status: 0 all ran sections passed, 1 some failed or
timed out, 2 no CUDA device (one line, nothing run).
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
DEFAULT_BUDGET_S = 480  # 8 minutes: a device command may run 10, and a rerun must still fit
MIN_START_S = 20  # a section is not started with less than this left: it could not finish


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


@dataclass
class Result:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    reason: str = ""
    log: Optional[str] = None
    figures: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# What this machine has (each probe in a subprocess: a broken TE build may crash its importer)
# --------------------------------------------------------------------------------------------------
def _probe(python: str, code: str, timeout: float = 120) -> tuple[bool, str]:
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)
    except subprocess.TimeoutExpired:
        return False, f"probe timed out after {timeout:.0f} s"
    text = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return proc.returncode == 0, (text[-1] if text else f"exit {proc.returncode}")


def probe_environment(python: str) -> dict:
    env = {"python": sys.version.split()[0]}
    for key, code in {
        "torch": "import torch; print(torch.__version__, torch.version.cuda)",
        "device": "import torch; print(torch.cuda.get_device_name())",
        "triton": "import triton; print(triton.__version__)",
        "megatron_core": "import megatron.core as m; print(m.__version__)",
        "transformer_engine": "import transformer_engine.pytorch, transformer_engine as te; print(te.__version__)",
        "pytest": "import pytest; print(pytest.__version__)",
        "numpy": "import numpy; print(numpy.__version__)",
        "grouped_gemm_option": ("import dataclasses; from rexmoe_train.config.schema import ExperimentConfig; "
                                "names = {f.name for f in dataclasses.fields(ExperimentConfig().model)}; "
                                "print('yes' if 'moe_grouped_gemm' in names else "
                                "'no: model.moe_grouped_gemm is not in the config schema')"),
    }.items():
        ok, line = _probe(python, code)
        env[key] = {"ok": ok and not line.startswith("no:"), "info": line}
    return env


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
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


def plan(out: Path, python: str, env: dict, *, layers: int = 4, seq: int = 4096, steps: int = 4,
         repo: Path = REPO) -> list[Section]:
    te = env.get("transformer_engine", {})
    te_skip = None if te.get("ok") else f"Transformer Engine does not import ({te.get('info', 'not probed')})"
    grouped = env.get("grouped_gemm_option", {})
    grouped_info = str(grouped.get("info", "not probed"))
    grouped_skip = None if grouped.get("ok") else (
        grouped_info[len("no: "):] if grouped_info.startswith("no: ")
        else f"could not read the config schema ({grouped_info})")
    has_pytest = env.get("pytest", {}).get("ok")
    kernel_files, other_files = gpu_test_files(repo)
    sections = []

    def pytest_section(name: str, files: list[str], timeout: float) -> Section:
        skip = None if has_pytest else "pytest is not installed"
        if not files:
            skip = "no GPU-marked tests found"
        xml = f"{name}.xml"
        return Section(name, [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                              f"--junitxml={out / xml}", *files], timeout, skip, "pytest", xml)

    sections.append(pytest_section("triton_kernels", kernel_files, 90))
    sections.append(pytest_section("gpu_tests", other_files, 150))

    def train(name: str, reuse: int, impl: str, skip: Optional[str], *, checks=("finite",),
              deterministic: bool = False, needs: Optional[str] = None, timeout: float = 120, **kw) -> Section:
        run_dir = f"runs/{name}"
        entry = [str(repo / "bench" / "gpu_check_train.py")] if deterministic else ["-m", "rexmoe_train.cli.train"]
        argv = [python, *entry,
                *train_overrides(str(out / run_dir), reuse, impl, layers=layers, seq=seq, steps=steps, **kw)]
        return Section(name, argv, timeout, skip, "train", run_dir, tuple(checks), needs)

    # the grouped bank with everything the plain smoke leaves out, then a resume from its step-2
    # checkpoint that must continue bitwise (both deterministic: bench/gpu_check_train.py)
    features = "train_grouped_features_r4"
    sections.append(train(features, 4, "local", grouped_skip, grouped=True, features=True, deterministic=True,
                          timeout=150, checks=("finite", "grouped", "psr_ramp", "capacity", "expert_bias",
                                               "features_config", "microbatches_2", "checkpoints_every_2")))
    sections.append(train(f"resume_{features[len('train_'):]}", 4, "local", grouped_skip, grouped=True,
                          features=True, deterministic=True, needs=features,
                          load=str(out / "runs" / features / "checkpoints" / f"iter_{2:07d}"),
                          checks=("finite", "grouped", "resume_bitwise")))
    sections.append(train("train_te_fp8_r4", 4, "transformer_engine", te_skip, fp8="delayed"))
    precisions = "bf16,fp8" if te.get("ok") else "bf16"  # without TE the fp8 rows could only fail
    sections.append(Section(
        "gpu_bench", [python, str(repo / "bench" / "gpu_bench.py"), "--models", "2.3b", "--layers",
                      str(layers), "--seq", str(seq), "--reuse", "1,4", "--precisions", precisions,
                      "--warmup", "2", "--iters", "5", "--out", str(out / "gpu_bench.json")],
        180, None, "bench", "gpu_bench.json", ("bench_rows",)))
    sections.append(train("train_te_fp8_tensorwise_r4", 4, "transformer_engine", te_skip, fp8="tensorwise"))
    sections.append(train("train_te_fp8_blockwise_r4", 4, "transformer_engine", te_skip, fp8="blockwise"))
    sections.append(train("train_local_r4", 4, "local", None))
    sections.append(train("train_te_bf16_r4", 4, "transformer_engine", te_skip))
    sections.append(train("train_local_r1", 1, "local", None))
    return sections


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
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
    """Delete the checkpoints of finished training sections that no later section needs: a 2.3B-dims
    checkpoint with Adam state is ~4-5 GB, and the machine's disk is not sized for one per section."""
    needed = {s.needs for s in sections[done + 1:]}
    for s in sections[: done + 1]:
        if s.kind == "train" and s.artifact and s.name not in needed:
            shutil.rmtree(out / s.artifact / "checkpoints", ignore_errors=True)


def run_sections(sections: list[Section], out: Path, budget_s: float, env: dict,
                 clock: Callable[[], float] = time.monotonic,
                 on_result: Optional[Callable[[list[Result]], None]] = None) -> list[Result]:
    """Run the sections in order within ``budget_s`` seconds in all; never stops at a failure."""
    deadline = clock() + budget_s
    results: list[Result] = []
    by_name: dict[str, Result] = {}
    for index, section in enumerate(sections):
        left = deadline - clock()
        needed = by_name.get(section.needs) if section.needs else None
        if section.skip is not None:
            result = Result(section.name, "skipped", reason=section.skip)
        elif section.needs and (needed is None or needed.status != "ok"):
            result = Result(section.name, "skipped", reason=f"needs {section.needs}, which "
                                                            f"{needed.status if needed else 'did not run'}")
        elif left < MIN_START_S:
            result = Result(section.name, "skipped", reason=f"out of time ({max(left, 0):.0f} s of the "
                                                            f"{budget_s:.0f} s budget left)")
        else:
            result = run_one(section, out, min(section.timeout_s, left))
            result.figures = read_figures(section, out)
            if result.status == "ok" and section.kind == "pytest" and (
                    result.figures.get("failures") or result.figures.get("errors")):
                result.status, result.reason = "failed", "junit reports failures"
            figures_of = {r.name: r.figures for r in results}
            failed_checks = check_section(section, result.figures, out, figures_of)
            if failed_checks:
                result.reason = "; ".join(([result.reason] if result.reason else []) + failed_checks)[:1000]
                if result.status == "ok":
                    result.status = "failed"
            elif section.checks and result.status == "ok":
                result.figures["checked"] = list(section.checks)
        print(format_row(result), flush=True)
        results.append(result)
        by_name[section.name] = result
        prune_checkpoints(sections, index, out)
        if on_result is not None:
            on_result(results)
    return results


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
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
    if "models" in f:
        ran = [m for m in f["models"] if "error" not in m]
        return f"{len(ran)}/{len(f['models'])} model cases, {len(f['kernels'])} kernel rows"
    return f.get("unreadable", "")


def format_row(result: Result) -> str:
    detail = result.reason if result.status != "ok" else _summary(result)
    return f"| {result.name} | {result.status} | {result.seconds:.0f} | {detail.replace('|', '/')} |"


def write_report(out: Path, env: dict, results: list[Result], budget_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"env": env, "budget_s": budget_s, "sections": [dataclasses.asdict(r) for r in results]}
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# GPU check", ""]
    lines += [f"- {k}: {v['info'] if isinstance(v, dict) else v}" for k, v in env.items()]
    lines += ["", "| section | status | s | result |", "|---|---|---|---|"]
    lines += [format_row(r) for r in results]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def exit_status(results: list[Result]) -> int:
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"))
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
    env = probe_environment(python)
    install = out / "install.txt"
    if install.exists():
        env["installed_wheels"] = {"ok": True, "info": install.read_text().strip()}
    sections = plan(out, python, env, layers=args.layers, seq=args.seq, steps=args.steps)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in sections}
        if unknown:
            print(f"gpu_check: unknown section(s) {', '.join(sorted(unknown))}; known: "
                  f"{', '.join(s.name for s in sections)}", file=sys.stderr)
            return 2
        sections = [s for s in sections if s.name in wanted]
    if args.dry_list:
        for s in sections:
            state = f"skip: {s.skip}" if s.skip else f"run (limit {s.timeout_s:.0f} s)"
            print(f"{s.name}: {state}\n    {' '.join(s.argv)}")
        return 0
    for key, value in env.items():
        print(f"[env] {key}: {value['info']}", flush=True)
    results = run_sections(sections, out, args.budget, env,
                           on_result=lambda rs: write_report(out, env, rs, args.budget))
    write_report(out, env, results, args.budget)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
