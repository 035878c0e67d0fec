"""ReXMoE-train: Megatron-Core pretraining for ReXMoE (cross-layer expert reuse with progressive
scaling routing). Importing the package is cheap; subpackages that use megatron install the CPU
compatibility layer (``rexmoe_train.platform``) before importing it."""

import importlib.machinery as _machinery
import os as _os
import sys as _sys

__version__ = "0.1.0"

# configs/ and kernels/ live at the top of the source tree and are this package's ``configs`` and
# ``kernels`` (pyproject's package-dir): a wheel copies them in and an editable install maps them. A
# checkout used straight from PYTHONPATH (e.g. bench/gpu_check.sh on a bare GPU machine) has neither,
# so the same two names are mapped here, only when the package itself lacks them. (kernels/ has no
# __init__.py: with the checkout's root on sys.path, as under `python -m pytest`, a regular package
# there would shadow the PyPI package `kernels` that transformers imports; a namespace portion does not.)
_TREE = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_TOP_LEVEL = (f"{__name__}.configs", f"{__name__}.kernels")


class _SourceTreeFinder:
    @staticmethod
    def find_spec(fullname, path=None, target=None):
        # the tree's root as the search path: the spec keeps the full name (a regular package for
        # configs/, a namespace package for kernels/)
        return _machinery.PathFinder.find_spec(fullname, [_TREE]) if fullname in _TOP_LEVEL else None


if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "configs")):
    _sys.meta_path.append(_SourceTreeFinder())
