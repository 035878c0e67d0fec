"""Records what a simulated step issued: every aten op (FLOPs, bytes) and every c10d collective
(kind, group, bytes sent / received by this rank), from a dispatch mode over the fake step."""

from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from rexmoe_train.plan.records import CollectiveRecord, OpRecord

# megatron's groups, by the getter that returns them; earlier names win for a group shared by two
GROUP_GETTERS = (
    ("tp", "get_tensor_model_parallel_group", {}),
    ("pp", "get_pipeline_model_parallel_group", {}),
    ("ep", "get_expert_model_parallel_group", {}),
    ("tp_ep", "get_expert_tensor_and_model_parallel_group", {}),
    ("etp", "get_expert_tensor_parallel_group", {}),
    ("dp", "get_data_parallel_group", {}),
    ("dp", "get_data_parallel_group", {"with_context_parallel": True}),
    ("dp", "get_data_parallel_group", {"with_context_parallel": True, "partial_data_parallel": True}),
    ("edp", "get_expert_data_parallel_group", {}),
    ("edp", "get_expert_data_parallel_group", {"partial_expert_data_parallel": True}),
    ("mp", "get_model_parallel_group", {}),
    ("embd", "get_embedding_group", {}),
)

_C10D = "c10d"
_PRIM_DEVICE = torch.ops.prim.device.default
_NO_TRAFFIC = {"barrier", "monitored_barrier"}


