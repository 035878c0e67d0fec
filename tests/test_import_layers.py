"""The one-way import rule (docs/architecture.md, "Layers"): a module may import the package's own
modules only from its own layer or a lower one. Checked on the source (every ``import`` and
``from ... import`` statement, including the ones inside functions), so a reversed import fails here
whatever code path would have reached it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rexmoe_train"
# top-level folders shipped inside the package (pyproject's package-dir): folder -> package name
MAPPED = {"configs": "rexmoe_train.configs", "kernels": "rexmoe_train.kernels"}

# lower number = lower layer. core/platform: torch only; compat: the megatron CPU layer; config:
# typed configs; kernels/data: tensors and datasets; parallel -> model: megatron building blocks;
# checkpoint, training: the run; convert, tools: what the entry points use; cli: the entry points.
LAYERS = {
    "core": 0, "platform": 0, "threads": 0, "exit_codes": 0,
    "compat": 1,
    "config": 2, "configs": 2,
    "kernels": 3, "data": 3,
    "parallel": 4,
    "model": 5,
    "checkpoint": 6, "resilience": 6,
    "training": 7,
    "convert": 8, "tools": 8, "plan": 8,
    "cli": 9,
}


def _unit(module: str) -> str:
    """rexmoe_train.<unit>[.rest] -> unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "rexmoe_train":  # `from rexmoe_train import compat, platform`
                out += [(node.lineno, f"rexmoe_train.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, target))
    return [(line, name) for line, name in out if name.startswith("rexmoe_train.")]


def _modules():
    """(path, dotted module) for every source file of the package, the mapped top-level folders included."""
    roots = [(PACKAGE, "rexmoe_train")]
    if PACKAGE.parent == REPO:  # not the checker's own fake package
        roots += [(REPO / folder, name) for folder, name in MAPPED.items()]
    for root, name in roots:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield path, ".".join((name, *parts))


def _violations() -> list[str]:
    bad = []
    for path, module in _modules():
        unit = _unit(module)
        if unit == "":
            continue  # rexmoe_train/__init__.py imports nothing of its own
        assert unit in LAYERS, f"{path}: {unit!r} has no layer; add it to LAYERS (and to docs/architecture.md)"
        for line, target in _imports(path, module):
            other = _unit(target)
            assert other in LAYERS, f"{path}:{line}: imports {target}, whose {other!r} has no layer"
            if LAYERS[other] > LAYERS[unit]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} (layer {LAYERS[unit]}) "
                           f"imports {target} (layer {LAYERS[other]})")
    return bad


def test_imports_run_one_way():
    assert _violations() == []


def test_the_check_catches_a_reversed_import(tmp_path, monkeypatch):
    """The checker itself: a core module importing the model is reported."""
    fake = tmp_path / "rexmoe_train"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from rexmoe_train.model import gpt\n")
    (fake / "core" / "fine.py").write_text("from rexmoe_train.core import errors\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = _violations()
    assert len(found) == 1 and "core/bad.py:2" in found[0] and "rexmoe_train.model" in found[0]


@pytest.mark.parametrize("modules", ["rexmoe_train.core", "rexmoe_train.config",
                                     "rexmoe_train.core.reuse, rexmoe_train.core.psr, rexmoe_train.core.gating, "
                                     "rexmoe_train.core.placement, rexmoe_train.core.flops, "
                                     "rexmoe_train.config.schema"])
def test_core_and_config_import_no_megatron_and_patch_nothing(modules):
    code = (
        "import sys, torch\n"
        "before = (torch.zeros, torch.Tensor.to, torch.cuda.current_device)\n"
        f"import {modules}\n"
        "after = (torch.zeros, torch.Tensor.to, torch.cuda.current_device)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'hydra', 'wandb'))\n"
        "assert not loaded, loaded\n"
        "assert before == after, 'importing patched torch'\n"
        "from rexmoe_train import compat\n"
        "assert not compat.installed()\n"
        "print('clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "clean", proc.stderr[-2000:]


def test_megatron_facing_packages_refuse_without_the_compat_layer():
    code = (
        "from rexmoe_train import platform\n"
        "try:\n"
        "    import rexmoe_train.model.gpt\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("CompatError call rexmoe_train.compat.install()"), proc.stdout
