"""Expert banks: the r*N experts of a reuse group, each stored once.

A bank is a megatron SequentialMLP over the group's local slots (r*N/ep on each EP rank, in the
placement's slot order), so the megatron expert MLPs, their `is_expert` gradient reduction over the
expert-data-parallel group, and the expert optimizer all apply unchanged. The banks are registered
once on the model (``GPTModel.expert_banks``), never inside a layer: the MoE layers hold plain,
unregistered references, so parameters, gradients and checkpoints see each expert exactly once.

Checkpoint keys are by (owner MoE layer, expert) — ``expert_banks.experts.<param>`` with global shape
[num_moe_layers, N, ...] — i.e. independent of r, of the placement and of the EP size, and the same
layout megatron uses for a vanilla model's per-layer experts.

On the local path ``model.moe_grouped_gemm`` (auto | true | false) selects ``GroupedExpertBank``:
the same parameters and checkpoint keys, but all local slots run as one grouped GEMM per projection
(``torch.nn.functional.grouped_mm``) instead of a Python loop of r*N/ep small GEMMs.

On the Transformer Engine path (``model.transformer_impl``) the bank is a TEGroupedMLP instead
(``TEExpertBank``: grouped GEMMs, fp8-capable) with the same checkpoint keys; ``bank_class`` picks
the bank from the experts module of the layer spec.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel import CheckpointWithoutOutput
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

try:  # the TE bank's base class; megatron defines it without TE, guard anyway (older/newer mcore)
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
except ImportError:  # pragma: no cover - depends on the megatron build
    TEGroupedMLP = None

from rexmoe_train.core.placement import ExpertPlacement
from rexmoe_train.core.reuse import ReuseGroup


class _GroupSlots:
    """What every bank knows about its reuse group: which (owner layer, expert) each local slot
    holds. Shared by the local and the Transformer Engine bank."""

    def _bind_group(self, num_local_experts: int, group: ReuseGroup, placement: ExpertPlacement,
                    num_moe_layers: int) -> None:
        assert num_local_experts == placement.local_slots
        self.group = group
        self.placement = placement
        self.num_moe_layers = num_moe_layers
        # Every expert weight belongs to megatron's expert grad buffer and optimizer, reduced over the
        # expert-data-parallel group. Megatron marks expert params `allreduce=True` when ep == 1,
        # which puts them in the dense buffer, reduced over the dense data-parallel group: wrong at
        # tp > 1 with expert_tensor_parallel_size=1, where each TP rank runs the (replicated) experts
        # on its own sequence-parallel share of the tokens and the replicas must sum their grads.
        for param in self.parameters():
            param.allreduce = False

    def slot_identity(self, slot: int) -> tuple[int, int]:
        """Local slot -> (owner MoE layer, expert index) on this EP rank."""
        owner, expert = self.placement.slot_owner_expert(self.ep_group.rank(), slot)
        return self.group.first_moe_layer + owner, expert


def _unsupported_by_direct_path(config) -> str | None:
    """Why the bank's own expert computation (the lean loop, the grouped GEMM) cannot stand in for
    megatron's MLP modules under ``config``; None when it can."""
    c = config
    if c.add_bias_linear:
        return "biased expert linears"
    if c.fp8 or c.fp4:
        return "fp8/fp4 (use the transformer_engine path)"
    if c.use_te_activation_func:
        return "TE activation functions"
    if c.bias_activation_fusion and not (c.gated_linear_unit and c.activation_func is F.silu):
        return "a fused activation other than SwiGLU"
    return None


