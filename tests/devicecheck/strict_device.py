"""The strict-device harness: run the project's real code on the CPU build of torch while it believes it
computes on an accelerator, so that device bugs of the GPU code path fail CPU tests.

How: every tensor that would live on the GPU is a :class:`DeviceTensor`, a ``__torch_dispatch__``
wrapper that holds real CPU data (so autograd, optimizers, routing, ``.item()`` and all-to-all split
sizes run) and reports the device ``meta`` (the LABEL). It cannot report ``cuda``: a CPU-only build
aborts the process in autograd's device guard. What is routed to it:

- factories (``torch.zeros(..., device=...)`` etc.) whose device is the label, ``cuda``, ``cuda:N`` or an
  int (what ``torch.cuda.current_device()`` gives megatron), ``Tensor.to`` / ``.cuda()``,
  ``Module.to`` / ``.cuda()`` (parameter attributes such as megatron's ``allreduce`` are kept);
- ``platform.device()`` answers the label (``platform.set_device_override``, the library's one seam);
- ``torch.cuda.*`` on top of the compat layer: ``current_device()`` is the label, the "CUDA" RNG
  (``get/set_rng_state``, ``manual_seed``, megatron's ``_get/_set_cuda_rng_state``) is a generator of
  its own that random ops on device tensors draw from, ``Tensor.type()`` names device tensors
  ``torch.cuda.*`` and CPU tensors by their CPU name (megatron's optimizers reject the latter, as on a GPU);
- the collectives megatron and the project call (``torch.distributed.all_reduce`` ...) demand device
  tensors and hand gloo their CPU data; megatron's own gloo side groups may carry CPU tensors.

What fails, and how (each a subclass of :class:`StrictDeviceError`):
- :class:`DeviceMixError`: an op meets a device tensor and a CPU tensor with at least one element
  dimension (a 0-dim CPU tensor is a scalar, which CUDA accepts too; ``copy_`` across devices is legal);
- :class:`CPUCollectiveError`: a collective on a CPU tensor;
- :class:`LeftOnCPUError`: :func:`check_on_device` finds a parameter, grad, main_grad, buffer or
  optimizer state tensor on the CPU (Adam's 0-dim ``step`` counter is a CPU tensor on a GPU too).

Install once per process, before the first megatron import and after ``compat.install()`` (see
:func:`install`); there is no uninstall: the tests run the harness in subprocesses
(``tests/devicecheck/run_under_harness.py``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._pytree import tree_map

LABEL = torch.device("meta")
_CPU = torch.device("cpu")
_DEVICE_GENERATOR = torch.Generator()  # the "CUDA" RNG; seeded like torch.cuda's
_INSTALLED = False
STATS = {"dispatched_ops": 0, "collectives": 0, "device_rng_ops": 0}
# hook(func, args, kwargs) before every op on a device tensor; func None: a host read (.tolist())
OP_HOOKS: list[Callable[[Any, tuple, dict], None]] = []  # nccl_semantics.py: stream order


class StrictDeviceError(RuntimeError):
    """A device bug the harness caught."""


class DeviceMixError(StrictDeviceError):
    pass


class CPUCollectiveError(StrictDeviceError):
    pass


class LeftOnCPUError(StrictDeviceError):
    pass


# ------------------------------------------------------------------------------------------------
# The device tensor
# ------------------------------------------------------------------------------------------------
def _is_label(d: Any) -> bool:
    """Whether a device argument means "the accelerator"."""
    if d is None:
        return False
    if isinstance(d, bool):
        return False
    if isinstance(d, int):
        return True  # megatron passes torch.cuda.current_device() ints on a GPU
    if isinstance(d, str):
        d = torch.device(d)
    if isinstance(d, torch.device):
        return d.type in ("cuda", "meta")
    return False


def _with_device_rng(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the CPU default generator holding the device generator's state: random ops on
    device tensors draw from the device RNG, as they would on a GPU."""
    STATS["device_rng_ops"] += 1
    cpu_state = torch.get_rng_state()
    torch.set_rng_state(_DEVICE_GENERATOR.get_state())
    try:
        return fn()
    finally:
        _DEVICE_GENERATOR.set_state(torch.get_rng_state())
        torch.set_rng_state(cpu_state)


