"""Weights + optimizer bytes by Megatron-LM's accounting: against the built model's parameters, the dry
run's counts, and megatron's formula worked by hand for Mixtral 8x7B at its published layout."""

from __future__ import annotations

import pytest

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.plan.theory import bytes_per_parameter, weights_and_optimizer_bytes
from rexmoe_train.tools.dry_run import parameter_counts
from tests.helpers import tiny_config


def test_bytes_per_parameter_is_megatrons():
    assert bytes_per_parameter(bf16=True, distributed_optimizer=False, data_parallel_size=8) == 18
    assert bytes_per_parameter(bf16=True, distributed_optimizer=True, data_parallel_size=8) == 6 + 12 / 8
    assert bytes_per_parameter(bf16=False, distributed_optimizer=False, data_parallel_size=8) == 16
    assert bytes_per_parameter(bf16=False, distributed_optimizer=True, data_parallel_size=4) == 8 + 8 / 4


@pytest.mark.parametrize("r,dense,shared,untie,qk", [(4, 0, None, True, False), (2, 2, 32, True, True),
                                                     (1, 0, None, False, False)])
def test_one_rank_holds_what_the_dry_run_counts(r, dense, shared, untie, qk):
    cfg = tiny_config(r=r, layers=4 + dense)
    cfg.model.first_k_dense_layers = dense
    cfg.model.moe_shared_expert_intermediate_size = shared
    cfg.model.untie_embeddings_and_output_weights = untie
    cfg.model.qk_layernorm = qk
    got = weights_and_optimizer_bytes(cfg, 1, vocab_size=257, bf16=False)
    total = parameter_counts(cfg, 257)["total"]
    assert got["params"] == total
    assert got["bytes"] == 16 * total  # fp32: weight 4, main grad 4, Adam m and v 8
    assert got["by_category"] == {"parameters": 4 * total, "gradients": 4 * total, "optimizer": 8 * total}
    assert weights_and_optimizer_bytes(cfg, 1, vocab_size=257, bf16=True)["bytes"] == 18 * total


def test_one_rank_holds_the_built_models_parameters(layout):
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=2)
    cfg.model.moe_shared_expert_intermediate_size = 32
    layout(cfg.parallel)
    model = build_model(cfg, 257).chunks[0]
    assert weights_and_optimizer_bytes(cfg, 1, vocab_size=257)["params"] == sum(
        p.numel() for p in model.parameters())


def _storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_a_real_training_step_holds_what_the_accounting_says(megatron_world, tmp_path):
    """After one real step (fp32 on CPU, megatron DDP + optimizer): the parameters, the DDP's main-grad
    buffer and Adam's state tensors, counted by storage, are the three categories, byte for byte."""
    import torch

    from tests.helpers import make_trainer

    cfg = tiny_config(r=2)
    cfg.run.dir, cfg.run.progress = str(tmp_path), False
    trainer = make_trainer(cfg)
    trainer.train_step()
    params = [p for chunk in trainer.chunks for p in chunk.parameters()]
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    state = [v for o in optimizers for s in o.optimizer.state.values() for v in s.values()
             if torch.is_tensor(v) and v.dim() > 0]
    got = weights_and_optimizer_bytes(cfg, 1, vocab_size=trainer.vocab_size, bf16=False)["by_category"]
    assert got == {"parameters": _storage_bytes(params), "gradients": _storage_bytes([p.main_grad for p in params]),
                   "optimizer": _storage_bytes(state)}


def _mixtral(world_pp_ep_tp=(64, 4, 8, 1), vpp=8) -> ExperimentConfig:
    cfg = ExperimentConfig()
    m, p, t = cfg.model, cfg.parallel, cfg.train
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = 32, 4096, 32, 8
    m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size = 8, 2, 14336
    m.vocab_size, m.make_vocab_size_divisible_by = 32000, 128
    _, p.pipeline_model_parallel_size, p.expert_model_parallel_size, p.tensor_model_parallel_size = world_pp_ep_tp
    p.virtual_pipeline_model_parallel_size = vpp
    p.use_distributed_optimizer = True
    t.seq_length, t.micro_batch_size, t.global_batch_size = 4096, 1, 256
    return cfg


def test_mixtral_at_its_published_layout_equals_megatrons_formula_by_hand():
    """theoretical_memory_usage.py's weight-and-optimizer term, worked by hand: TP1 PP4 EP8, 64 ranks,
    distributed optimizer, dp 16, expert-dp 2. Per layer: attention 4096*(32+2*8)*128 + 32*128*4096 =
    41,943,040; norms 2*4096; router 8*4096; experts 8*3*4096*14336 = 1,409,286,144. Megatron's most
    loaded shard (the first stage): tp-sharded 8 layers of attention + the 32000*4096 embedding;
    replicated (32 layers of norms and routers + the final norm) / 4; experts 32 layers / 4 / 8.
    Bytes: (tp-sharded + replicated) * (6 + 12/16) + experts * (6 + 12/2)."""
    tp_sharded = 8 * 41_943_040 + 32000 * 4096
    replicated = (32 * (2 * 4096 + 8 * 4096) + 4096) / 4
    experts = 32 * 1_409_286_144 / 4 / 8
    megatron = (tp_sharded + replicated) * 6.75 + experts * 12
    got = weights_and_optimizer_bytes(_mixtral(), 64)
    first = got["stages"][0]
    # the only difference: the final norm (4096 weights) sits on the last stage here, as built
    assert first["bytes"] == pytest.approx(megatron - 4096 / 4 * 6.75, rel=0, abs=1e-3)
    assert abs(first["bytes"] - megatron) / megatron < 1e-6
    assert first["expert_params"] == experts and got["dp"] == 16 and got["edp"] == 2
    # the last stage holds the output layer (untied) instead of the embedding, and the final norm
    assert got["stage"] == 3 and got["bytes"] == pytest.approx(first["bytes"] + 4096 * 6.75)
    assert 18.6 < got["bytes"] / 2 ** 30 < 18.8


