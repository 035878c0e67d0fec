"""Dry run: the analytic counts equal a built model's, and the paper's models come out as published."""

from __future__ import annotations

import pytest

from rexmoe_train.config.compose import compose_experiment
from rexmoe_train.tools.dry_run import describe, parameter_counts
from tests.helpers import tiny_config


def compose_config(*overrides: str):
    return compose_experiment([*overrides, "run.dir=unused"]).experiment


@pytest.mark.parametrize("r,dense,shared", [(4, 0, None), (2, 2, 32), (1, 0, None)])
def test_counts_equal_built_model(layout, r, dense, shared):
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=r, layers=4 + dense)
    cfg.model.first_k_dense_layers = dense
    cfg.model.moe_shared_expert_intermediate_size = shared
    layout(cfg.parallel)
    model = build_model(cfg, 257).chunks[0]
    named = list(model.named_parameters())
    counts = parameter_counts(cfg, 257)
    assert counts["total"] == sum(p.numel() for _, p in named)
    assert counts["experts"] == sum(p.numel() for n, p in named if n.startswith("expert_banks."))
    assert counts["routers"] == sum(p.numel() for n, p in named if ".router." in n)


def test_paper_2p3b_matches_published_sizes():
    cfg = compose_config("model=rexmoe_2.3b", "train=paper")
    counts = parameter_counts(cfg, 32000)
    assert 2.3e9 < counts["total"] < 2.5e9  # "2.3B"
    assert 0.3e9 < counts["active_per_token"] < 0.4e9  # "A0.3B"
    overhead = counts["router_overhead_vs_vanilla"] / counts["total"]
    assert 0.0010 < overhead < 0.0016  # the paper: about +0.14% at r=4


def test_paper_7b_se_matches_published_sizes():
    """REX-7BA3B-SE-R3 is published as about 7.5B stored / 3B active: the 64-expert pool is shared by
    the r=3 layers of a group. 64 experts per layer is another model, kept under its real size."""
    counts = parameter_counts(compose_config("model=rexmoe_7b_se", "train=paper"), 32000)
    assert 7.0e9 < counts["total"] < 8.0e9  # "about 7.5B"
    assert 2.5e9 < counts["active_per_token"] < 3.2e9  # "A3B"
    counts = parameter_counts(compose_config("model=rexmoe_18.7b_se", "train=paper"), 32000)
    assert 18.6e9 < counts["total"] < 18.8e9
    assert 2.5e9 < counts["active_per_token"] < 3.2e9  # same activated shape, 2.4x the stored experts


def test_describe_ep2_pp2_layout_without_training():
    cfg = compose_config("model=tiny", "rexmoe.reuse_group_size=2",
                         "parallel.expert_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    text = describe(cfg, 257)
    assert "world size 4: tp=1 pp=2" in text and "ep=2" in text
    assert "stage 0 chunk 0: layers 1-2, reuse groups [0]" in text
    assert "stage 1 chunk 0: layers 3-4, reuse groups [1]" in text
    assert "candidate    9 (owner +1, expert   1) -> rank 0, slot 5" in text


def _saved_activation_bytes(cfg, vocab: int) -> int:
    """Reference: bytes of the distinct non-parameter storages autograd saves during one training
    forward of a built model (torch's saved-tensor hooks)."""
    import torch

    from rexmoe_train.model.gpt import build_model

    model = build_model(cfg, vocab).chunks[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, vocab, (cfg.train.micro_batch_size, cfg.train.seq_length),
                      generator=torch.Generator().manual_seed(0))
    pos = torch.arange(cfg.train.seq_length).unsqueeze(0).expand_as(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, pos, None, labels=x)
    return sum(saved.values())


RECOMPUTE = {
    "none": {},
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    "core_attn": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
}


def test_activation_estimate_follows_recompute(layout):
    """The dry run's saved-activation estimate is within 15% of what autograd really keeps, for no
    recompute and each recompute setting, and `describe` prints it."""
    import dataclasses

    from rexmoe_train.tools.dry_run import activation_bytes

    estimates, measured = {}, {}
    for name, fields in RECOMPUTE.items():
        cfg = tiny_config(r=4, layers=4, hidden=128)
        cfg.model = dataclasses.replace(cfg.model, moe_ffn_hidden_size=256, **fields)
        cfg.train.seq_length, cfg.train.micro_batch_size = 256, 2
        layout(cfg.parallel)
        measured[name] = _saved_activation_bytes(cfg, 257)
        estimates[name] = activation_bytes(cfg, False, 257)
    none = measured["none"]
    for name in RECOMPUTE:
        est = estimates[name]["saved_gib"] * 2**30
        assert abs(est - measured[name]) <= 0.15 * (none if name == "full" else measured[name]), (
            name, est, measured[name])
    assert measured["full"] < measured["moe"] < measured["core_attn"] < none  # really recomputed
    assert estimates["full"]["activations_gib"] > estimates["full"]["saved_gib"]  # + one replay
    assert estimates["none"]["recompute_extra_compute"] == 0
    assert estimates["full"]["recompute_extra_compute"] == round(1 / 3, 4)
    cfg = tiny_config(r=4, layers=4)
    cfg.model = dataclasses.replace(cfg.model, **RECOMPUTE["full"])
    # the dry run prints no activation formula (the planner measures them: one source of truth)
    assert "activations per rank" not in describe(cfg, 257)



def test_dry_run_names_the_planner_as_the_memory_source_of_truth():
    from rexmoe_train.plan.theory import weights_and_optimizer_bytes

    cfg = compose_config("model=rexmoe_2.3b")
    text = describe(cfg, 32000)
    [line] = [line for line in text.splitlines() if line.startswith("memory: for the peak per rank")]
    assert "rexmoe-plan" in line
    # weights + grads + optimizer: megatron's accounting (plan/theory.py, which the planner's simulated
    # categories are checked against); the 2.3B recipe at ep 8 in bf16: 5.84 GiB (the old formula: 7.14)
    [memory] = [line for line in text.splitlines() if line.startswith("memory per rank")]
    total = weights_and_optimizer_bytes(cfg, 8, vocab_size=32000, bf16=True)["bytes"] / 1024 ** 3
    assert memory.endswith(f"total={total:.2f} GiB") and f"total={total:.2f}" == "total=5.84"
