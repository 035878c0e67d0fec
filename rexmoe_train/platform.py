"""Every CPU/GPU difference in the project lives here, and nowhere else.

megatron-core 0.16.1 assumes CUDA throughout: ~175 ``torch.cuda.current_device()`` calls, CUDA
streams/events in the alltoall dispatcher, a CUDA RNG tracker, ``device="cuda"`` literals in the
optimizer and schedules, and parameter classification by ``'torch.cuda.FloatTensor'`` type strings.
On a CPU-only machine (CI, laptops) we make those entry points behave as their CPU equivalents so the
*real* megatron code paths (parallel_state, DDP, optimizers, pipeline schedules, dispatchers,
dist_checkpointing) run over gloo. With CUDA present, :func:`setup` changes nothing.

Call :func:`setup` before the first ``import megatron.core``: some megatron modules bind
``torch.cuda`` names at import time. Every module of this package that imports megatron calls it at
its top; it is idempotent and cheap after the first call.

Beyond the compatibility layer this module answers the questions the rest of the code would otherwise
branch on: which device, which process-group backend, which default dtype, and which
TransformerConfig values the platform forces.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

HAS_CUDA: bool = torch.cuda.is_available()
_CPU = torch.device("cpu")
_SETUP_DONE = False


# --------------------------------------------------------------------------------------------------
# Questions the rest of the code asks
# --------------------------------------------------------------------------------------------------
def device() -> torch.device:
    """The device this process computes on (its local GPU, or the CPU)."""
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
    if HAS_CUDA:
        state["cuda"] = torch.cuda.get_rng_state(device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if HAS_CUDA and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device())


def has_triton_gpu() -> bool:
    """True when custom Triton kernels can run compiled on the local GPU (CUDA present and triton
    importable). Without it the kernels in rexmoe_train/kernels fall back to their torch references
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


# --------------------------------------------------------------------------------------------------
# The CPU compatibility layer for megatron-core
# --------------------------------------------------------------------------------------------------
def setup(set_threads: bool = True) -> None:
    """Install the megatron-core CPU compatibility layer (no-op with CUDA). Idempotent."""
    global _SETUP_DONE
    if _SETUP_DONE:
        return
    _SETUP_DONE = True
    if HAS_CUDA:
        torch.cuda.set_device(device())
        return
    # Without TE/Apex megatron warns at import that it falls back to torch implementations: expected
    # on every CPU machine, so not worth a screen of output per process.
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
    if set_threads and "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    # megatron.core.jit.jit_fuser is torch.compile: on CPU the first call of each fused helper spends
    # ~15 s compiling C++ with inductor. Eager gives the same numbers.
    import torch._dynamo as dynamo

    dynamo.config.disable = True
    _patch_torch_cuda_namespace()
    _patch_device_literals()
    _patch_tensor_type_strings()
    _patch_gloo_uneven_collectives()
    _patch_megatron()


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
    c.current_device = lambda: _CPU
    c.set_device = lambda *a, **k: None
    c.device_count = lambda: 0
    c.synchronize = lambda *a, **k: None
    c.empty_cache = lambda: None
    c.Stream = _NoopStream
    c.ExternalStream = _NoopStream
    c.Event = _NoopEvent
    c.current_stream = lambda *a, **k: _THE_STREAM
    c.default_stream = lambda *a, **k: _THE_STREAM
    c.stream = lambda s=None: contextlib.nullcontext()
    c.set_stream = lambda s: None
    # megatron's CudaRNGStatesTracker forks "CUDA" RNG states for tensor-parallel and expert-parallel
    # init/dropout. Mapping them onto the CPU generator keeps the fork semantics real.
    c.get_rng_state = lambda device="cuda": torch.get_rng_state()
    c.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # torch.manual_seed calls torch.cuda.manual_seed_all: it must not recurse into the CPU seed.
    c.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    c.manual_seed_all = lambda seed: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(c, name, lambda *a, **k: 0)
    c.reset_peak_memory_stats = lambda *a, **k: None
    c.memory_stats = lambda *a, **k: {}
    with contextlib.suppress(Exception):
        c.nvtx.range_push = lambda *a, **k: None
        c.nvtx.range_pop = lambda *a, **k: None
        c.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    original_record_stream = torch.Tensor.record_stream

    def record_stream(self: torch.Tensor, stream: Any) -> None:
        if isinstance(stream, _NoopStream):
            return None
        return original_record_stream(self, stream)

    torch.Tensor.record_stream = record_stream


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
        setattr(torch, name, wrap(getattr(torch, name)))

    original_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)):
            args = (_to_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to
    for name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
        original = getattr(torch.Tensor, name)

        def method(self: torch.Tensor, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return __original(self, *args, **kwargs)

        setattr(torch.Tensor, name, method)


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

    torch.Tensor.type = type_


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

    dist.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter


def _patch_megatron() -> None:
    """Fixes inside megatron-core itself. Imports megatron, so it runs after the torch patches."""
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The private CUDA RNG get/set use torch.cuda._lazy_call, which silently does nothing on CPU.
    def get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_rng_state
    mrandom._set_cuda_rng_state = set_rng_state

    class _DropExpectedRngWarning(logging.Filter):
        # With the "CUDA" RNG mapped onto the CPU RNG, CPU state changing inside a fork is expected.
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mrandom.__name__).addFilter(_DropExpectedRngWarning())

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

    # The alltoall dispatcher converts split sizes to numpy only for CUDA tensors; torch 2.13's
    # all_to_all_single binding rejects CPU tensors as split sizes.
    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

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

    torch_norm.WrappedTorchNorm.__new__ = norm_new

    # Belt and braces for the gloo p2p ordering bug (see transformer_config_overrides): route the
    # batched p2p path through megatron's ordered one even if a config forgets batch_p2p_comm=False.
    def batched_as_ordered(**kwargs: Any) -> list:
        return list(p2p_communication._p2p_ops(**kwargs).values())

    p2p_communication._batched_p2p_ops = batched_as_ordered


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
