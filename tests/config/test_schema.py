"""Config validation: each bad value is one ConfigError naming the field and what is allowed."""

from __future__ import annotations

import pytest

from rexmoe_train.config.schema import ConfigError, ExperimentConfig, experiment_from_dict

# (overrides as a nested dict, the field the message must name, a fragment of the allowed values)
BAD = [
    ({"rexmoe": {"reuse_group_size": 0}}, "rexmoe.reuse_group_size", ">= 1"),
    ({"model": {"moe_router_topk": 9}}, "model.moe_router_topk", "<="),
    ({"model": {"hidden_size": 130}}, "model.hidden_size", "divisible by model.num_attention_heads"),
    ({"rexmoe": {"gating": "softmax"}}, "rexmoe.gating", "softmax_then_topk"),
    ({"rexmoe": {"psr": {"start_step": 10, "end_step": 10}}}, "rexmoe.psr.end_step", "> rexmoe.psr.start_step"),
    ({"rexmoe": {"psr": {"schedule": "exp"}}}, "rexmoe.psr.schedule", "linear"),
    ({"rexmoe": {"psr": {"mask_on": "probs"}}}, "rexmoe.psr.mask_on", "scores"),
    ({"rexmoe": {"psr": {"mask_draw": "fixed"}}}, "rexmoe.psr.mask_draw", "per_step, nested"),
    ({"rexmoe": {"reuse_group_size": 3}}, "rexmoe.reuse_group_size", "allow_partial_last_group"),
    ({"rexmoe": {"balance": {"layer_aux_scope": "batch"}}}, "rexmoe.balance.layer_aux_scope", "micro_batch"),
    ({"rexmoe": {"balance": {"z_loss_coeff": -1.0}}}, "rexmoe.balance.z_loss_coeff", ">= 0"),
    ({"rexmoe": {"balance": {"expert_bias_scope": "layer"}}}, "rexmoe.balance.expert_bias_scope",
     "router, physical"),
    ({"rexmoe": {"balance": {"moe_router_bias_update_rate": 0.0}}},
     "rexmoe.balance.moe_router_bias_update_rate", "> 0"),
    ({"rexmoe": {"balance": {"moe_router_enable_expert_bias": "yes"}}},
     "rexmoe.balance.moe_router_enable_expert_bias", "true or false"),
    ({"rexmoe": {"gate_normalization": "softmax"}}, "rexmoe.gate_normalization",
     "none, renorm_topk, scale_candidates"),
    ({"model": {"num_query_groups": 3}}, "model.num_query_groups", "divide"),
    ({"model": {"first_k_dense_layers": 4}}, "model.first_k_dense_layers", "[0,"),
    ({"model": {"normalization": "BatchNorm"}}, "model.normalization", "RMSNorm"),
    ({"parallel": {"expert_model_parallel_size": 3}}, "parallel.expert_model_parallel_size", "divide"),
    ({"parallel": {"moe_token_dispatcher_type": "flex"}}, "parallel.moe_token_dispatcher_type", "alltoall"),
    ({"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": False}}, "parallel.sequence_parallel", "true"),
    ({"parallel": {"virtual_pipeline_model_parallel_size": 2}}, "parallel.virtual_pipeline_model_parallel_size",
     "pipeline"),
    ({"parallel": {"pipeline_model_parallel_size": 2}}, "parallel.pipeline_model_parallel_size", "reuse group 0"),
    ({"train": {"lr": 0.0}}, "train.lr", "> 0"),
    ({"train": {"min_lr": 1.0}}, "train.min_lr", "[0, train.lr]"),
    ({"train": {"lr_warmup_iters": 300}}, "train.lr_warmup_iters", "train.train_iters"),
    ({"train": {"train_iters": 20, "lr_warmup_iters": 20}}, "train.lr_warmup_iters",
     "pass train.lr_warmup_iters=19 or less, or null for the default min(20, train.train_iters // 10) = 2"),
    ({"train": {"train_iters": 20, "lr_decay_iters": 2}}, "train.lr_decay_iters", "warm-up, train.lr_warmup_iters (2)"),
    ({"run": {"num_threads": 0}}, "run.num_threads", ">= 1"),
    ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, "train.global_batch_size", "multiple"),
    ({"train": {"lr_decay_style": "step"}}, "train.lr_decay_style", "cosine"),
    ({"train": {"adam_beta2": 1.0}}, "train.adam_beta2", "[0, 1)"),
    ({"data": {"valid_fraction": 0.0}}, "data.valid_fraction", "(0, 1)"),
    ({"data": {"source": "s3"}}, "data.source", "embedded"),
    ({"run": {"wandb": {"mode": "cloud"}}}, "run.wandb.mode", "offline"),
    ({"model": {"num_layers": "four"}}, "model.num_layers", "integer"),
    ({"rexmoe": {"psr": {"protect_local": "yes"}}}, "rexmoe.psr.protect_local", "true or false"),
    ({"model": {"num_expert": 8}}, "model.num_expert", "num_moe_experts"),
    ({"model": {"moe_grouped_gemm": "yes"}}, "model.moe_grouped_gemm", "auto, true, false"),
    ({"model": {"moe_grouped_gemm": 1}}, "model.moe_grouped_gemm", "auto, true, false"),
    ({"model": {"recompute_granularity": "layer"}}, "model.recompute_granularity", "full, selective"),
    ({"model": {"recompute_granularity": "full", "recompute_num_layers": 1}}, "model.recompute_method", "uniform, block"),
    ({"model": {"recompute_granularity": "full", "recompute_method": "uniform"}}, "model.recompute_num_layers", "[1, model.num_layers]"),
    ({"model": {"recompute_granularity": "selective", "recompute_num_layers": 1}}, "model.recompute_num_layers", "null unless"),
    ({"model": {"recompute_granularity": "selective", "recompute_modules": ["attn"]}}, "model.recompute_modules", "core_attn, moe_act"),
    ({"model": {"recompute_modules": ["moe"]}}, "model.recompute_modules", "null unless"),
    ({"model": {"recompute_granularity": "selective", "recompute_modules": ["layernorm"],
                "transformer_impl": "local"}}, "model.recompute_modules", "needs Transformer Engine"),
    ({"model": {"recompute_granularity": "selective", "recompute_modules": ["moe_act"], "moe_grouped_gemm": False}},
     "model.recompute_modules", "moe_grouped_gemm=true"),
]


