"""ReuseGroupRuntime: one per reuse group, built once in build_model and handed to the layers."""

from __future__ import annotations

from tests.helpers import tiny_config


def test_one_runtime_per_group_shared_by_its_layers(layout):
    from rexmoe_train.model.gpt import build_model
    from rexmoe_train.model.moe_layer import ReXMoELayer

    cfg = tiny_config(r=2, layers=4)
    layout(cfg.parallel)
    model = build_model(cfg, 96)
    (chunk,), (runtimes,) = model.chunks, model.runtimes
    assert sorted(runtimes) == [0, 1]
    layers = [m for m in chunk.modules() if isinstance(m, ReXMoELayer)]
    assert [layer.moe_layer for layer in layers] == [0, 1, 2, 3]
    for layer in layers:
        runtime = runtimes[layer.group.index]
        assert layer.experts is runtime.bank and layer.router.group_balance is runtime.balance
        assert layer.placement is runtime.placement and layer.config is runtime.layer_config
        assert layer.router.weight.shape[0] == runtime.group.num_candidates == 16
    # each bank registered exactly once, on the model, never inside a layer
    banks = [name for name, m in chunk.named_modules() if m is runtimes[0].bank]
    assert banks == ["expert_banks.banks.0"]
    assert all(p is not q for p in runtimes[0].bank.parameters() for q in runtimes[1].bank.parameters())
    # routers are found by walking the modules, in model order
    assert [r.moe_layer for r in model.routers] == [0, 1, 2, 3]
    assert model.dedup_dispatchers == []


def test_building_a_layer_has_no_side_effects(layout):
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from rexmoe_train.core.psr import PSRState
    from rexmoe_train.model.gpt import transformer_config
    from rexmoe_train.model.moe_layer import ReXMoELayer
    from rexmoe_train.model.runtime import build_group_runtimes

    cfg = tiny_config(r=2, layers=4)
    layout(cfg.parallel)
    tc = transformer_config(cfg)
    submodules = get_gpt_layer_local_spec(num_experts=cfg.model.num_moe_experts).submodules.mlp.submodules
    plan = cfg.reuse_plan()
    runtime = build_group_runtimes(cfg, tc, plan, PSRState(0), submodules.experts, plan.groups[:1])[0]
    before = (dict(vars(runtime)), sum(p.numel() for p in runtime.bank.parameters()))
    first = ReXMoELayer(tc, copy.deepcopy(submodules), layer_number=1, runtime=runtime, moe_layer=0)
    second = ReXMoELayer(tc, copy.deepcopy(submodules), layer_number=2, runtime=runtime, moe_layer=1)
    assert (dict(vars(runtime)), sum(p.numel() for p in runtime.bank.parameters())) == before
    assert first.experts is second.experts is runtime.bank
    assert "experts" not in dict(first.named_children())  # a reference, not a registered submodule


def test_pipeline_chunks_get_only_their_groups(layout):
    from rexmoe_train.model.gpt import chunk_groups

    cfg = tiny_config(r=2, layers=8)
    assert [g.index for g in chunk_groups(cfg, 0, 4)] == [0, 1]
    assert [g.index for g in chunk_groups(cfg, 4, 4)] == [2, 3]
    cfg.model.first_k_dense_layers = 2
    cfg.model.num_layers = 10
    assert [g.index for g in chunk_groups(cfg, 0, 2)] == []  # dense only
    assert [g.index for g in chunk_groups(cfg, 2, 4)] == [0, 1]