class ExpertBank(_GroupSlots, SequentialMLP):
    """SequentialMLP over the group's local slots.

    Its forward is megatron's loop with megatron's per-expert MLP modules taken out where they add
    nothing (expert tensor-parallel size 1, no bias, no fp8, no gradient-accumulation fusion, no
    delayed weight gradients): per slot one ``F.linear`` for fc1, the activation, one for fc2, on the
    same parameters. At r=4 a rank runs r times more (smaller) experts than at r=1, so the per-expert
    Python of megatron's MLP and its linear autograd functions is a cost that grows with r
    (docs/benchmarks.md, issue 15). Anything else takes SequentialMLP.forward unchanged."""

    def __init__(self, num_local_experts, config, submodules, pg_collection, *,
                 group: ReuseGroup, placement: ExpertPlacement, num_moe_layers: int) -> None:
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self._bind_group(num_local_experts, group, placement, num_moe_layers)
        c = self.config
        self._why_not = _unsupported_by_direct_path(c)
        if self._why_not is None and self.tp_group.size() > 1:  # fc2 would need megatron's reduction
            self._why_not = "expert tensor parallelism (expert_tensor_parallel_size > 1)"
        self._lean_loop = (self._why_not is None and not c.gradient_accumulation_fusion
                           and not getattr(c, "delay_wgrad_compute", False))

    def _activation(self, fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """megatron MLP's activation between fc1 and fc2 (mlp.py), with ``probs`` as per_token_scale."""
        c = self.config
        if c.bias_activation_fusion:  # SwiGLU only (_unsupported_by_direct_path)
            return weighted_bias_swiglu_impl(fc1_out, None, probs.unsqueeze(-1),
                                             c.activation_func_fp8_input_store)
        if c.gated_linear_unit:
            x_glu, x_linear = torch.chunk(fc1_out, 2, dim=-1)  # megatron's order: [gate | linear]
            if (val := c.activation_func_clamp_value) is not None:
                x_glu = x_glu.clamp(min=None, max=val)
                x_linear = x_linear.clamp(min=-val, max=val)
            out = c.activation_func(x_glu) * (x_linear + c.glu_linear_offset)
        else:
            out = c.activation_func(fc1_out)
        return (out * probs.unsqueeze(-1)).to(out.dtype)

    def _probs_on_input(self, x: torch.Tensor, probs: torch.Tensor):
        """``moe_apply_probs_on_input``, as SequentialMLP: scale the input, gate 1."""
        assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` needs moe_router_topk=1"
        return (probs.unsqueeze(-1) * x).to(x.dtype), torch.ones_like(probs)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        if not self._lean_loop:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            x, probs = self._probs_on_input(x, probs)
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        outs = []
        for expert, rows, gates in zip(self.local_experts, torch.split(x, counts), torch.split(probs, counts)):
            hidden = self._activation(F.linear(rows, expert.linear_fc1.weight), gates)
            outs.append(F.linear(hidden, expert.linear_fc2.weight))
        return torch.cat(outs), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None, checkpoint_prefix=None):
        """``prefix`` names the local module path; ``checkpoint_prefix`` the layout-free key."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        checkpoint_prefix = f"{prefix}experts." if checkpoint_prefix is None else checkpoint_prefix
        out = {}
        for slot, expert in enumerate(self.local_experts):
            owner_layer, expert_idx = self.slot_identity(slot)
            local_prefix = f"{prefix}local_experts.{slot}."
            offsets = (
                *sharded_offsets,
                (len(sharded_offsets), owner_layer, self.num_moe_layers),
                (len(sharded_offsets) + 1, expert_idx, self.placement.experts_per_layer),
            )
            expert_sd = expert.sharded_state_dict(local_prefix, offsets, metadata)
            if getattr(self, "ffn_padding", None) is not None:  # saved unpadded (expert_padding.py)
                expert_sd = self.ffn_padding.strip(expert_sd, offsets)
            replace_prefix_for_sharding(expert_sd, local_prefix, checkpoint_prefix)
            for tensor in expert_sd.values():
                # replicated along expert-data-parallel ranks only
                tensor.replica_id = (*tensor.replica_id[:2], self.dp_group.rank())
            out.update(expert_sd)
        return out


logger = logging.getLogger(__name__)

#: torch's grouped GEMM (2.8+ names it F.grouped_mm; torch._grouped_mm is the same op, older spelling)
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}
#: grouped_mm's kernels need every row stride of both operands to be a multiple of 16 bytes
_STRIDE_ALIGN_BYTES = 16


class _GroupedLinear(torch.autograd.Function):
    """out[rows of slot i] = x[rows of slot i] @ weights[i].T for all slots in one grouped GEMM.

    The slots' weights are separate parameters (same checkpoint keys as the loop bank); grouped_mm
    wants them stacked. ``stacked`` is that copy, made without autograd by the bank and shared by
    the r layers of the group within one forward pass (``GroupedExpertBank._stacked``): the backward
    pass reuses it instead of stacking again, and hands slot i's weight gradient to parameter i as
    a view of one [S, out, in] grouped GEMM result."""

    @staticmethod
    def forward(ctx, x, offs, stacked, *weights):
        ctx.save_for_backward(x, offs, stacked)
        return _GROUPED_MM(x, stacked.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, offs, stacked = ctx.saved_tensors
        # grouped_mm rejects odd-strided operands (e.g. the expanded gradient of ``out.sum()``)
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _GROUPED_MM(grad, stacked, offs=offs)
        if any(ctx.needs_input_grad[3:]):
            # the weight gradient of slot i: grad[rows i].T @ x[rows i]; 2D x 2D split by offs
            grad_w = _GROUPED_MM(grad.t(), x, offs=offs)
            # a slot that got no rows has a K=0 product: zero by definition, but whether a CUDA
            # grouped kernel writes that block is an implementation detail (its output is allocated
            # uninitialised). Make it zero here (no host sync) rather than trust it.
            empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
            grad_w = torch.where(empty[:, None, None], 0.0, grad_w).unbind(0)
        return (grad_x, None, None, *(grad_w or [None] * (len(ctx.needs_input_grad) - 3)))


def _grouped_linear(x: torch.Tensor, weights: list[torch.Tensor], offs: torch.Tensor,
                    stacked: torch.Tensor | None = None) -> torch.Tensor:
    if stacked is None:
        with torch.no_grad():
            stacked = torch.stack(weights)
    return _GroupedLinear.apply(x, offs, stacked, *weights)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs forward AND backward on this device type and dtype.

    Probed once per (device type, dtype) with a tiny problem: which device/dtype pairs a torch build
    supports is not queryable (CUDA wants bf16 on sm80+ in 2.13; CPU takes fp32 and bf16). The probe
    runs with autograd on whatever the caller's mode: the first call of a run is usually a no-grad
    forward (the step-0 evaluation, full recompute's first pass), where the probe's backward would
    fail and cache False for the whole run."""
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_MM_WORKS:
        ok = _GROUPED_MM is not None
        if ok:
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    ok = _probe_grouped_mm(device, dtype)
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_MM_WORKS[key] = ok
    return _GROUPED_MM_WORKS[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Forward and backward of a 2-slot grouped GEMM; raises where the build lacks a kernel."""
    a = torch.ones(3, 16, device=device, dtype=dtype, requires_grad=True)
    b = [torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)] * 2
    offs = torch.tensor([1, 3], device=device, dtype=torch.int32)
    _grouped_linear(a, b, offs).sum().backward()
    return a.grad is not None


def _aligned(*sizes_in_elements: int, dtype: torch.dtype) -> bool:
    size = torch.empty((), dtype=dtype).element_size()
    return all(n * size % _STRIDE_ALIGN_BYTES == 0 for n in sizes_in_elements)


class GroupedExpertBank(ExpertBank):
    """ExpertBank whose forward is one grouped GEMM per projection over all local slots.

    The parameters are ExpertBank's (one megatron MLP per slot), so checkpoint keys, offsets, the
    expert grad buffer and optimizer are untouched: each projection stacks the r*N/ep weight
    matrices for ``grouped_mm`` (rows of slot i at [offs[i-1], offs[i])) and hands slot i's weight
    gradient back to slot i's parameter (``_GroupedLinear``). The stacked copy is made once per
    forward pass of the model chunk and shared by the group's r layers; autograd keeps it until
    their backward (memory: one copy of the local bank's weights per group and micro-batch in
    flight, the price of not stacking 4r times per step). The gated linear unit, the
    activation and the per-row gate (``probs``) are applied as megatron's MLP does between fc1 and fc2.

    Falls back to SequentialMLP's loop when grouped_mm does not run on the device/dtype in use, when
    a row width is not 16-byte aligned, or for what the grouped path does not implement (biases,
    fp8/fp4, TE activation functions, non-SwiGLU fused activations, expert tensor parallelism);
    ``required`` logs that fallback once instead of taking it silently."""

    def __init__(self, *args, required: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.required = required
        self._warned = False
        c = self.config
        # megatron's selective "moe_act" recompute, as its GroupedMLP: keep fc1's output, drop the
        # activation's and recompute it when fc2's backward needs it (the loop fallback ignores it)
        self.activation_recompute = (c.recompute_granularity == "selective"
                                     and "moe_act" in c.recompute_modules)
        # (key, fc1 stack, fc2 stack) while the model chunk's forward pass runs (see _stacked)
        self._stacks = None
        self._in_forward_pass = False
        self.grouped_forwards = 0  # forwards that took the grouped-GEMM path (not the loop fallback)

    def begin_forward_pass(self) -> None:
        """The model chunk's forward starts (a hook set by build_model): until it ends, the weights
        cannot change, so the r layers of the group share one stacked copy (_stacked)."""
        self._stacks, self._in_forward_pass = None, True

    def end_forward_pass(self) -> None:
        self._stacks, self._in_forward_pass = None, False  # the layers' autograd saved what they need

    def _stacked(self, fc1: list[torch.Tensor], fc2: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """fc1 and fc2 weights stacked [S, out, in]: once per forward pass of the chunk, not once per
        layer and again in the backward pass (that was 4r copies of the local bank per step and
        group; now 2). Outside a chunk's forward (a recompute replay in the backward pass, a bank
        called directly) each call stacks its own. The key (each weight's storage and in-place
        version) guards the cache against a weight changed inside a pass."""
        key = tuple((w.data_ptr(), w._version) for w in (*fc1, *fc2))
        if self._stacks is not None and self._stacks[0] == key:
            return self._stacks[1], self._stacks[2]
        with torch.no_grad():
            stacks = (key, torch.stack(fc1), torch.stack(fc2))
        if self._in_forward_pass:
            self._stacks = stacks
        return stacks[1], stacks[2]

    def grouped_ok(self, x: torch.Tensor) -> bool:
        """Whether this call can take the grouped path (see the class docstring)."""
        why = self._why_not
        if why is None and not grouped_mm_available(x.device, x.dtype):
            why = f"torch.grouped_mm unavailable for {x.device.type}/{x.dtype}"
        if why is None:
            fc1 = self.local_experts[0].linear_fc1.weight.shape[0]
            fc2_in = self.local_experts[0].linear_fc2.weight.shape[1]
            if not _aligned(x.shape[-1], fc1, fc2_in, dtype=x.dtype):
                why = "row widths not a multiple of 16 bytes"
        if why is not None and self.required and not self._warned:
            logger.warning("model.moe_grouped_gemm=true: SequentialMLP loop used instead (%s)", why)
            self._warned = True
        return why is None

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not self.grouped_ok(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        if self.config.moe_apply_probs_on_input:
            x, permuted_probs = self._probs_on_input(x, permuted_probs)
        if not torch.is_tensor(tokens_per_expert):
            tokens_per_expert = torch.tensor(tokens_per_expert)
        offs = tokens_per_expert.to(device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        fc1 = [e.linear_fc1.weight for e in self.local_experts]
        fc2 = [e.linear_fc2.weight for e in self.local_experts]
        fc1_stacked, fc2_stacked = self._stacked(fc1, fc2)
        self.grouped_forwards += 1  # metrics.jsonl's grouped_gemm_forwards; the GPU kit asserts it is > 0
        fc1_out = _grouped_linear(x, fc1, offs, fc1_stacked)
        if self.activation_recompute:
            # fp8=None means "no fp8" to megatron 0.16 (its default, False, means fp8 and needs TE)
            checkpoint = CheckpointWithoutOutput(fp8=self.config.fp8)
            hidden = checkpoint.checkpoint(self._activation, fc1_out, permuted_probs)
            out = _grouped_linear(hidden, fc2, offs, fc2_stacked)
            checkpoint.discard_output_and_register_recompute(out)
            return out, None
        return _grouped_linear(self._activation(fc1_out, permuted_probs), fc2, offs, fc2_stacked), None


if TEGroupedMLP is not None:

    class TEExpertBank(_GroupSlots, TEGroupedMLP):
        """The bank on the Transformer Engine path: one TE GroupedLinear pair for all r*N/ep local
        slots (one grouped GEMM per projection instead of a Python loop over experts).

        Each slot is still ONE parameter pair (``linear_fc1.weight<slot>``...) that the r layers of
        the group call, i.e. each GroupedLinear runs r times per micro-batch forward. What TE does
        with that (TE 2.11 source, docs/gpu.md): under fp8 the weight is cast once per optimizer
        step, however many layers reuse it, only because megatron's schedule sets
        ``is_first_microbatch`` on the first micro-batch (the first of the r calls casts and caches,
        the other calls and micro-batches reuse the cache); with ``is_first_microbatch=None``
        (``disable_parameter_transpose_cache``, or a forward outside the schedule) every call casts,
        r times per micro-batch. Delayed scaling keeps one amax slot per GEMM for all r calls: the
        history records the max over the r layers' inputs, and one scale serves them all.
        ``gradient_accumulation_fusion`` is refused for r > 1 (see ``__init__``).

        Checkpoint keys and offsets are the local bank's (``experts.linear_fc1.weight`` over
        [num_moe_layers, N]), so checkpoints move between ``transformer_impl=local`` and
        ``transformer_engine``; TE's fp8 metadata (``_extra_state``) is saved per (group, EP rank),
        i.e. it does not survive an EP-size change. Not exercised in CI (TE needs a GPU)."""

        def __init__(self, num_local_experts, config, submodules, pg_collection, *,
                     group: ReuseGroup, placement: ExpertPlacement, num_moe_layers: int) -> None:
            # With fused wgrad accumulation TE writes a call's weight gradient straight into
            # main_grad, and a call made with is_first_microbatch=True OVERWRITES it instead of
            # adding (TE 2.11 grouped_linear.py:373-378, 419-420, 460-464). Here that call is the
            # group's first layer, whose backward runs last: it would discard the other r-1 layers'
            # gradients of the first micro-batch. Checked before building, so it fails without TE too.
            if getattr(config, "gradient_accumulation_fusion", False) and group.size > 1:
                raise ValueError(
                    f"reuse group {group.index} (r={group.size}) on the Transformer Engine bank cannot "
                    "use gradient_accumulation_fusion: TE would overwrite the gradient of the reused "
                    "experts on each step's first micro-batch (docs/gpu.md)")
            super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
            self._bind_group(num_local_experts, group, placement, num_moe_layers)
            self.expt_dp_group = pg_collection.expt_dp

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None,
                               checkpoint_prefix=None):
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            checkpoint_prefix = f"{prefix}experts." if checkpoint_prefix is None else checkpoint_prefix
            dp_rank = self.expt_dp_group.rank()
            out = {}
            for slot in range(self.num_local_experts):
                owner_layer, expert_idx = self.slot_identity(slot)
                offsets = (
                    *sharded_offsets,
                    (len(sharded_offsets), owner_layer, self.num_moe_layers),
                    (len(sharded_offsets) + 1, expert_idx, self.placement.experts_per_layer),
                )
                state = {"linear_fc1.weight": getattr(self.linear_fc1, f"weight{slot}"),
                         "linear_fc2.weight": getattr(self.linear_fc2, f"weight{slot}")}
                # fc1 is column-parallel (axis 0), fc2 row-parallel (axis 1): as SequentialMLP's MLPs
                sub = make_sharded_tensors_for_checkpoint(
                    state, "", {"linear_fc1.weight": 0, "linear_fc2.weight": 1}, offsets,
                    tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
                if self.config.gated_linear_unit:
                    sub["linear_fc1.weight"] = apply_swiglu_sharded_factory(sub["linear_fc1.weight"],
                                                                            offsets)
                if getattr(self, "ffn_padding", None) is not None:  # saved unpadded (expert_padding.py)
                    sub = self.ffn_padding.strip(sub, offsets)
                replace_prefix_for_sharding(sub, "", checkpoint_prefix)
                for name, tensor in sub.items():
                    tensor.replica_id = (*tensor.replica_id[:2], dp_rank)
                    module, param = name.split(".")
                    out[f"{prefix}{module}.{param}{slot}"] = tensor
            ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
            for module in ("linear_fc1", "linear_fc2"):
                extra = getattr(self, module).get_extra_state()
                out[f"{prefix}{module}._extra_state"] = ShardedObject(
                    f"{checkpoint_prefix}te_extra_state.group{self.group.index}.{module}", extra,
                    (ep_size,), (ep_rank,), (0, self.tp_group.rank(), dp_rank))
            return out
else:  # pragma: no cover
    TEExpertBank = None


def bank_class(experts_module, grouped_gemm: bool = False) -> Callable[..., ExpertBank]:
    """The bank for the experts module a layer spec asks for (TEGroupedMLP -> TEExpertBank) and, on
    the local path, for ``model.moe_grouped_gemm`` resolved (``ModelConfig.resolved_moe_grouped_gemm``).

    Why auto is the loop on CPU: measured on this project's 2-core CPU box (torch 2.13, fp32, one
    thread, hidden 256 / FFN 512, 2048 rows, fwd+bwd; bench/expert_gemm_bench.py and
    docs/benchmarks.md, issue 15 (b)) the grouped path was not faster than the loop at 8 or
    32 experts, while on CUDA grouped_mm is the grouped kernel the loop cannot match."""
    if TEGroupedMLP is not None and isinstance(experts_module, type) and issubclass(
            experts_module, TEGroupedMLP):
        return TEExpertBank
    if not grouped_gemm:
        return ExpertBank
    return partial(GroupedExpertBank, required=True)


class ExpertBanks(MegatronModule):
    """The banks of the reuse groups of one model chunk, registered once on the model."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.banks = torch.nn.ModuleDict()

    def add(self, group_index: int, bank: ExpertBank) -> None:
        self.banks[str(group_index)] = bank

    def attach_forward_hooks(self, chunk: torch.nn.Module) -> None:
        """Tell the banks when ``chunk``'s forward pass begins and ends (GroupedExpertBank shares
        one stacked copy of its weights among the r layers of a pass)."""
        banks = [b for b in self.banks.values() if hasattr(b, "begin_forward_pass")]
        def begin(*_):
            for bank in banks:
                bank.begin_forward_pass()

        def end(*_):
            for bank in banks:
                bank.end_forward_pass()

        if banks:
            chunk.register_forward_pre_hook(begin)
            chunk.register_forward_hook(end)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for key, bank in self.banks.items():
            out.update(bank.sharded_state_dict(f"{prefix}banks.{key}.", sharded_offsets, metadata,
                                               checkpoint_prefix=f"{prefix}experts."))
        return out