def _tiny_dict(overrides: dict) -> dict:
    import dataclasses

    base = dataclasses.asdict(ExperimentConfig())
    base["model"].update(num_layers=4, hidden_size=128, num_attention_heads=4, num_moe_experts=8)
    base["rexmoe"]["reuse_group_size"] = 4
    base["rexmoe"]["psr"].update(schedule="linear", start_step=0, end_step=10)

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(base, overrides)
    return base


def test_default_and_tiny_are_valid():
    ExperimentConfig().validate(world_size=1)
    experiment_from_dict(_tiny_dict({})).validate(world_size=1)


@pytest.mark.parametrize("overrides,field,allowed", BAD, ids=lambda v: str(v)[:60])
def test_bad_value_names_field(overrides, field, allowed):
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(_tiny_dict(overrides)).validate(world_size=1)
    message = str(err.value)
    assert "\n" not in message
    assert field in message and allowed in message, message


def test_pp4_with_groups_of_two_is_fine_pp2_splitting_a_group_is_not():
    ok = _tiny_dict({"parallel": {"pipeline_model_parallel_size": 2}, "rexmoe": {"reuse_group_size": 2}})
    experiment_from_dict(ok).validate()
    bad = _tiny_dict({"parallel": {"pipeline_model_parallel_size": 2}})
    with pytest.raises(ConfigError, match="stage 1 .* inside reuse group 0"):
        experiment_from_dict(bad).validate()


def test_partial_last_group_allowed_when_asked():
    cfg = _tiny_dict({"rexmoe": {"reuse_group_size": 3, "allow_partial_last_group": True}})
    experiment = experiment_from_dict(cfg).validate()

    assert [g.size for g in experiment.reuse_plan().groups] == [3, 1]


def test_world_size_layout_checks():
    cfg = experiment_from_dict(_tiny_dict({"parallel": {"expert_model_parallel_size": 2}}))
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="parallel.expert_model_parallel_size"):
        cfg.validate(world_size=3)
    cfg = experiment_from_dict(_tiny_dict({"train": {"global_batch_size": 8, "micro_batch_size": 8}}))
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        cfg.validate(world_size=2)


@pytest.mark.parametrize("train_iters,warmup", [(1, 0), (3, 0), (10, 1), (20, 2), (150, 15), (250, 20), (47684, 20)])
def test_warmup_default_follows_run_length(train_iters, warmup):
    """A smoke run of any length is valid without naming the warm-up; an explicit one is kept."""
    cfg = experiment_from_dict(_tiny_dict({"train": {"train_iters": train_iters}})).validate(world_size=1)
    assert cfg.train.lr_warmup_iters is None and cfg.train.resolved_lr_warmup_iters() == warmup
    cfg = experiment_from_dict(_tiny_dict({"train": {"train_iters": 300, "lr_warmup_iters": 7}})).validate()
    assert cfg.train.resolved_lr_warmup_iters() == 7
