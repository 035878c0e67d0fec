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
    found = {"rexmoe_train"} | {
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
