"""The megatron-core CPU compatibility layer, in one module. With CUDA present it installs only the
version check, ``torch.cuda.set_device`` and the two megatron fixes every device needs
(:func:`_patch_megatron_any_device`: the TE-less ``te_general_gemm`` NameError and the torch norm
under sequence parallelism).

megatron-core 0.16 assumes CUDA throughout: ~175 ``torch.cuda.current_device()`` calls, CUDA
streams/events in the alltoall dispatcher, a CUDA RNG tracker, ``device="cuda"`` literals in the
optimizer and schedules, and parameter classification by ``'torch.cuda.FloatTensor'`` type strings.
On a CPU-only machine (CI, laptops) :func:`install` makes those entry points behave as their CPU
equivalents, so the *real* megatron code paths (parallel_state, DDP, optimizers, pipeline schedules,
dispatchers, dist_checkpointing) run over gloo.

Nothing here happens on import. The entry points (``rexmoe_train.cli.*``), the test conftest and the
benches call :func:`install` before the first ``import megatron.core`` (some megatron modules bind
``torch.cuda`` names at import time); the library's megatron-facing packages call
:func:`require_installed`, which fails in one line instead of deep inside megatron.

Every replacement goes through :func:`_replace`, which refuses a target that does not exist: a
megatron (or torch) release that renames one fails loudly at install instead of silently growing an
unused attribute. :func:`patched_targets` lists what was replaced (tests/compat checks the list).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
from typing import Any

import torch

from rexmoe_train.platform import HAS_CUDA, device

# The megatron-core releases this layer (and the subclasses in model/ and parallel/) was written
# against. pyproject.toml pins the same range.
MEGATRON_CORE_MIN = (0, 16, 1)
MEGATRON_CORE_BELOW = (0, 17, 0)

_CPU = torch.device("cpu")
_INSTALLED = False
_PATCHED: list[str] = []  # "owner.name" of every replaced attribute, in install order
_DEFINED: list[str] = []  # names megatron leaves undefined without TE, defined as None


class CompatError(RuntimeError):
    """The compatibility layer cannot be installed (or was not). One line."""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_megatron_version(version: str | None = None) -> str:
    """The installed megatron-core version, or CompatError (one line) outside the supported range."""
    if version is None:
        try:
            version = importlib.metadata.version("megatron-core")
        except importlib.metadata.PackageNotFoundError:
            raise CompatError("megatron-core is not installed (pip install 'megatron-core>=0.16.1,<0.17')") from None
    if not MEGATRON_CORE_MIN <= _version_tuple(version) < MEGATRON_CORE_BELOW:
        raise CompatError(
            f"megatron-core {version} is not supported: rexmoe-train needs >=0.16.1,<0.17 "
            "(pip install 'megatron-core>=0.16.1,<0.17')")
    return version


def installed() -> bool:
    return _INSTALLED


def require_installed() -> None:
    """Called at the top of the library's megatron-facing packages."""
    if not _INSTALLED:
        raise CompatError(
            "call rexmoe_train.compat.install() before importing rexmoe_train's model, parallel, "
            "checkpoint or training code (the entry points, tests and benches do)")


def patched_targets() -> list[str]:
    return list(_PATCHED)


def defined_targets() -> list[str]:
    return list(_DEFINED)


def _owner_name(owner: Any) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return getattr(owner, "__name__", type(owner).__name__)


def _replace(owner: Any, name: str, value: Any) -> None:
    label = f"{_owner_name(owner)}.{name}"
    if not hasattr(owner, name):
        raise CompatError(f"compat: {label} does not exist in this torch/megatron-core release; "
                          "rexmoe_train.compat.megatron_cpu needs updating")
    setattr(owner, name, value)
    _PATCHED.append(label)


def _eager_compile(model: Any = None, **_options: Any) -> Any:
    """torch.compile's signature, eager: the function itself (or, as a bare decorator factory, a
    decorator returning it)."""
    return model if model is not None else (lambda fn: fn)


