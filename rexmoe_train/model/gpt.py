"""Build the ReXMoE GPT model on megatron-core's GPTModel (local spec, or the TE spec on GPUs).

The model is megatron's GPTModel; ReXMoE is only (a) the per-layer spec of MoE layers
(ReXMoELayer) and (b) the expert banks registered on each model chunk. Parallel layout comes from
megatron's parallel_state, initialised before this is called (parallel/state.py).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from rexmoe_train import platform
from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.core.psr import PSRState
from rexmoe_train.model.experts import ExpertBanks
from rexmoe_train.model.moe_layer import ReXMoELayer
from rexmoe_train.model.router import ReXMoERouter
from rexmoe_train.model.runtime import ReuseGroupRuntime, build_group_runtimes
from rexmoe_train.parallel.dispatcher import DedupAllToAllDispatcher, find_dedup_dispatchers


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def use_bf16(cfg: ExperimentConfig) -> bool:
    return platform.default_dtype() == torch.bfloat16 if cfg.train.bf16 is None else cfg.train.bf16


def transformer_config(cfg: ExperimentConfig) -> TransformerConfig:
    m, p, r = cfg.model, cfg.parallel, cfg.rexmoe
    bf16 = use_bf16(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    tp = p.tensor_model_parallel_size
    with warnings.catch_warnings():
        # megatron 0.16 warns about its own default cuda_graph_scope on every construction
        warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
        return _transformer_config(cfg, m, p, r, bf16, dtype, tp)


def uses_transformer_engine(cfg: ExperimentConfig) -> bool:
    """model.transformer_impl resolved (auto: TE when the platform has TE on a GPU)."""
    return cfg.model.resolved_transformer_impl() == "transformer_engine"


def fp8_fields(cfg: ExperimentConfig) -> dict:
    """TransformerConfig fp8 fields. Validation already rejected fp8 without TE on a GPU."""
    t = cfg.train
    if t.fp8 is None:
        return {}
    fields = {"fp8": t.fp8, "fp8_recipe": t.fp8_recipe, "fp8_amax_history_len": t.fp8_amax_history_len}
    if t.fp8_recipe == "delayed":
        # with a long amax window the scale must follow the window's max, not its latest entry
        fields["fp8_amax_compute_algo"] = "max"
    return fields


def _transformer_config(cfg, m, p, r, bf16, dtype, tp) -> TransformerConfig:
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        init_method_std=m.init_method_std,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,  # per-head norm of queries and keys (hidden size = head dim)
        kv_channels=m.kv_channels,  # head size; None: hidden_size / num_attention_heads
        gated_linear_unit=True,  # SwiGLU experts and dense MLPs, as the paper's Megatron-LM setup
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # MoE: the model-level config is the vanilla layer (N experts); ReXMoELayer widens its copy.
        num_moe_experts=m.num_moe_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        # dense first-k layers: tell megatron the per-layer pattern, which also makes its
        # sharded_state_dict key the layers one by one (stacked keys cannot mix dense and MoE MLPs)
        moe_layer_freq=([0] * m.first_k_dense_layers + [1] * m.num_moe_layers) if m.first_k_dense_layers else 1,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_router_pre_softmax=r.gating == "softmax_then_topk",
        moe_router_score_function="sigmoid" if r.gating == "sigmoid" else "softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=r.balance.z_loss_coeff or None,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=p.moe_token_dispatcher_type,
        # token dropping: ReXMoERouter applies it over the PSR-available candidates (router.py)
        moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_token_drop_policy=m.moe_token_drop_policy,
        moe_router_force_load_balancing=m.moe_router_force_load_balancing,  # benchmark only (schema.py)
        # TE path: the bank is one TEGroupedMLP; local path: model.moe_grouped_gemm picks the bank
        # (experts.bank_class). megatron reads the flag only to validate (e.g. "moe_act" recompute
        # needs a grouped bank); the local layer spec is built with moe_grouped_gemm=False regardless.
        moe_grouped_gemm=uses_transformer_engine(cfg) or m.resolved_moe_grouped_gemm(),
        # activation recompute (megatron's; the routers count a replayed micro-batch once)
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        **({"recompute_modules": list(m.recompute_modules)} if m.recompute_modules is not None else {}),
        **fp8_fields(cfg),
        # parallelism
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=p.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        sequence_parallel=tp > 1 if p.sequence_parallel is None else p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        **platform.transformer_config_overrides(),
    )


@dataclass
class ReXMoEModel:
    """The model chunks of this rank (one per virtual pipeline stage) and, per chunk, the runtimes
    of the reuse groups it holds (group index -> ReuseGroupRuntime)."""

    chunks: list[GPTModel]
    runtimes: list[dict[int, ReuseGroupRuntime]]
    config: TransformerConfig
    psr_state: PSRState
    vocab_size: int

    # Routers and dispatchers are found one way: by walking the modules, in model order.
    @property
    def routers(self) -> list[ReXMoERouter]:
        return [m for chunk in self.chunks for m in chunk.modules() if isinstance(m, ReXMoERouter)]

    @property
    def dedup_dispatchers(self) -> list[DedupAllToAllDispatcher]:
        """The rexmoe_dedup dispatchers (empty with megatron's own)."""
        return find_dedup_dispatchers(self.chunks)


def layer_templates(cfg: ExperimentConfig) -> tuple[ModuleSpec, ModuleSpec]:
    """megatron's (dense, MoE) layer specs for the configured implementation."""
    qk = cfg.model.qk_layernorm
    if uses_transformer_engine(cfg):
        # TE attention (fused LN+QKV, TE core attention) and TEGroupedMLP experts; TENorm reads
        # config.normalization itself. Imported here: megatron's TE spec needs TE at build time.
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        dense = get_gpt_layer_with_transformer_engine_spec(num_experts=None, qk_layernorm=qk)
        moe_template = get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.model.num_moe_experts, moe_grouped_gemm=True, qk_layernorm=qk)
    else:
        norm = cfg.model.normalization
        dense = get_gpt_layer_local_spec(num_experts=None, normalization=norm, qk_layernorm=qk)
        moe_template = get_gpt_layer_local_spec(num_experts=cfg.model.num_moe_experts,
                                                moe_grouped_gemm=False, normalization=norm,
                                                qk_layernorm=qk)
    return dense, moe_template