def group_labels() -> dict[str, tuple[str, int]]:
    """process group name -> (label, size) for megatron's groups and the world."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    out: dict[str, tuple[str, int]] = {}
    for label, getter, kwargs in GROUP_GETTERS:
        try:
            group = getattr(parallel_state, getter)(**kwargs)
        except (AssertionError, RuntimeError, TypeError, AttributeError):
            continue
        if group is not None and group.group_name not in out:
            out[group.group_name] = (label, group.size())
    world = dist.group.WORLD
    out.setdefault(world.group_name, ("world", world.size()))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(obj) -> list[torch.Tensor]:
    flat, _ = tree_flatten(obj)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


class StepRecorder(TorchDispatchMode):
    """Ops and collectives of one rank's step. ``phase`` is "microbatch" inside the schedule's
    forward/backward and "step" for the gradient reduction and the optimizer: the simulator scales
    the micro-batch records when it simulates fewer micro-batches than the step has."""

    def __init__(self, labels: dict[str, tuple[str, int]]) -> None:
        super().__init__()
        self.labels = labels
        self.phase = "microbatch"
        self.ops: dict[str, list[OpRecord]] = {"microbatch": [], "step": []}
        self.collectives: dict[str, list[CollectiveRecord]] = {"microbatch": [], "step": []}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _PRIM_DEVICE and isinstance(args[0], FakeTensor):
            # C++ asks a fake tensor for its device on nearly every op: three in four dispatches of a
            # step are this query. Answered here as FakeTensor's own handler answers it (its
            # ``device`` property), so it does not travel through MemTracker and the other modes
            # below, which record nothing for it: the simulation runs about twice as fast.
            return args[0].device
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == _C10D:
            self._collective(func, args)
        elif func.namespace == "aten" and not _is_view(func):
            self._op(func, args, kwargs, out)
        return out

    # -- ops -----------------------------------------------------------------------------------------
    def _op(self, func, args, kwargs, out) -> None:
        outputs = _tensors(out)
        if not outputs:
            return
        inputs = _tensors((args, kwargs))
        flops = 0
        counter = flop_registry.get(func._overloadpacket)
        if counter is not None:
            try:
                flops = int(counter(*args, **kwargs, out_val=out))
            except (TypeError, ValueError, RuntimeError):
                flops = 0
        moved = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        dtype = str(outputs[0].dtype).removeprefix("torch.")
        self.ops[self.phase].append(OpRecord(func.__name__, flops, moved, dtype))

    # -- collectives ---------------------------------------------------------------------------------
    def _group(self, args) -> Optional[tuple[str, int, int]]:
        for a in args:
            if isinstance(a, torch.ScriptObject):
                try:
                    group = torch._C._distributed_c10d.ProcessGroup.unbox(a)
                except (RuntimeError, TypeError):
                    continue
                label, size = self.labels.get(group.group_name, ("other", group.size()))
                return label, size, group.rank()
        return None

    def _collective(self, func, args) -> None:
        name = func._overloadpacket.__name__.rstrip("_")
        found = self._group(args)
        if found is None or name in _NO_TRAFFIC:
            return
        label, size, group_rank = found
        if size <= 1 and name not in ("send", "recv"):
            return
        sent, received = _wire_bytes(name, args, size, group_rank)
        self.collectives[self.phase].append(
            CollectiveRecord(_kind(name, label), label, size, int(sent), int(received)))


def _kind(name: str, label: str) -> str:
    if name in ("send", "recv", "recv_any_source"):
        return "pp_send_recv" if label == "pp" else "other"
    if label in ("ep", "tp_ep"):
        return "expert_all_to_all" if name.startswith("alltoall") else "expert_all_gather"
    if label in ("tp", "etp"):
        return "tp"
    if label in ("dp", "edp"):
        if "reduce_scatter" in name:
            return "dp_reduce_scatter"
        if "allgather" in name:
            return "dp_all_gather"
        if "allreduce" in name:
            return "dp_all_reduce"
    return "other"


def _wire_bytes(name: str, args, n: int, group_rank: int) -> tuple[float, float]:
    """Bytes this rank puts on / takes off the wire (ring algorithms for the reductions)."""
    tensors = _tensors(args)
    if name in ("alltoall_base",):
        out, inp, out_splits, in_splits = args[0], args[1], args[3], args[4]
        row_out = _nbytes(out) // max(out.shape[0], 1) if out.dim() else 0
        row_in = _nbytes(inp) // max(inp.shape[0], 1) if inp.dim() else 0
        own_in = in_splits[group_rank] * row_in if in_splits else _nbytes(inp) // n
        own_out = out_splits[group_rank] * row_out if out_splits else _nbytes(out) // n
        return _nbytes(inp) - own_in, _nbytes(out) - own_out
    if name == "alltoall":
        outs, ins = _tensors(args[0]), _tensors(args[1])
        return (sum(map(_nbytes, ins)) - _nbytes(ins[group_rank]),
                sum(map(_nbytes, outs)) - _nbytes(outs[group_rank]))
    if name in ("send",):
        return sum(map(_nbytes, tensors)), 0
    if name in ("recv", "recv_any_source"):
        return 0, sum(map(_nbytes, tensors))
    if name.startswith("allreduce"):
        b = sum(map(_nbytes, tensors)) * 2 * (n - 1) / n
        return b, b
    if name in ("_reduce_scatter_base", "reduce_scatter_tensor_coalesced"):
        full = _nbytes(tensors[1]) if name == "_reduce_scatter_base" else sum(map(_nbytes, _tensors(args[1])))
        b = full * (n - 1) / n
        return b, b
    if name in ("_allgather_base", "allgather_into_tensor_coalesced"):
        full = _nbytes(tensors[0]) if name == "_allgather_base" else sum(map(_nbytes, _tensors(args[0])))
        b = full * (n - 1) / n
        return b, b
    if name in ("allgather", "allgather_coalesced"):
        b = sum(map(_nbytes, _tensors(args[1]))) * (n - 1)
        return b, b
    if name in ("reduce_scatter",):
        b = sum(map(_nbytes, _tensors(args[1]))) * (n - 1) / n
        return b, b
    if name == "broadcast":
        b = sum(map(_nbytes, tensors))
        return (b, 0) if group_rank == 0 else (0, b)
    b = sum(map(_nbytes, tensors))
    return b, b
