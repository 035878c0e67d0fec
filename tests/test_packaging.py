"""The wheel's package list (pyproject.toml) covers the tree: configs/ and kernels/ are the one home of
the Hydra YAML and the Triton kernels, mapped into the package by setuptools' package-dir, and every
sub-package of rexmoe_train/ is listed (a new one left out would be missing from the wheel only)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def _setuptools():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    listed = set(_setuptools()["packages"])
    found = {"rexmoe_train"} | {  # kernels/ has no __init__.py (see the test below); configs/ has
        "rexmoe_train." + ".".join(p.parent.relative_to(REPO / "rexmoe_train").parts)
        for p in (REPO / "rexmoe_train").rglob("__init__.py") if p.parent != REPO / "rexmoe_train"
    }
    mapped = set(_setuptools()["package-dir"]) - {""}
    assert found | mapped == listed


def test_top_level_folders_are_the_packages():
    mapping = _setuptools()["package-dir"]
    assert mapping["rexmoe_train.configs"] == "configs" and mapping["rexmoe_train.kernels"] == "kernels"
    assert not (REPO / "rexmoe_train" / "configs").exists() and not (REPO / "rexmoe_train" / "kernels").exists()
    # the installed package resolves to the top-level folders (editable install) or a copy of them (wheel)
    assert files("rexmoe_train.configs").joinpath("model", "tiny.yaml").is_file()
    assert files("rexmoe_train.kernels").joinpath("fused_router.py").is_file()
    yaml = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    patterns = _setuptools_data()
    assert all(any(Path(y).match(pat) for pat in patterns) for y in yaml), "a YAML file the wheel would miss"


def _setuptools_data():
    return _setuptools()["package-data"]["rexmoe_train.configs"]


def test_a_checkout_on_pythonpath_finds_the_top_level_folders(tmp_path):
    """No install at all (``python -S``: no site-packages, so no editable finder), the checkout first
    on sys.path, as bench/gpu_check.sh runs on a bare GPU machine: the package maps configs/ and
    kernels/ itself, under their package names."""
    import subprocess
    import sys

    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "import importlib.util, importlib.resources as r\n"
        "import rexmoe_train.configs as c\n"
        "assert c.__name__ == 'rexmoe_train.configs', c.__name__\n"
        "assert r.files('rexmoe_train.configs').joinpath('model', 'tiny.yaml').is_file()\n"
        "spec = importlib.util.find_spec('rexmoe_train.kernels._triton')\n"
        f"assert spec.origin == {str(REPO / 'kernels' / '_triton.py')!r}, spec.origin\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_kernels_folder_does_not_shadow_the_pypi_package_of_that_name(tmp_path):
    """transformers depends on the PyPI package ``kernels``; ``python -m pytest`` (and any ``python -m``)
    from the checkout's root puts that root first on sys.path. kernels/ therefore holds no __init__.py: a
    namespace portion loses to a regular package anywhere on the path, so ``import kernels`` still finds
    the installed one. (A fake one stands in for it here, so the test does not depend on transformers.)"""
    import subprocess
    import sys

    assert not (REPO / "kernels" / "__init__.py").exists()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    code = "import kernels, rexmoe_train.kernels._triton as t\nprint(kernels.WHO, t.__file__)\n"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    who, triton_module = proc.stdout.split()
    assert who == "installed" and triton_module == str(REPO / "kernels" / "_triton.py")
