"""One training step of one rank, run by the project's own training code on fake tensors.

The model is ``model.gpt.build_model``'s, wrapped and optimised by ``training.optim`` (megatron DDP,
the megatron optimizer, distributed or not), and the step is megatron's forward-backward schedule
with the trainer's ``_forward_step``, then ``finalize_model_grads`` and the optimizer step, all under
torch's fake process group at the real world size and rank, inside ``FakeTensorMode``: no memory is
allocated for any model tensor. ``MemTracker`` measures the memory; ``StepRecorder`` the ops and
collectives.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _UpdateType
from torch.testing._internal.distributed.fake_pg import FakeStore

from rexmoe_train.compat import reset_megatron_global_state
from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.plan.fake_env import DispatchLoad, HostReads, RealWhenAllReal, real_chunk_orders, simulation_patches
from rexmoe_train.plan.load import RoutingLoad
from rexmoe_train.plan.recorder import StepRecorder, group_labels
from rexmoe_train.plan.records import RankTrace

# MemTracker's reference types -> the planner's categories
CATEGORIES = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer_state",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "other",
}
BYTE_VOCAB = 257  # the byte tokenizer's vocabulary (256 bytes + eod) when model.vocab_size is null


@dataclass
class SimSettings:
    """How one rank is simulated (everything the output's assumptions name)."""

    spec: str = "te"  # te: fused attention (no score matrix kept); local: megatron's local attention
    load: RoutingLoad = field(default_factory=RoutingLoad)
    psr_step: Optional[int] = None  # None: the step where all r*N candidates are open
    microbatches: Optional[int] = None  # None: the fewest that reach the schedule's peak


def simulated_microbatches(total: int, pp: int, vpp: Optional[int]) -> int:
    """The fewest micro-batches (a divisor of ``total``) whose schedule reaches the step's memory
    peak: every stage's warm-up fills (1F1B: pp in flight; interleaved: pp*vpp + pp). Without a
    pipeline one is enough: each micro-batch frees its activations before the next starts, and the
    gradient buffers exist from the first. The per-micro-batch records are scaled to ``total``."""
    need = min(total, pp if not vpp else pp * vpp + pp)
    for d in range(need, total + 1):
        if total % d == 0 and (not vpp or d % pp == 0):
            return d
    return total


def psr_step_for(cfg: ExperimentConfig, stage: str) -> int:
    """The optimizer step at a PSR stage: "N" (first step, fewest candidates) or "rN" (all open)."""
    psr = cfg.rexmoe.psr
    if stage == "N":
        return max(1, psr.start_step)
    return max(1, psr.end_step, psr.start_step + 1)


class PlanMemTracker(MemTracker):
    """MemTracker over megatron DDP chunks: DDP keeps its grad buffers in an attribute named
    ``buffers`` that hides ``nn.Module.buffers()``; the tracker gets the method back while it looks."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        shadow = module.__dict__.get("buffers")
        if shadow is None:
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        del module.__dict__["buffers"]
        try:
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        finally:
            module.__dict__["buffers"] = shadow

    def _pre_fw_hook(self, module, inputs) -> None:
        # every micro-batch calls the model chunk again: MemTracker takes a second root call for a
        # second iteration and refuses; here it is the same step, so the chunk's stats start over
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:
            self.memory_tracking.pop(module, None)
            super()._pre_fw_hook(module, inputs)

    def __init__(self) -> None:
        super().__init__()
        # activation bytes alive now, by the module that allocated them (module_label), and a copy
        # taken at the step's peak: "where the activations go", which MemTracker's categories lack
        self.activations_by_module: dict[str, int] = {}
        self.peak_activations_by_module: dict[str, int] = {}
        self._owner: dict[int, str] = {}  # id(winfo) -> label, while the storage is alive

    def _attribute(self, winfo, delta: int, label: Optional[str] = None) -> None:
        key = id(winfo)
        owner = self._owner.get(key) or label or module_label(self._mod_tracker.parents)
        self._owner[key] = owner
        self.activations_by_module[owner] = self.activations_by_module.get(owner, 0) + delta

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)
        act = _MemRefType.ACT
        if u_type == _UpdateType.ADD and winfo.reftype == act:
            self._attribute(winfo, winfo.mem_consumed)
        elif u_type == _UpdateType.DEL and winfo.reftype == act:
            self._attribute(winfo, -winfo.mem_consumed)
            self._owner.pop(id(winfo), None)
        elif u_type == _UpdateType.REF:
            if old_reftype == act:
                self._attribute(winfo, -winfo.mem_consumed)
            if winfo.reftype == act:
                self._attribute(winfo, winfo.mem_consumed)
        elif u_type == _UpdateType.SIZE and winfo.reftype == act:
            self._attribute(winfo, winfo.mem_consumed - old_mem_consumed)

    def _update_peak_stats(self, peak_state) -> None:
        # only the step's peak (per device): MemTracker's per-module peaks copy a snapshot for every
        # active module on every op, most of a simulated step's time; module states are kept by the
        # hooks (pre/post forward and backward) all the same
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_activations_by_module = {k: v for k, v in self.activations_by_module.items() if v}


def module_label(parents) -> str:
    """The innermost active module, without indices (of layers, banks, local experts) and without
    the wrappers above it: ``DistributedDataParallel.module.module.decoder.layers.3.mlp.router`` ->
    ``layer.mlp.router``; an expert bank -> ``expert_banks[...]``; elsewhere the last two names. One
    row per kind of module, summed over layers. An expert bank is registered on the model, not in
    the layer that calls it, so inside it two chains of modules are active (the layer's and the
    bank's): the bank's is the inner call."""
    leaves = [n for n in parents if not any(o != n and o.startswith(n + ".") for o in parents)]
    banks = [n for n in leaves if ".expert_banks" in n or n.startswith("expert_banks")]
    name = max(banks or leaves, key=lambda n: (n.count("."), len(n)))
    if name == "Global":
        return "outside any module"
    name = re.sub(r"\.\d+(?=\.|$)", "", name)
    if "expert_banks" in name:
        return "expert_banks" + name.split("expert_banks", 1)[1]
    _, inside_layer, tail = name.partition(".layers.")
    if inside_layer:
        return f"layer.{tail}"
    if name.rsplit(".", 1)[-1] == "module":  # the model itself under its wrappers (DDP, Float16Module)
        return "model (top level)"
    return ".".join(name.split(".")[-2:])


def _tag(tracker: MemTracker, tensor: Optional[torch.Tensor], reftype) -> None:
    """Register a tensor made before tracking began, unless its storage is already known."""
    if tensor is None:
        return
    if any(st in tracker._WINFO for st in _storages(tensor)):
        return
    tracker._update_and_maybe_create_winfos(tensor, reftype)


def _storages(tensor: torch.Tensor):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        return []
    return [tensor.untyped_storage()]


def _inner_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in chained if getattr(o, "optimizer", None) is not None]


def _init_adam_state(torch_optimizer) -> None:
    """Adam's moments exist from the first step on: create them now so the peak of a later step
    (weights + grads + moments + activations) is what is measured."""
    for group in torch_optimizer.param_groups:
        for p in group["params"]:
            state = torch_optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)


def _track_state(tracker: MemTracker, chunks: list, optimizer) -> None:
    tracker.track_external(*chunks)
    for chunk in chunks:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            _tag(tracker, getattr(buffer, "param_data", None), _MemRefType.PARAM)
            _tag(tracker, getattr(buffer, "grad_data", None), _MemRefType.GRAD)
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                _tag(tracker, p, _MemRefType.OPT)  # fp32 master copies (bf16 runs)
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    _tag(tracker, value, _MemRefType.OPT)


def _synthetic_batches(count: int, mbs: int, seq: int) -> list[dict]:
    return [{"tokens": torch.zeros(mbs, seq, dtype=torch.long),
             "position_ids": torch.zeros(mbs, seq, dtype=torch.long),
             "labels": torch.zeros(mbs, seq, dtype=torch.long),
             "loss_mask": torch.ones(mbs, seq)} for _ in range(count)]


def simulate_rank(cfg: ExperimentConfig, world_size: int, rank: int, settings: SimSettings) -> RankTrace:
    """Simulate ``rank``'s training step; the process's default group must not exist yet."""
    started = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with simulation_patches(DispatchLoad(settings.load, seed=cfg.train.seed),
                                fused_attention=settings.spec == "te"):
            trace = _simulate(cfg, world_size, settings)
    finally:
        from rexmoe_train.parallel.state import destroy_model_parallel_groups

        destroy_model_parallel_groups()
        reset_megatron_global_state()
        dist.destroy_process_group()
    trace.ranks = [rank]
    trace.meta["wall_s"] = round(time.perf_counter() - started, 2)
    return trace


def _simulate(cfg: ExperimentConfig, world_size: int, settings: SimSettings) -> RankTrace:
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from rexmoe_train.model.gpt import build_model
    from rexmoe_train.training.metrics import init_aux_loss_tracker
    from rexmoe_train.training.optim import build_optimizer, wrap_for_training
    from rexmoe_train.training.trainer import _forward_step

    p, t = cfg.parallel, cfg.train
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size)
    model_parallel_cuda_manual_seed(t.seed)
    dp = parallel_state.get_data_parallel_world_size()
    total_mb = t.global_batch_size // (t.micro_batch_size * dp)
    sim_mb = settings.microbatches or simulated_microbatches(
        total_mb, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size)
    host_reads = HostReads()
    with FakeTensorMode(allow_non_fake_inputs=True), RealWhenAllReal(host_reads):
        model = build_model(cfg, cfg.model.vocab_size or BYTE_VOCAB)
        for chunk in model.chunks:
            for module in chunk.modules():
                dispatcher = getattr(module, "token_dispatcher", None)
                if dispatcher is not None:
                    dispatcher._plan_router = module.router
        real_chunk_orders([m.token_dispatcher for c in model.chunks for m in c.modules()
                           if getattr(m, "token_dispatcher", None) is not None])
        tc = model.config
        chunks = wrap_for_training(cfg, model.chunks, tc)
        optimizer, _ = build_optimizer(cfg, chunks, tc)
        for inner in _inner_optimizers(optimizer):
            _init_adam_state(inner)
        labels = group_labels()
        recorder = StepRecorder(labels)

        def finalize(*args, **kwargs):
            recorder.phase = "step"  # the gradient reduction belongs to the step, not a micro-batch
            return finalize_model_grads(*args, **kwargs)

        tc.finalize_model_grads_func = finalize
        tc.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        init_aux_loss_tracker(cfg.model.num_layers)
        step = settings.psr_step if settings.psr_step is not None else psr_step_for(cfg, "rN")
        model.psr_state.set_step(step)
        for router in model.routers:
            router.reset_step_state()
        batches = _synthetic_batches(sim_mb * len(chunks), t.micro_batch_size, t.seq_length)
        tracker = PlanMemTracker()
        _track_state(tracker, chunks, optimizer)
        with tracker, recorder:
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            iterator = ([iter(batches[i::len(chunks)]) for i in range(len(chunks))]
                        if len(chunks) > 1 else iter(batches))
            get_forward_backward_func()(
                forward_step_func=_forward_step, data_iterator=iterator, model=chunks,
                num_microbatches=sim_mb, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                forward_only=False)
            recorder.phase = "step"
            host_reads.allowed = True
            optimizer.step()
            host_reads.allowed = False
        peak = tracker.get_tracker_snapshot("peak")
    trace = _trace(peak, recorder, total_mb, sim_mb, host_reads)
    trace.activations_by_module = dict(sorted(tracker.peak_activations_by_module.items(), key=lambda kv: -kv[1]))
    return trace


def _trace(peak: dict, recorder: StepRecorder, total_mb: int, sim_mb: int, host_reads: HostReads) -> RankTrace:
    by_category: dict[str, int] = {}
    peak_bytes = 0
    for snapshot in peak.values():  # one device (the fake tensors' device)
        peak_bytes += int(snapshot.get("Total", 0))
        for reftype, name in CATEGORIES.items():
            by_category[name] = by_category.get(name, 0) + int(snapshot.get(reftype, 0))
    by_category = {k: v for k, v in by_category.items() if v}
    scale = total_mb / sim_mb  # an integer: sim_mb divides total_mb
    ops = recorder.ops["microbatch"] * int(scale) + recorder.ops["step"]
    collectives = recorder.collectives["microbatch"] * int(scale) + recorder.collectives["step"]
    trace = RankTrace(ranks=[], ops=ops, collectives=collectives, peak_bytes=peak_bytes,
                      by_category=by_category)
    trace.meta.update(microbatches_per_step=total_mb, microbatches_simulated=sim_mb,
                      host_reads_answered=host_reads.answered)
    return trace
