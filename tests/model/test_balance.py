"""Balance losses against hand-written formulas."""

from __future__ import annotations

import torch

from tests.helpers import tiny_config


def _world_group():
    import torch.distributed as dist

    return dist.group.WORLD


def test_group_pooled_loss_matches_hand_formula(megatron_world):
    from rexmoe_train.model.balance import GroupBalance, ScopedCounts, load_violation

    g = torch.Generator().manual_seed(0)
    r, c, k, t = 3, 12, 2, 50
    counts = ScopedCounts("micro_batch", _world_group(), _world_group())
    balance = GroupBalance(r, c, coeff=0.5, counts=counts)
    scores, maps = [], []
    for pos in range(r):
        s = torch.softmax(torch.randn(t, c, generator=g), -1).requires_grad_(True)
        top = torch.topk(s, k, dim=1).indices
        m = torch.zeros(t, c, dtype=torch.bool).scatter(1, top, True)
        scores.append(s)
        maps.append(m)
        entry = balance.count(pos, m)
        out = balance.loss(entry, pos, s, k, share=False)
        assert (out is None) == (pos < r - 1)
    # f_i: share of the r*t*k assignments; P_i: mean score over the r*t routing events
    f = torch.stack(maps).sum((0, 1)).float() / (r * t * k)
    p = torch.stack(scores).sum((0, 1)) / (r * t)
    want = 0.5 * c * (f * p).sum()
    torch.testing.assert_close(out, want)
    out.backward()
    grads = [s.grad.clone() for s in scores]
    assert all(gr.abs().sum() > 0 for gr in grads)
    # recompute: the counts were pooled in the first (no-autograd) forward; each replayed layer then
    # attaches its own term. The terms sum to the pooled loss and give each layer the same gradient.
    with torch.no_grad():
        entries = [balance.count(pos, m, autograd=False) for pos, m in enumerate(maps)]
    assert entries[0] is entries[-1] and entries[0].pooled is not None
    terms = []
    for pos in reversed(range(r)):  # replays run in reverse layer order
        scores[pos].grad = None
        term = balance.loss(entries[pos], pos, scores[pos], k, share=True)
        term.backward()
        terms.append(term.detach())
        torch.testing.assert_close(scores[pos].grad, grads[pos], rtol=0, atol=1e-7)
    torch.testing.assert_close(sum(terms), want.detach())
    assert load_violation(torch.tensor([1.0, 1.0, 4.0, 2.0])) == 1.0


def test_global_batch_scope_averages_micro_batches(megatron_world):
    from rexmoe_train.model.balance import ScopedCounts

    scoped = ScopedCounts("global_batch", _world_group(), _world_group())
    a, _ = scoped(torch.tensor([2.0, 0.0]), 1)
    b, tokens = scoped(torch.tensor([0.0, 4.0]), 1)
    assert a.tolist() == [2.0, 0.0] and b.tolist() == [1.0, 2.0] and tokens == 1
    scoped.reset()
    assert scoped(torch.tensor([3.0, 3.0]), 1)[0].tolist() == [3.0, 3.0]


def test_shared_experts_stay_per_layer(layout):
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=2, layers=4)
    cfg.model.moe_shared_expert_intermediate_size = 32
    layout(cfg.parallel)
    model = build_model(cfg, 96).chunks[0]
    names = [n for n, _ in model.named_parameters()]
    shared = [n for n in names if "shared_experts" in n]
    assert {n.split(".")[2] for n in shared} == {"0", "1", "2", "3"}  # one set per layer
    assert not any("shared" in n for n in names if n.startswith("expert_banks."))
    x = torch.randint(0, 96, (2, 32))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    model(x, pos, None, labels=x).float().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "shared_experts" in n)


def test_group_loss_reaches_all_routers_of_the_group(layout):
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=2, layers=4)
    cfg.rexmoe.balance.layer_aux_coeff = 0.0
    cfg.rexmoe.balance.z_loss_coeff = 0.0
    cfg.rexmoe.balance.group_aux_coeff = 1.0
    layout(cfg.parallel)
    model = build_model(cfg, 96).chunks[0]
    x = torch.randint(0, 96, (2, 32))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    model(x, pos, None, labels=x).float().sum().mul(0.0).backward()  # only the balance loss remains
    grads = [layer.mlp.router.weight.grad for layer in model.decoder.layers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