# ops that accept a CPU operand next to a device one on a GPU too
_CROSS_DEVICE = {"aten::copy_", "aten::_to_copy", "aten::_copy_from", "aten::_copy_from_and_resize"}
_INDEXING = {"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


class DeviceTensor(torch.Tensor):
    """A tensor "on the device": real CPU data in ``elem``, device ``meta`` to the world."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool | None = None):
        if isinstance(elem, DeviceTensor):
            raise TypeError("DeviceTensor of a DeviceTensor")
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=LABEL,
            requires_grad=elem.requires_grad if requires_grad is None else requires_grad)
        r.elem = elem
        return r

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"DeviceTensor({self.elem!r})"

    # `param.data = new` swaps the tensor's metadata in C++; the wrapped data must follow.
    @property
    def data(self):  # type: ignore[override]
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        if not isinstance(new, DeviceTensor):
            raise DeviceMixError(f"device tensor's .data set to a CPU tensor {tuple(new.shape)}")
        torch._C.TensorBase.data.__set__(self, new)
        self.elem = new.elem

    def __setitem__(self, index: Any, value: Any) -> None:
        # torch turns a Python number into a 0-dim tensor on the destination's device, i.e. a real
        # (data-less) meta tensor here: give it a CPU scalar instead, which CUDA accepts as well
        if isinstance(value, (bool, int, float, complex)):
            value = torch.tensor(value, dtype=self.dtype)
        torch.Tensor.__setitem__(self, index, value)

    def tolist(self):  # a device-to-host read, as on a GPU (torch refuses it for subclasses)
        for hook in OP_HOOKS:
            hook(None, (self,), {})
        return self.elem.tolist()

    def numpy(self, *args: Any, **kwargs: Any):  # as CUDA: no implicit copy to the host
        raise TypeError("can't convert a device tensor to numpy: use .cpu() first (strict-device harness)")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        STATS["dispatched_ops"] += 1
        for hook in OP_HOOKS:
            hook(func, args, kwargs)
        seen_dev: list[DeviceTensor] = []
        seen_cpu: list[torch.Tensor] = []

        def unwrap(x: Any) -> Any:
            if isinstance(x, DeviceTensor):
                seen_dev.append(x)
                return x.elem
            if isinstance(x, torch.Tensor):
                if x.device.type == "meta":  # made by C++ for the label device: it has no data
                    raise StrictDeviceError(f"harness gap: a data-less meta tensor {tuple(x.shape)} reached {func}")
                if x.dim() > 0:
                    seen_cpu.append(x)
            return x

        name = func._schema.name
        if name in _INDEXING:  # CUDA moves CPU index tensors to the device for advanced indexing
            uargs = (unwrap(args[0]), tree_map(lambda i: i.elem if isinstance(i, DeviceTensor) else i, args[1]),
                     *tree_map(unwrap, args[2:]))
        else:
            uargs = tree_map(unwrap, args)
        ukwargs = tree_map(unwrap, kwargs)
        # a copy between devices is legal (H2D / D2H), and so is an explicit device move
        if seen_dev and seen_cpu and name not in _CROSS_DEVICE:
            raise DeviceMixError(
                f"device mix in {func}: a CPU tensor {tuple(seen_cpu[0].shape)} {seen_cpu[0].dtype} met a "
                f"device tensor {tuple(seen_dev[0].shape)} {seen_dev[0].dtype}")
        explicit = ukwargs.get("device", None)
        if explicit is not None:
            to_device = _is_label(explicit)
            ukwargs["device"] = _CPU
        else:
            to_device = bool(seen_dev)

        def run() -> Any:
            return func(*uargs, **ukwargs)

        out = _with_device_rng(run) if to_device and torch.Tag.nondeterministic_seeded in func.tags else run()
        # in-place / out= ops return their argument: hand back the same object
        originals = {id(x.elem): x for x in seen_dev}
        originals.update({id(x): x for x in tree_map(lambda a: a, list(args)) if isinstance(x, torch.Tensor)
                          and not isinstance(x, DeviceTensor)})

        def wrap(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) in originals:
                return originals[id(x)]
            return DeviceTensor(x) if to_device else x

        return tree_map(wrap, out)


class _ToDevice(torch.autograd.Function):
    """A differentiable host → device copy (its backward hands the grad back to the host)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return DeviceTensor(x.detach().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.cpu() if isinstance(grad, DeviceTensor) else grad


def to_device(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor's copy on the device (differentiable)."""
    if isinstance(t, DeviceTensor):
        return t
    if t.requires_grad and torch.is_grad_enabled():
        return _ToDevice.apply(t)
    return DeviceTensor(t.detach().clone())


def is_device(t: Any) -> bool:
    return isinstance(t, DeviceTensor)


# ------------------------------------------------------------------------------------------------
# Factories, .to(), .cuda(), modules
# ------------------------------------------------------------------------------------------------
_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "randperm", "linspace", "logspace", "eye", "empty_strided", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "randint_like", "normal", "scalar_tensor", "tril_indices",
    "triu_indices",
)
_RANDOM_FACTORIES = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal"}


def _wrap_factory(name: str, fn: Callable) -> Callable:
    random = name in _RANDOM_FACTORIES

    from_data = name in ("tensor", "as_tensor")

    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        if from_data and args:
            data = args[0]
            if isinstance(data, DeviceTensor):  # torch.tensor(device_tensor): a copy where device= says
                if kwargs.get("device") is None or _is_label(kwargs["device"]):
                    kwargs.pop("device", None)
                    return DeviceTensor(fn(data.elem, *args[1:], **kwargs))
                return fn(data.elem, *args[1:], **kwargs)
            if isinstance(data, (list, tuple)):  # a list of device scalars is read element by element
                args = (tree_map(lambda x: x.elem if isinstance(x, DeviceTensor) else x, data),) + args[1:]
        if not _is_label(kwargs.get("device")):
            return fn(*args, **kwargs)
        kwargs["device"] = _CPU
        requires_grad = kwargs.pop("requires_grad", False)
        kwargs.pop("pin_memory", None)
        # a *_like of a device tensor with device= given goes through __torch_dispatch__ anyway
        if args and isinstance(args[0], DeviceTensor):
            return fn(*args, **{**kwargs, "device": LABEL}).requires_grad_(requires_grad)
        out = _with_device_rng(lambda: fn(*args, **kwargs)) if random else fn(*args, **kwargs)
        return DeviceTensor(out).requires_grad_(requires_grad)

    return factory


# Factories that C++ code reaches with the label device and no tensor argument: autograd formulas
# (where's backward makes its 0 with scalar_tensor(0, grad.options())), a Python number wrapped next
# to a device tensor (where(cond, x, 0.0)), full / zeros / ones built from a device tensor's options.
# They dispatch to the Meta key, whose Python kernels (torch/_meta_registrations.py) only compute a
# shape: through the factory wrappers above they became device tensors over *uninitialised* CPU
# memory, so the value was lost (a garbage 0 in where's backward made gradients and the step-3 bias
# of the ep=2 resume differ now and then). These kernels compute the value on the CPU and label it.
_META_FACTORIES = ("scalar_tensor", "full", "zeros", "ones", "arange", "arange.start", "arange.start_step",
                   "linspace", "eye", "eye.m")
_META_LIBRARY: list = []  # the Library must outlive install(): dropping it unregisters the kernels


def _patch_meta_factories() -> None:
    lib = torch.library.Library("aten", "IMPL")
    for qualified in _META_FACTORIES:
        name, _, overload = qualified.partition(".")
        op = getattr(getattr(torch.ops.aten, name), overload or "default")

        def kernel(*args: Any, __op: Any = op, **kwargs: Any) -> torch.Tensor:
            kwargs = {**kwargs, "device": _CPU}
            kwargs.pop("pin_memory", None)
            return DeviceTensor(__op(*args, **kwargs))

        lib.impl(qualified, kernel, "Meta")
    _META_LIBRARY.append(lib)


def _patch_tensor_methods() -> None:
    original_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        copy = kwargs.pop("copy", False)
        if args and isinstance(args[-1], bool) and len(args) >= 2 and isinstance(args[-2], bool):
            copy, args = args[-1], args[:-1]  # to(device, dtype, non_blocking, copy)
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            args = (LABEL,) + args[1:]  # a device index (torch.cuda.current_device() on a GPU)
        target, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if not _is_label(target):
            return original_to(self, *args, copy=copy, **kwargs)
        converted = self
        if dtype is not None or memory_format is not None:
            converted = original_to(self, dtype=dtype or self.dtype, memory_format=memory_format or
                                    torch.preserve_format)
        if isinstance(self, DeviceTensor):
            return converted.clone() if copy and converted is self else converted
        return to_device(converted)

    def cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> torch.Tensor:
        return to(self, LABEL)

    torch.Tensor.to = to
    torch.Tensor.cuda = cuda

    for name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
        original = getattr(torch.Tensor, name)

        def method(self: torch.Tensor, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            dev = kwargs.get("device")
            if dev is not None and _is_label(dev) and not isinstance(self, DeviceTensor):
                kwargs["device"] = _CPU
                return DeviceTensor(__original(self, *args, **kwargs))
            if dev is not None and isinstance(self, DeviceTensor) and _is_label(dev):
                kwargs["device"] = LABEL
            return __original(self, *args, **kwargs)

        setattr(torch.Tensor, name, method)

    true_type = torch._C.TensorBase.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs:
            if isinstance(self, DeviceTensor):
                return "torch.cuda." + true_type(self.elem)[len("torch."):]
            return true_type(self)
        return true_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def _patch_modules() -> None:
    original_apply = torch.nn.Module._apply

    def _apply(self: torch.nn.Module, fn: Callable, recurse: bool = True) -> torch.nn.Module:
        # A param converted CPU -> device becomes a new Parameter (a wrapper subclass cannot take
        # over a plain tensor's storage): carry megatron's attributes (allreduce, sequence_parallel,
        # tensor_model_parallel, shared, ...) over, as set_data keeps them on a GPU.
        before = {k: (p, dict(p.__dict__)) for k, p in self._parameters.items() if p is not None}
        out = original_apply(self, fn, recurse)
        for key, (old, attrs) in before.items():
            new = self._parameters.get(key)
            if new is not None and new is not old:
                for attr, value in attrs.items():
                    if attr not in new.__dict__:
                        setattr(new, attr, value)
        return out

    torch.nn.Module._apply = _apply
    torch.nn.Module.cuda = lambda self, device=None: self.to(LABEL)


# ------------------------------------------------------------------------------------------------
# torch.cuda and megatron's CUDA RNG
# ------------------------------------------------------------------------------------------------
def device_rng_state() -> torch.Tensor:
    return _DEVICE_GENERATOR.get_state()


def _patch_torch_cuda() -> None:
    c = torch.cuda

    def seed_device(seed: int) -> None:
        _DEVICE_GENERATOR.manual_seed(int(seed))

    c.current_device = lambda: LABEL
    c.get_rng_state = lambda device="cuda": _DEVICE_GENERATOR.get_state()
    c.set_rng_state = lambda state, device="cuda": _DEVICE_GENERATOR.set_state(_host_bytes(state))
    c.manual_seed = seed_device
    c.manual_seed_all = seed_device  # torch.manual_seed seeds the GPUs through this
    c.get_device_name = lambda *a, **k: "strict-device harness (CPU data, device label 'meta')"

    from megatron.core.tensor_parallel import random as mrandom

    def _get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return _DEVICE_GENERATOR.get_state()  # get_state() is a fresh copy

    def _set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        _DEVICE_GENERATOR.set_state(_host_bytes(new_state))

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state


def _host_bytes(state: torch.Tensor) -> torch.Tensor:
    # a CUDA RNG state is a CPU ByteTensor on a GPU too
    if isinstance(state, DeviceTensor):
        raise DeviceMixError("an RNG state was given as a device tensor (torch.cuda RNG states are CPU ByteTensors)")
    return state


# ------------------------------------------------------------------------------------------------
# Collectives
# ------------------------------------------------------------------------------------------------
# function -> the parameters that carry data (tensors or lists of tensors)
_COLLECTIVES = {
    "all_reduce": ("tensor",),
    "all_gather": ("tensor_list", "tensor"),
    "all_gather_into_tensor": ("output_tensor", "input_tensor"),
    "reduce_scatter": ("output", "input_list"),
    "reduce_scatter_tensor": ("output", "input"),
    "broadcast": ("tensor",),
    "reduce": ("tensor",),
    "all_to_all": ("output_tensor_list", "input_tensor_list"),
    "all_to_all_single": ("output", "input"),
    "send": ("tensor",),
    "recv": ("tensor",),
    "isend": ("tensor",),
    "irecv": ("tensor",),
    "gather": ("tensor", "gather_list"),
    "scatter": ("tensor", "scatter_list"),
}


def _gloo_side_groups() -> set:
    """megatron's own gloo groups (``*_GLOO``): on a GPU these legitimately carry CPU tensors."""
    from megatron.core import parallel_state

    groups = set()
    for name, value in vars(parallel_state).items():
        if "GLOO" in name and value is not None and not isinstance(value, (list, dict, bool, str)):
            groups.add(value)
    return groups


def _wrap_collective(name: str, fn: Callable, data_params: tuple[str, ...]) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def collective(*args: Any, **kwargs: Any) -> Any:
        STATS["collectives"] += 1
        bound = signature.bind_partial(*args, **kwargs)
        group = bound.arguments.get("group")
        cpu_allowed = group is not None and group in _gloo_side_groups()
        for param in data_params:
            if param not in bound.arguments or bound.arguments[param] is None:
                continue
            value = bound.arguments[param]
            items = value if isinstance(value, (list, tuple)) else [value]
            unwrapped = []
            for t in items:
                if isinstance(t, DeviceTensor):
                    unwrapped.append(t.elem)
                elif isinstance(t, torch.Tensor) and not cpu_allowed:
                    raise CPUCollectiveError(
                        f"collective on a CPU tensor: torch.distributed.{name}({param}=<CPU tensor "
                        f"{tuple(t.shape)} {t.dtype}>)")
                else:
                    unwrapped.append(t)
            bound.arguments[param] = type(value)(unwrapped) if isinstance(value, (list, tuple)) else unwrapped[0]
        return fn(*bound.args, **bound.kwargs)

    return collective


def _wrap_batch_isend_irecv(fn: Callable) -> Callable:
    import torch.distributed as dist

    @functools.wraps(fn)
    def batch_isend_irecv(p2p_op_list: list) -> Any:
        STATS["collectives"] += 1
        ops = []
        for op in p2p_op_list:
            if not isinstance(op.tensor, DeviceTensor):
                raise CPUCollectiveError(f"collective on a CPU tensor: batch_isend_irecv({tuple(op.tensor.shape)})")
            ops.append(dist.P2POp(op.op, op.tensor.elem, op.peer, op.group, op.tag))
        return fn(ops)

    return batch_isend_irecv


def _patch_collectives() -> None:
    import torch.distributed as dist

    for name, params in _COLLECTIVES.items():
        setattr(dist, name, _wrap_collective(name, getattr(dist, name), params))
    for private, public in (("_all_gather_base", "all_gather_into_tensor"),
                            ("_reduce_scatter_base", "reduce_scatter_tensor")):
        if hasattr(dist, private):
            setattr(dist, private, _wrap_collective(private, getattr(dist, private), _COLLECTIVES[public]))
    dist.batch_isend_irecv = _wrap_batch_isend_irecv(dist.batch_isend_irecv)


# ------------------------------------------------------------------------------------------------
# Install, and the end-of-scenario check
# ------------------------------------------------------------------------------------------------
def _patch_checkpoint_loading() -> None:
    """torch.distributed.checkpoint allocates every ``meta`` tensor of a state dict before loading
    (meta = "no data yet") and refuses meta ShardedTensors. Device tensors carry data: leave those."""
    from torch.distributed.checkpoint import default_planner

    original = default_planner._init_state_dict

    def _init_state_dict(state_dict: dict) -> Any:
        leaked = []

        def find(x: Any) -> Any:
            # a plain meta tensor is a real "allocate me"; ShardedTensors of device shards report meta too
            if type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "meta":
                leaked.append(x)
            return x

        tree_map(find, state_dict)
        return original(state_dict) if leaked else None

    default_planner._init_state_dict = _init_state_dict


def install() -> None:
    """Install the harness in this process (idempotent): compat first, then the device overlay."""
    global _INSTALLED
    if _INSTALLED:
        return
    from rexmoe_train import compat, platform

    compat.install()
    for name in _FACTORIES:
        setattr(torch, name, _wrap_factory(name, getattr(torch, name)))
    _patch_tensor_methods()
    _patch_meta_factories()
    _patch_modules()
    _patch_torch_cuda()
    _patch_collectives()
    _patch_checkpoint_loading()
    platform.set_device_override(LABEL)
    _DEVICE_GENERATOR.manual_seed(torch.initial_seed())
    _INSTALLED = True


def installed() -> bool:
    return _INSTALLED


def _optimizer_states(optimizer: Any) -> Iterable[tuple[str, Any]]:
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    for i, sub in enumerate(subs):
        inner = getattr(sub, "optimizer", sub)
        if inner is None:
            continue
        for j, group in enumerate(inner.param_groups):
            for k, p in enumerate(group["params"]):
                yield f"optimizer[{i}].group[{j}].param[{k}]", p
                for key, value in inner.state.get(p, {}).items():
                    yield f"optimizer[{i}].group[{j}].param[{k}].{key}", value


def check_on_device(chunks: Iterable[torch.nn.Module], optimizer: Any = None) -> int:
    """Raise LeftOnCPUError naming every parameter, grad, main_grad, buffer and optimizer state tensor
    that is not on the device. Returns how many tensors were checked."""
    left, checked = [], 0

    def visit(name: str, t: Any, scalar_ok: bool = False) -> None:
        nonlocal checked
        if not isinstance(t, torch.Tensor):
            return
        checked += 1
        if isinstance(t, DeviceTensor) or (scalar_ok and t.dim() == 0):
            return
        left.append(f"{name} {tuple(t.shape)} {t.dtype}")

    for c, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            visit(f"chunk{c}.{name}", p)
            visit(f"chunk{c}.{name}.grad", p.grad)
            visit(f"chunk{c}.{name}.main_grad", getattr(p, "main_grad", None))
        for name, b in chunk.named_buffers():
            visit(f"chunk{c}.{name}", b)
    if optimizer is not None:
        for name, t in _optimizer_states(optimizer):
            visit(name, t, scalar_ok=name.endswith(".step"))
    if left:
        raise LeftOnCPUError(f"{len(left)} tensor(s) left on the CPU: " + "; ".join(left[:8]))
    return checked