def install() -> None:
    """Install the layer (idempotent). With CUDA: check the version, select the local GPU and fix
    megatron's device-independent defects; nothing of torch.cuda is replaced."""
    global _INSTALLED
    if _INSTALLED:
        return
    check_megatron_version()
    if HAS_CUDA:
        local, visible = device(), torch.cuda.device_count()
        if local.index >= visible:  # else set_device fails later with a bare "invalid device ordinal"
            raise CompatError(
                f"LOCAL_RANK={local.index} but this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {visible} processes per node")
        torch.cuda.set_device(local)
        # megatron's own defects hit GPUs too (TE-less MoE NameError, torch norm vs SP): not CPU-only
        _patch_megatron_any_device()
        _INSTALLED = True
        return
    # Without TE/Apex megatron warns at import that it falls back to torch implementations: expected
    # on every CPU machine, so not worth a screen of output per process.
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
    # A CUDA build of torch on a machine without a GPU but with a CUDA toolkit (CUDA_HOME / nvcc):
    # megatron imports torch.utils.cpp_extension, which logs "No CUDA runtime is found, using
    # CUDA_HOME=..." once per process, a stray second line after a one-line error. Expected here.
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not record.getMessage().startswith("No CUDA runtime is found"))
    # megatron.core.jit.jit_fuser is torch.compile: on CPU the first call of each fused helper spends
    # ~15 s compiling C++ with inductor. Eager gives the same numbers. torch.compile is replaced by an
    # eager pass-through (megatron binds it at import, hence before the first megatron import) rather
    # than switched off in dynamo's config: importing torch._dynamo (sympy, networkx, triton's front
    # end) costs ~2 s of CPU in every process, about half of megatron-core's import.
    _replace(torch, "compile", _eager_compile)
    if "torch._dynamo" in sys.modules:  # imported already (e.g. by the planner's fake tensors)
        sys.modules["torch._dynamo"].config.disable = True
    _patch_torch_cuda_namespace()
    _patch_device_literals()
    _patch_tensor_type_strings()
    _patch_gloo_uneven_collectives()
    _patch_megatron()
    _INSTALLED = True