def layer_specs(cfg: ExperimentConfig, runtimes: dict[int, ReuseGroupRuntime]) -> list[ModuleSpec]:
    """One spec per transformer layer of the whole model (dense first-k, then ReXMoE layers); MoE
    layers of groups without a runtime (not in this chunk) are never built, so get none.

    Each MoE layer gets its own spec carrying its MoE index and its group's runtime: megatron tells an
    MLP its layer number only after construction, but the router and the bank depend on the group."""
    dense, moe_template = layer_templates(cfg)
    plan = cfg.reuse_plan()
    specs = []
    for layer_number in range(1, cfg.model.num_layers + 1):
        if not plan.is_moe_layer(layer_number):
            specs.append(dense)
            continue
        moe_layer = plan.moe_index(layer_number)
        moe = copy.deepcopy(moe_template)
        runtime = runtimes.get(plan.group_of(moe_layer).index)
        moe.submodules.mlp = ModuleSpec(
            module=ReXMoELayer, params={"runtime": runtime, "moe_layer": moe_layer},
            submodules=moe.submodules.mlp.submodules)
        specs.append(moe)
    return specs


def chunk_groups(cfg: ExperimentConfig, offset: int, count: int) -> list:
    """The reuse groups whose MoE layers lie in transformer layers [offset, offset+count)."""
    plan = cfg.reuse_plan()
    moe_layers = {plan.moe_index(n) for n in range(offset + 1, offset + count + 1) if plan.is_moe_layer(n)}
    return [g for g in plan.groups if set(g.moe_layers) & moe_layers]


def final_layer_norm(cfg: ExperimentConfig, specs: list[ModuleSpec]):
    """The block's final norm. The local spec's input_layernorm is the norm module; the TE spec fuses
    the input norm into linear_qkv (input_layernorm is IdentityOp), so use TENorm as megatron's TE
    block spec does."""
    if uses_transformer_engine(cfg):
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return specs[0].submodules.input_layernorm


def build_model(cfg: ExperimentConfig, vocab_size: int, psr_state: Optional[PSRState] = None) -> ReXMoEModel:
    """Build this rank's model chunks. parallel_state must be initialised."""
    tc = transformer_config(cfg)
    plan = cfg.reuse_plan()
    psr_state = psr_state or PSRState(cfg.psr_seed)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)
    experts_spec = layer_templates(cfg)[1].submodules.mlp.submodules.experts
    chunks, all_runtimes = [], []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        offset = get_transformer_layer_offset(tc, vp_stage=stage)
        count = get_num_layers_to_build(tc, vp_stage=stage)
        runtimes = build_group_runtimes(cfg, tc, plan, psr_state, experts_spec,
                                        chunk_groups(cfg, offset, count))
        specs = layer_specs(cfg, runtimes)
        block = TransformerBlockSubmodules(layer_specs=specs[offset:offset + count],
                                           layer_norm=final_layer_norm(cfg, specs))
        model = GPTModel(
            config=tc,
            transformer_layer_spec=block,
            vocab_size=padded,
            max_sequence_length=cfg.model.max_position_embeddings or cfg.train.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            vp_stage=stage,
        )
        banks = ExpertBanks(tc)
        for index, runtime in runtimes.items():
            banks.add(index, runtime.bank)
        model.expert_banks = banks  # registered once, outside the layer stack
        banks.attach_forward_hooks(model)
        # megatron builds most weights on the current GPU, but not all: the router weight (router.py,
        # "TODO: Add support for GPU initialization"), torch norms (WrappedTorchNorm) and our routers'
        # step counters start on the CPU. One move per chunk, before Float16Module/DDP (as
        # Megatron-LM's get_model does); in place, so parameter attributes megatron set survive.
        model.to(platform.device())
        chunks.append(model)
        all_runtimes.append(runtimes)
    return ReXMoEModel(chunks, all_runtimes, tc, psr_state, padded)
