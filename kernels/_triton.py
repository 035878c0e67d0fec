"""Guarded Triton import and the torch-vs-Triton choice every kernel makes.

Triton is optional: CPU-only installs may not have it, and nothing in the package may fail to import
because of that. Kernel bodies are plain functions wrapped by :func:`jit`, which only calls
``triton.jit`` at the first launch. Whether to *use* a kernel is the platform's answer
(``platform.has_triton_gpu()``): this module never asks CUDA itself. Tests force ``impl="triton"`` and
run the kernels through the interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # ImportError, or a broken install (missing libcuda stubs, ...)
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False

IMPLS = ("auto", "torch", "triton")


class _LazyKernel:
    """``triton.jit`` applied at first launch, once per interpreter mode.

    Why lazy: triton decides compiled-vs-interpreted when a function is DECORATED, from
    ``TRITON_INTERPRET``. Decorating at launch lets a test switch the interpreter on for its own
    duration (``monkeypatch.setenv``) instead of for the whole process. (triton.language's own
    helpers, tl.max/tl.sum..., are decorated when triton is first imported, so that import must also
    happen with the variable set: tests/conftest.py does it first thing on CUDA-less machines.)"""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self._by_mode: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Any:
        mode = interpreting()
        if mode not in self._by_mode:
            self._by_mode[mode] = triton.jit(self.fn)
        return self._by_mode[mode][grid]


def interpreting() -> bool:
    """Whether ``triton.jit`` decorates for the interpreter now. Triton >= 3.4 answers through
    ``triton.knobs``; 3.2 / 3.3 (shipped with torch builds pyproject's torch range admits) have no
    knobs and read ``TRITON_INTERPRET`` from the environment when a function is decorated."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit(fn: Any) -> Any:
    """Lazy ``triton.jit`` (see _LazyKernel); the plain function when triton is absent (never called)."""
    return _LazyKernel(fn) if HAVE_TRITON else fn


def use_triton(impl: str) -> bool:
    """Resolve ``impl``: "auto" is Triton exactly when the platform says a Triton GPU is present."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("impl='triton' but triton is not importable (pip install triton)")
        return True
    from rexmoe_train import platform

    return HAVE_TRITON and platform.has_triton_gpu()


#: Debug aid (tests set it): fill kernel output buffers with NaN / a negative sentinel before the
#: launch, so any element a kernel forgets to write shows up instead of passing by luck.
POISON_OUTPUTS = False


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (uninitialised, or poisoned when POISON_OUTPUTS is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else (-7 if dtype != torch.uint8 else 7))
    return out


def next_pow2(n: int) -> int:
    """Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()
