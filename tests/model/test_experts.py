"""Expert banks: each expert stored once, and a reused expert gets the sum of its routers' gradients."""

from __future__ import annotations

import copy

import torch

from tests.helpers import tiny_config


def _build(cfg, vocab=96):
    from rexmoe_train.model.gpt import build_model

    return build_model(cfg, vocab)


def _tokens(cfg, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (2, cfg.train.seq_length), generator=g)
    pos = torch.arange(cfg.train.seq_length).unsqueeze(0).expand(2, -1)
    return x, pos


def _copy_module(module):
    """deepcopy that shares (cannot copy) process groups."""
    groups = {id(v): v for m in module.modules() for v in vars(m).values()
              if type(v).__name__ == "ProcessGroup"}
    return copy.deepcopy(module, memo=dict(groups))


def test_reused_expert_gradient_is_sum_over_layers(layout):
    """Reference by duplicating weights: give every layer its own copy of the bank, run the same
    forward/backward, and add the copies' gradients: that must equal the shared bank's gradient."""
    cfg = tiny_config(r=4, layers=4)
    cfg.rexmoe.balance.layer_aux_coeff = 0.0  # keep the comparison to the LM path
    cfg.rexmoe.balance.z_loss_coeff = 0.0
    layout(cfg.parallel)
    built = _build(cfg)
    model = built.chunks[0]
    layers = [layer.mlp for layer in model.decoder.layers]
    bank = model.expert_banks.banks["0"]
    assert all(layer.experts is bank for layer in layers)
    x, pos = _tokens(cfg)

    model(x, pos, None, labels=x).float().mean().backward()
    shared = [p.grad.clone() for p in bank.parameters()]
    used_by = torch.stack([layer.router.step_load > 0 for layer in layers])  # [layers, candidates]
    assert (used_by.sum(0) >= 2).any(), "some expert must be chosen by several layers"

    model.zero_grad(set_to_none=True)
    copies = [_copy_module(bank) for _ in layers]
    for layer, own in zip(layers, copies):
        layer.__dict__["experts"] = own
    model(x, pos, None, labels=x).float().mean().backward()
    summed = [torch.stack(ps).sum(0) for ps in zip(*[[p.grad for p in c.parameters()] for c in copies])]
    for got, want in zip(shared, summed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # and it really is several layers' worth: no single copy holds the whole gradient
    single = [p.grad for p in copies[0].parameters()]
    assert any((s - w).abs().max() > 1e-6 for s, w in zip(single, summed))


def test_parameter_counts_expert_same_as_vanilla_router_r_times(layout):
    counts = {}
    for r in (1, 4):
        cfg = tiny_config(r=r, layers=4)
        layout(cfg.parallel)
        model = _build(cfg).chunks[0]
        named = list(model.named_parameters())
        counts[r] = {
            "experts": sum(p.numel() for n, p in named if n.startswith("expert_banks.")),
            "routers": sum(p.numel() for n, p in named if ".router." in n),
            "other": sum(p.numel() for n, p in named if "expert_banks" not in n and ".router." not in n),
            "params": len({id(p) for _, p in named}),
        }
    assert counts[4]["experts"] == counts[1]["experts"] > 0
    # expert weights reduce over the expert-data-parallel group even at ep=1 (megatron would mark
    # them allreduce=True there: wrong at tp>1 with expert_tensor_parallel_size=1)
    assert all(p.allreduce is False for n, p in named if n.startswith("expert_banks."))
    assert all(getattr(p, "allreduce", True) for n, p in named if not n.startswith("expert_banks."))
    assert counts[4]["routers"] == 4 * counts[1]["routers"]
    assert counts[4]["other"] == counts[1]["other"]
    h, n, layers = 64, 8, 4
    assert counts[1]["routers"] == layers * n * h


def test_checkpoint_keys_are_owner_layer_and_expert(layout):
    """Sharded keys do not depend on r or placement: (owner MoE layer, expert) like vanilla layers."""
    cfg = tiny_config(r=2, layers=4)
    layout(cfg.parallel)
    model = _build(cfg).chunks[0]
    sd = model.sharded_state_dict()
    fc2 = [v for k, v in sd.items() if k.startswith("expert_banks.") and k.endswith("linear_fc2.weight")]
    assert len(fc2) == 4 * 8  # every physical expert once
    assert {t.key for t in fc2} == {"expert_banks.experts.linear_fc2.weight"}
    offsets = sorted((t.global_offset[0], t.global_offset[1]) for t in fc2)
    assert offsets == [(layer, e) for layer in range(4) for e in range(8)]
    assert all(t.global_shape[:2] == (4, 8) for t in fc2)