def test_tensor_and_expert_tensor_sharding_by_hand():
    """TP 2, PP 2 (no interleaving), EP 4, 16 ranks, no distributed optimizer: 18 bytes per parameter,
    parameters held: tp-sharded / 2, replicated whole, experts / 4."""
    cfg = _mixtral((16, 2, 4, 2), vpp=None)
    cfg.parallel.use_distributed_optimizer = False
    got = weights_and_optimizer_bytes(cfg, 16)
    stage0 = (16 * 41_943_040 + 32000 * 4096) / 2 + 16 * (2 * 4096 + 8 * 4096) + 16 * 1_409_286_144 / 4
    assert got["stages"][0]["params"] == stage0
    assert got["stages"][0]["bytes"] == 18 * stage0
    assert got["stages"][1]["params"] == stage0 + 4096  # + the final norm


def test_bad_layout_and_missing_vocab_fail_in_one_line():
    from rexmoe_train.core.errors import ConfigError

    with pytest.raises(ConfigError, match="parallel.expert_model_parallel_size"):
        weights_and_optimizer_bytes(_mixtral(), 60)
    cfg = tiny_config()
    with pytest.raises(ValueError, match="vocab_size"):
        weights_and_optimizer_bytes(cfg, 1)


def _paper(model: str, *overrides: str) -> ExperimentConfig:
    from rexmoe_train.config.compose import compose_experiment

    return compose_experiment([f"model={model}", *overrides]).experiment


def test_local_attention_lower_bound_counts_one_score_copy_per_kept_layer():
    from rexmoe_train.plan.theory import local_attention_lower_bound

    cfg = _paper("rexmoe_2.3b")
    m, t = cfg.model, cfg.train
    bound = local_attention_lower_bound(cfg, 8)
    per_layer = t.micro_batch_size * m.num_attention_heads * t.seq_length ** 2 * (4 + 2)  # fp32 softmax + bf16 probs
    assert bound["scores_bytes"] == m.num_layers * per_layer
    assert bound["weights_bytes"] == weights_and_optimizer_bytes(cfg, 8, bf16=True)["bytes"]
    full = _paper("rexmoe_2.3b", "model.recompute_granularity=full", "model.recompute_method=uniform",
                  "model.recompute_num_layers=1")
    assert local_attention_lower_bound(full, 8)["scores_bytes"] == per_layer  # the layer being recomputed
    block = _paper("rexmoe_2.3b", "model.recompute_granularity=full", "model.recompute_method=block",
                   "model.recompute_num_layers=5")
    assert local_attention_lower_bound(block, 8)["scores_bytes"] == (m.num_layers - 5) * per_layer
    tp2 = _paper("rexmoe_2.3b", "parallel.tensor_model_parallel_size=2")
    assert local_attention_lower_bound(tp2, 16)["scores_bytes"] == m.num_layers * per_layer // 2


def test_local_attention_warning_only_when_the_bound_is_over_the_gpu():
    from rexmoe_train.plan.hardware import get_gpu, usable_memory_bytes
    from rexmoe_train.plan.theory import local_attention_warning

    h100 = get_gpu("h100-sxm").memory_bytes  # the planner's table; the threshold is its usable memory
    line = local_attention_warning(_paper("rexmoe_2.3b"), 8, h100, "model=rexmoe_2.3b")
    assert line.startswith("[memory] warning: no Transformer Engine") and "\n" not in line
    assert "`rexmoe-plan model=rexmoe_2.3b --spec local`" in line
    assert f"{usable_memory_bytes(get_gpu('h100-sxm')) / 1024 ** 3:.1f} GiB a job can use" in line
    # the planner's local rows (docs/planning.md): only the 18.7B, with full recompute, fits without TE
    assert local_attention_warning(_paper("rexmoe_18.7b_se"), 8, h100) is None
    assert local_attention_warning(_paper("rexmoe_0.5b"), 8, h100) is not None
    assert local_attention_warning(_paper("rexmoe_7b_se"), 8, h100) is not None  # measured: 107 GiB


@pytest.mark.slow
def test_local_attention_bound_is_below_the_planners_measured_peak():
    """A lower bound: below what the planner measures for the same config on the local spec (a
    small model at a long sequence, so the scores dominate as they do in the paper recipes)."""
    from rexmoe_train.plan.planner import PlanOptions
    from rexmoe_train.plan.search import make_plan
    from rexmoe_train.plan.theory import local_attention_lower_bound

    overrides = ["train.seq_length=1024", "train.micro_batch_size=2", "train.global_batch_size=2",
                 "model.vocab_size=512", "train.bf16=true"]
    plan = make_plan(overrides, PlanOptions(gpu="h100-sxm", spec="local", hot_factor=1.0, suggest=False))
    bound = local_attention_lower_bound(_paper("tiny", *overrides), plan["world_size"])
    measured = plan["per_rank"][0]
    assert bound["bytes"] <= plan["peak_bytes"], (bound, plan["peak_bytes"])
    assert bound["scores_bytes"] <= measured["by_category"]["activations"]
    assert bound["scores_bytes"] >= 0.5 * measured["by_category"]["activations"]  # and not a vacuous one