class _NoopEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _NoopStream:
    """CPU work is synchronous: every stream is the same stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _NoopEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    # The alltoall dispatcher tests `current_stream() != self.cuda_dtoh_stream` to decide whether to
    # synchronise; all no-op streams compare equal so it never waits.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NoopStream)

    def __hash__(self) -> int:
        return 0


_THE_STREAM = _NoopStream()


def _patch_torch_cuda_namespace() -> None:
    c = torch.cuda
    replacements = {
        "current_device": lambda: _CPU,
        "set_device": lambda *a, **k: None,
        "device_count": lambda: 0,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "Stream": _NoopStream,
        "ExternalStream": _NoopStream,
        "Event": _NoopEvent,
        "current_stream": lambda *a, **k: _THE_STREAM,
        "default_stream": lambda *a, **k: _THE_STREAM,
        "stream": lambda s=None: contextlib.nullcontext(),
        "set_stream": lambda s: None,
        # megatron's CudaRNGStatesTracker forks "CUDA" RNG states for tensor-parallel and
        # expert-parallel init/dropout. Mapping them onto the CPU generator keeps the fork real.
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        # torch.manual_seed calls torch.cuda.manual_seed_all: it must not recurse into the CPU seed.
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "memory_stats": lambda *a, **k: {},
    }
    for name, value in replacements.items():
        _replace(c, name, value)
    _replace(c.nvtx, "range_push", lambda *a, **k: None)
    _replace(c.nvtx, "range_pop", lambda *a, **k: None)
    _replace(c.nvtx, "range", lambda *a, **k: contextlib.nullcontext())
    _replace(torch.Tensor, "cuda", lambda self, *a, **k: self)
    _replace(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    _replace(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    original_record_stream = torch.Tensor.record_stream

    def record_stream(self: torch.Tensor, stream: Any) -> None:
        if isinstance(stream, _NoopStream):
            return None
        return original_record_stream(self, stream)

    _replace(torch.Tensor, "record_stream", record_stream)


def _to_cpu_device(d: Any) -> Any:
    if isinstance(d, str) and d.startswith("cuda"):
        return _CPU
    if isinstance(d, torch.device) and d.type == "cuda":
        return _CPU
    if isinstance(d, int) and not isinstance(d, bool):  # megatron passes current_device() ints
        return _CPU
    return d


_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "randperm", "linspace", "eye", "empty_strided", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like",
)


def _patch_device_literals() -> None:
    """About 50 megatron call sites create tensors with a literal ``device="cuda"``."""
    # `with torch.device("meta"):` (used by transformers to build models before loading weights)
    # recognises factory calls by identity against a set it caches on first use. Fill that cache with
    # the real functions before wrapping them; otherwise the wrapped calls escape the device context
    # and, e.g., transformers' RoPE buffers end up uninitialised.
    import torch.utils._device

    torch.utils._device._device_constructors()

    def wrap(fn: Any) -> Any:
        def factory(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)
            return fn(*args, **kwargs)

        factory.__wrapped__ = fn  # type: ignore[attr-defined]
        factory.__name__ = getattr(fn, "__name__", "factory")
        return factory

    for name in _FACTORIES:
        _replace(torch, name, wrap(getattr(torch, name)))

    original_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)):
            args = (_to_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return original_to(self, *args, **kwargs)

    _replace(torch.Tensor, "to", to)
    for name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
        original = getattr(torch.Tensor, name)

        def method(self: torch.Tensor, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return __original(self, *args, **kwargs)

        _replace(torch.Tensor, name, method)


def _patch_tensor_type_strings() -> None:
    """megatron's optimizers classify parameters by ``param.type() == 'torch.cuda.FloatTensor'``
    (clip_grads, Float16Optimizer, DistributedOptimizer). Report CPU tensors by their CUDA name."""
    original_type = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs:
            name = original_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch."):]
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    _replace(torch.Tensor, "type", type_)


def _patch_gloo_uneven_collectives() -> None:
    """With expert_tensor_parallel_size > 1 the alltoall dispatcher all-gathers / reduce-scatters
    unevenly sized tensor lists. NCCL accepts that; gloo rejects it. Emulate: pad + all_gather + slice,
    and all_reduce + slice."""
    import torch.distributed as dist

    original_all_gather = dist.all_gather
    original_reduce_scatter = dist.reduce_scatter

    def all_gather(tensor_list: list, tensor: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
        if len({tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}) == 1:
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)

        def padded(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((rows,) + tuple(t.shape[1:]))
            out[: t.shape[0]] = t
            return out

        buffers = [padded(t) for t in tensor_list]
        original_all_gather(buffers, padded(tensor.contiguous()), group=group)
        for dst, src in zip(tensor_list, buffers):
            dst.copy_(src[: dst.shape[0]])
        return None

    def reduce_scatter(output: torch.Tensor, input_list: list, op: Any = dist.ReduceOp.SUM,
                       group: Any = None, async_op: bool = False) -> Any:
        if len({tuple(t.shape) for t in input_list} | {tuple(output.shape)}) == 1:
            return original_reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        full = torch.cat([t.reshape(t.shape[0], -1) for t in input_list], dim=0)
        dist.all_reduce(full, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.shape[0] for t in input_list[:rank])
        output.copy_(full[start : start + input_list[rank].shape[0]].view_as(output))
        return None

    _replace(dist, "all_gather", all_gather)
    _replace(dist, "reduce_scatter", reduce_scatter)


def _patch_megatron() -> None:
    """Fixes inside megatron-core itself for CPU runs. Imports megatron, so it runs after the torch
    patches; ends with the fixes every device needs (:func:`_patch_megatron_any_device`)."""
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The private CUDA RNG get/set use torch.cuda._lazy_call, which silently does nothing on CPU.
    def get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    _replace(mrandom, "_get_cuda_rng_state", get_rng_state)
    _replace(mrandom, "_set_cuda_rng_state", set_rng_state)

    class _DropExpectedRngWarning(logging.Filter):
        # With the "CUDA" RNG mapped onto the CPU RNG, CPU state changing inside a fork is expected.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mrandom.__name__).addFilter(_DropExpectedRngWarning())

    # The alltoall dispatcher converts split sizes to numpy only for CUDA tensors; torch 2.13's
    # all_to_all_single binding rejects CPU tensors as split sizes.
    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    _replace(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    _replace(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)

    # Belt and braces for the gloo p2p ordering bug (see transformer_config_overrides): route the
    # batched p2p path through megatron's ordered one even if a config forgets batch_p2p_comm=False.
    def batched_as_ordered(**kwargs: Any) -> list:
        return list(p2p_communication._p2p_ops(**kwargs).values())

    _replace(p2p_communication, "_batched_p2p_ops", batched_as_ordered)
    _patch_megatron_any_device()


def _patch_megatron_any_device() -> None:
    """megatron-core 0.16.1 defects that are not about the CPU: installed with and without CUDA."""
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import moe_utils

    # Without Transformer Engine, moe_utils never defines te_general_gemm (and friends) but the router
    # gating reads it unconditionally (NameError in every MoE forward). None selects the torch path.
    if not getattr(moe_utils, "HAVE_TE", False):
        for name in (
            "te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss",
            "fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
            "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
            "fused_unpermute",
        ):
            if not hasattr(moe_utils, name):
                setattr(moe_utils, name, None)
                _DEFINED.append(f"{moe_utils.__name__}.{name}")

    # Megatron requires sequence parallelism for MoE + TP, but the torch norm used without Apex/TE
    # refuses it. A torch norm is correct under SP once its params carry `sequence_parallel=True`, so
    # finalize_model_grads all-reduces their grads over TP (what the Apex/TE norms do).
    def norm_new(cls: Any, config: Any, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "LayerNorm") -> torch.nn.Module:
        if config.normalization == "LayerNorm":
            norm: torch.nn.Module = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization must be LayerNorm or RMSNorm, got {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm

    _replace(torch_norm.WrappedTorchNorm, "__new__", norm_new)


def reset_megatron_global_state() -> None:
    """megatron keeps MoE state in class attributes and module globals; reset it between runs in one
    process (tests), or a later run's schedule fails on a stale 0-d aux-loss scale."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    clear_aux_losses_tracker()
    # clearing only zeroes the per-layer tensors: a later model with more MoE layers would index
    # past them, so drop the entries too
    get_moe_layer_wise_logging_tracker().clear()
    parallel_state.destroy_model_parallel()
