"""The questions the rest of the code would otherwise branch on: is there a GPU, which device, which
process-group backend, which default dtype, which TransformerConfig values the platform forces, and
whether Transformer Engine / compiled Triton can run here.

Torch-only and side-effect free: importing it patches nothing. The megatron-core CPU compatibility
layer lives in :mod:`rexmoe_train.compat.megatron_cpu` and is installed explicitly by the entry
points, the test conftest and the benches.
"""

from __future__ import annotations

import os
from typing import Any

import torch

HAS_CUDA: bool = torch.cuda.is_available()
_CPU = torch.device("cpu")
# Test seam (tests/devicecheck): the strict-device harness runs the CPU build as if it were on a GPU,
# whose tensors carry this label as their device. None: the machine decides.
_device_override: torch.device | None = None


def set_device_override(label: torch.device | None) -> None:
    """For the strict-device test harness only: make :func:`device` answer ``label`` and the RNG
    state include the "device" generator (``torch.cuda.get_rng_state``, which the harness maps).
    Everything else (backend, dtype, kernels, TE) keeps answering for the real machine."""
    global _device_override
    _device_override = None if label is None else torch.device(label)


def _on_device() -> bool:
    return HAS_CUDA or _device_override is not None


# --------------------------------------------------------------------------------------------------
# Questions the rest of the code asks
# --------------------------------------------------------------------------------------------------
def device() -> torch.device:
    """The device this process computes on (its local GPU, or the CPU)."""
    if _device_override is not None:
        return _device_override
    if HAS_CUDA:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return _CPU


def dist_backend() -> str:
    return "nccl" if HAS_CUDA else "gloo"


def default_dtype() -> torch.dtype:
    """bf16 on GPUs (what the paper trained in); fp32 on CPU, where bf16 matmuls are ~7x slower."""
    return torch.bfloat16 if HAS_CUDA else torch.float32


def transformer_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields this platform forces.

    On gloo, ``batch_p2p_comm=True`` silently swaps activations and gradients when pp=2 (prev and
    next peer are the same rank and gloo matches same-shape isends by posting order). The
    non-batched path is correct everywhere, so CPU runs always use it.
    """
    if HAS_CUDA:
        return {}
    return {"batch_p2p_comm": False, "gradient_accumulation_fusion": False}


def max_memory_allocated_bytes() -> int:
    """Peak accelerator memory of this process (CPU: peak resident set size)."""
    if HAS_CUDA:
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def get_rng_state() -> dict[str, Any]:
    """The process's RNG states for a checkpoint: the CPU generator, and the GPU's when there is one."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if _on_device():
        state["cuda"] = torch.cuda.get_rng_state(device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if _on_device() and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device())


def has_triton_gpu() -> bool:
    """True when custom Triton kernels can run compiled on the local GPU (CUDA present and triton
    importable). Without it the kernels in kernels/ fall back to their torch references
    (the Triton interpreter is a test tool, far too slow for training)."""
    if not HAS_CUDA:
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def has_transformer_engine() -> bool:
    """True when Transformer Engine's pytorch module imports AND a GPU is present: TE cannot run
    (and on most installs cannot even import) without CUDA, so CPU machines always answer False."""
    if not HAS_CUDA:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a CUDA/driver mismatch raised at import
        return False
    return True


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name(device())
    return "cpu"
