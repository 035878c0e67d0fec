"""In-process probes of the GPU check kit (bench/gpu_check.py runs each in its own process):

    python bench/gpu_check_probes.py placement RESULT.json KEY=VALUE ...   # the train overrides
    python bench/gpu_check_probes.py te RECIPE RESULT.json KEY=VALUE ...   # RECIPE: none | delayed | ...

``placement``: builds the Trainer (bf16: Float16Module) and runs one optimizer step of 2 micro-batches,
then lists every parameter, grad, main_grad, buffer and optimizer state tensor not on the GPU, and the
routers' step counts (they must stay float64 and exact: tokens x top-k, dropless).
``te``: the Transformer Engine bank trained N steps in bf16, then (RECIPE != none) the same N steps from
the same seed in fp8 ``hybrid`` with RECIPE; records each run's losses, how many modules are Transformer
Engine's and how many ran in fp8. bench/gpu_check.py's CHECKS assert on the JSON written.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Optional

FP8_LOSS_RTOL = 0.03  # fp8 loss after TE_STEPS steps within 3 % of the bf16 run's (same seed, same data)
TE_STEPS = 4
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# What this machine has (each probe in a subprocess: a broken TE build may crash its importer)
# --------------------------------------------------------------------------------------------------
def _probe(python: str, code: str, timeout: float = 120) -> tuple[bool, str]:
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=REPO_DIR)
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
        "gpus": "import torch; print(torch.cuda.device_count())",
        "numpy": "import numpy; print(numpy.__version__)",
        "grouped_gemm_option": ("import dataclasses; from rexmoe_train.config.schema import ExperimentConfig; "
                                "names = {f.name for f in dataclasses.fields(ExperimentConfig().model)}; "
                                "print('yes' if 'moe_grouped_gemm' in names else "
                                "'no: model.moe_grouped_gemm is not in the config schema')"),
    }.items():
        ok, line = _probe(python, code)
        env[key] = {"ok": ok and not line.startswith("no:"), "info": line}
    return env



def _trainer(overrides: list[str]):
    from rexmoe_train import compat
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.training.trainer import Trainer

    compat.reset_megatron_global_state()
    return Trainer(compose_experiment(overrides).experiment.validate(1))


def _optimizer_tensors(optimizer: Any):
    for i, sub in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = getattr(sub, "optimizer", sub)
        if inner is None:
            continue
        for group in inner.param_groups:
            for k, p in enumerate(group["params"]):
                yield f"optimizer[{i}].param[{k}]", p, False
                for key, value in inner.state.get(p, {}).items():
                    yield f"optimizer[{i}].param[{k}].{key}", value, key == "step"  # Adam's step: CPU ok


def probe_placement(overrides: list[str]) -> dict:
    import torch

    trainer = _trainer(overrides)
    trainer.train_step()
    off, checked = [], 0

    def visit(name: str, t: Any, scalar_ok: bool = False) -> None:
        nonlocal checked
        if isinstance(t, torch.Tensor):
            checked += 1
            if not t.is_cuda and not (scalar_ok and t.dim() == 0):
                off.append(f"{name} {tuple(t.shape)} {t.dtype} on {t.device}")

    for c, chunk in enumerate(trainer.chunks):
        for name, p in chunk.named_parameters():
            visit(f"chunk{c}.{name}", p)
            visit(f"chunk{c}.{name}.grad", p.grad)
            visit(f"chunk{c}.{name}.main_grad", getattr(p, "main_grad", None))
        for name, b in chunk.named_buffers():
            visit(f"chunk{c}.{name}", b)
    for name, t, scalar_ok in _optimizer_tensors(trainer.optimizer):
        visit(name, t, scalar_ok)
    cfg = trainer.cfg
    expected = cfg.train.global_batch_size * cfg.train.seq_length * cfg.model.moe_router_topk
    routers = [{"step_load_dtype": str(r.step_load.dtype), "weight_dtype": str(r.weight.dtype),
                "counted": float(r.step_load.sum()), "expected": expected} for r in trainer.routers]
    return {"checked": checked, "off_device": off[:16], "routers": routers}


def _te_counts(trainer) -> tuple[int, int]:
    te = [m for c in trainer.chunks for m in c.modules() if type(m).__module__.startswith("transformer_engine")]
    return len(te), sum(1 for m in te if getattr(m, "fp8", False) is True)


def probe_te(recipe: str, overrides: list[str], steps: int) -> dict:
    out: dict = {"recipe": recipe, "steps": steps}
    runs = [("bf16", [])] + ([] if recipe == "none" else [("fp8", ["train.fp8=hybrid", f"train.fp8_recipe={recipe}"])])
    for name, extra in runs:
        trainer = _trainer([*overrides, *extra])
        losses = [trainer.train_step().get("loss") for _ in range(steps)]
        te_modules, fp8_modules = _te_counts(trainer)
        out[name] = {"losses": losses, "te_modules": te_modules, "fp8_modules": fp8_modules}
        del trainer
    return out


# ------------------------------------------------------------------------------------------------
# What the probes claim, asserted by bench/gpu_check.py on the JSON: None when it holds, else why not
# ------------------------------------------------------------------------------------------------
def check_on_device(f: dict) -> Optional[str]:
    if f.get("checked") and not f.get("off_device"):
        return None
    return f"{len(f.get('off_device') or [])} tensor(s) not on the GPU (of {f.get('checked')}): {f.get('off_device')}"


def check_bf16_counts(f: dict) -> Optional[str]:
    routers = f.get("routers") or []
    if not routers:
        return "no router reported its step counts"
    bad = [r for r in routers if r["step_load_dtype"] != "torch.float64" or r["counted"] != r["expected"]]
    if bad:
        return f"{len(bad)} router(s) with inexact step counts, e.g. {bad[0]}"
    if any(r["weight_dtype"] != "torch.bfloat16" for r in routers):
        return f"the model was not bf16 (router weight {routers[0]['weight_dtype']}): counts not tested under bf16"
    return None


def _losses(f: dict, run: str) -> list:
    return (f.get(run) or {}).get("losses") or []


def check_te_used(f: dict) -> Optional[str]:
    runs = [run for run in ("bf16", "fp8") if run in f]
    if runs and all((f[run] or {}).get("te_modules", 0) > 0 for run in runs):
        return None
    return "no Transformer Engine module in the model (the TE bank / layers were not used)"


def check_fp8_used(f: dict) -> Optional[str]:
    return None if (f.get("fp8") or {}).get("fp8_modules", 0) > 0 else "no Transformer Engine module ran in fp8"


def check_fp8_close(f: dict) -> Optional[str]:
    """The fp8 run's loss after TE_STEPS steps within FP8_LOSS_RTOL of the bf16 run's."""
    ref, got = _losses(f, "bf16")[-1:] or [None], _losses(f, "fp8")[-1:] or [None]
    if ref[0] is None or got[0] is None or not math.isfinite(ref[0]) or not math.isfinite(got[0]):
        return f"no finite last loss (bf16 {ref[0]}, fp8 {got[0]})"
    if abs(got[0] - ref[0]) > FP8_LOSS_RTOL * abs(ref[0]):
        return (f"fp8 loss {got[0]:.4f} after {len(_losses(f, 'fp8'))} steps is not within {FP8_LOSS_RTOL:.0%} "
                f"of bf16's {ref[0]:.4f}")
    return None


def check_probe_finite(f: dict) -> Optional[str]:
    losses = _losses(f, "bf16")
    return None if losses and all(x is not None and math.isfinite(x) for x in losses) else "no finite loss logged"


PROBE_CHECKS: dict[str, Callable[[dict], Optional[str]]] = {
    "on_device": check_on_device, "bf16_counts": check_bf16_counts, "te_used": check_te_used,
    "fp8_used": check_fp8_used, "fp8_close": check_fp8_close, "probe_finite": check_probe_finite}


def main(argv: list[str]) -> int:
    if argv[0] == "placement":
        result = probe_placement(argv[2:])
        path = argv[1]
    elif argv[0] == "te":
        steps = next((int(a.split("=", 1)[1]) for a in argv[3:] if a.startswith("train.train_iters=")), TE_STEPS)
        result, path = probe_te(argv[1], argv[3:], steps), argv[2]
    else:
        print(f"gpu_check_probes: unknown probe {argv[0]!r}; known: placement, te", file=sys.stderr)
        return 2
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    from rexmoe_train.cli import train  # noqa: F401 - first: it sets the OpenMP wait policy before torch

    importlib.import_module("rexmoe_train.compat").install()  # as rexmoe-train does, before megatron
    sys.exit(main(sys.argv[1:]))
