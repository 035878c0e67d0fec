"""Expert banks: each expert stored once, and a reused expert gets the sum of its routers' gradients."""

from __future__ import annotations

import copy

import pytest
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


# -- grouped bank (model.moe_grouped_gemm) ---------------------------------------------------------
def _bank_pair(cfg, layout):
    """The SequentialMLP bank and the grouped bank of the same model, with equal weights."""
    from rexmoe_train.model.experts import ExpertBank, GroupedExpertBank

    banks = {}
    for grouped in (False, True):
        cfg.model.moe_grouped_gemm = grouped
        layout(cfg.parallel)
        banks[grouped] = _build(cfg)
    loop, grouped = banks[False], banks[True]
    grouped.chunks[0].load_state_dict(loop.chunks[0].state_dict())
    assert type(loop.chunks[0].expert_banks.banks["0"]) is ExpertBank
    assert type(grouped.chunks[0].expert_banks.banks["0"]) is GroupedExpertBank
    return loop, grouped


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _bank_fwd_bwd(bank, x, counts, probs, out_grad):
    """One forward + backward through a bank alone -> (output, input grad, probs grad, weight grads)."""
    xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = bank(xi, counts, pi)
    assert bias is None
    out.backward(out_grad)
    return out.detach(), xi.grad, pi.grad, _grads(bank)


def test_grouped_bank_equals_sequential_bank(layout):
    """Outputs and gradients of the grouped bank equal the SequentialMLP loop (fp32, 1e-6) at r=1
    and r=4, with uneven rows and slots that receive no row, through the bank alone."""
    for r in (1, 4):
        cfg = tiny_config(r=r, layers=4)
        loop, grouped = _bank_pair(cfg, layout)
        slots = loop.chunks[0].expert_banks.banks["0"].num_local_experts
        g = torch.Generator().manual_seed(r)
        counts = torch.randint(0, 9, (slots,), generator=g)
        counts[0] = 0  # empty first slot, empty middle slot, a large last one
        counts[slots // 2] = 0
        counts[-1] = 23
        rows = int(counts.sum())
        x = torch.randn(rows, cfg.model.hidden_size, generator=g)
        probs = torch.rand(rows, generator=g)
        out_grad = torch.randn(rows, cfg.model.hidden_size, generator=g)
        results = []
        assert grouped.chunks[0].expert_banks.banks["0"].grouped_ok(x)  # really the grouped path
        for built in (loop, grouped):
            results.append(_bank_fwd_bwd(built.chunks[0].expert_banks.banks["0"], x, counts, probs, out_grad))
        (o1, x1, p1, w1), (o2, x2, p2, w2) = results
        torch.testing.assert_close(o2, o1, rtol=0, atol=1e-6)
        torch.testing.assert_close(x2, x1, rtol=0, atol=1e-6)
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-6)
        assert w1.keys() == w2.keys() and len(w1) == 2 * slots
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-6)
        # the empty slots' weights got exactly zero gradient on both paths
        assert w2["local_experts.0.linear_fc1.weight"].abs().max() == 0
        assert w1["local_experts.0.linear_fc1.weight"].abs().max() == 0


def test_grouped_bank_model_loss_and_grads_equal(layout):
    """The whole r=4 model: loss and every gradient equal with the grouped and the loop bank, and
    the checkpoint keys/offsets are the loop bank's."""
    cfg = tiny_config(r=4, layers=4)
    loop, grouped = _bank_pair(cfg, layout)
    x, pos = _tokens(cfg)
    assert grouped.chunks[0].expert_banks.banks["0"].grouped_ok(torch.zeros(1, cfg.model.hidden_size))
    losses, grads = [], []
    for built in (loop, grouped):
        model = built.chunks[0]
        loss = model(x, pos, None, labels=x).float().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(model))
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6)
    keys = []
    for built in (loop, grouped):
        sd = built.chunks[0].sharded_state_dict()
        keys.append({k: (v.key, getattr(v, "global_offset", None), getattr(v, "global_shape", None))
                     for k, v in sd.items() if k.startswith("expert_banks.")})
    assert keys[0] == keys[1] and len(keys[0]) == 4 * 4 * 8  # (fc1, fc2) x (weight, _extra_state)


def test_grouped_bank_falls_back_where_grouped_mm_cannot_run(layout):
    """A row width that is not 16-byte aligned cannot use grouped_mm: the bank takes the loop."""
    cfg = tiny_config(r=2, layers=2)
    cfg.model.moe_ffn_hidden_size = 66  # 66 fp32 = 264 bytes: not a multiple of 16
    loop, grouped = _bank_pair(cfg, layout)
    bank = grouped.chunks[0].expert_banks.banks["0"]
    x = torch.randn(5, cfg.model.hidden_size)
    assert not bank.grouped_ok(x)
    counts = torch.tensor([2] + [0] * (bank.num_local_experts - 2) + [3])
    probs = torch.rand(5)
    ref = loop.chunks[0].expert_banks.banks["0"](x, counts, probs)[0]
    torch.testing.assert_close(bank(x, counts, probs)[0], ref, rtol=0, atol=0)


def test_grouped_bank_stacks_once_per_forward_pass(layout):
    """The r layers of a group share one stacked copy of the bank's weights per forward pass of the
    chunk (released when the pass ends), and a weight changed in place inside a pass is restacked."""
    cfg = tiny_config(r=4, layers=4)
    loop, grouped = _bank_pair(cfg, layout)
    bank = grouped.chunks[0].expert_banks.banks["0"]
    stacked = []
    original = bank._stacked
    bank._stacked = lambda fc1, fc2: stacked.append(original(fc1, fc2)) or stacked[-1]
    x, pos = _tokens(cfg)
    grouped.chunks[0](x, pos, None, labels=x).float().mean().backward()
    assert len(stacked) == 4  # one call per layer of the group ...
    assert len({id(fc1) for fc1, _ in stacked}) == 1  # ... all with the same stacked tensor
    assert bank._stacks is None and not bank._in_forward_pass  # released after the pass

    # inside a pass, a weight changed in place is restacked (the key holds its version)
    loop_bank = loop.chunks[0].expert_banks.banks["0"]
    counts = torch.full((bank.num_local_experts,), 2)
    h, probs = torch.randn(int(counts.sum()), cfg.model.hidden_size), torch.rand(int(counts.sum()))
    bank.begin_forward_pass()
    bank(h, counts, probs)
    with torch.no_grad():
        for b in (bank, loop_bank):
            b.local_experts[3].linear_fc2.weight.mul_(2.0)
    out = bank(h, counts, probs)[0]
    bank.end_forward_pass()
    torch.testing.assert_close(out, loop_bank(h, counts, probs)[0], rtol=0, atol=1e-6)


def test_lean_loop_equals_megatron_sequential_mlp(layout):
    """The loop bank's own forward (F.linear per slot, megatron's MLP modules taken out) gives the
    outputs and gradients of megatron's SequentialMLP.forward on the same weights (fp32, 1e-6), at
    r=1 and r=4, with empty and uneven slots; a config it does not cover takes megatron's path."""
    from rexmoe_train.model.experts import ExpertBank

    for r in (1, 4):
        cfg = tiny_config(r=r, layers=4)
        layout(cfg.parallel)
        bank = _build(cfg).chunks[0].expert_banks.banks["0"]
        assert type(bank) is ExpertBank and bank._lean_loop
        g = torch.Generator().manual_seed(10 + r)
        counts = torch.randint(0, 9, (bank.num_local_experts,), generator=g)
        counts[0], counts[-1] = 0, 17
        rows = int(counts.sum())
        x, probs = torch.randn(rows, cfg.model.hidden_size, generator=g), torch.rand(rows, generator=g)
        out_grad = torch.randn(rows, cfg.model.hidden_size, generator=g)
        results = []
        for lean in (True, False):
            bank._lean_loop = lean
            bank.zero_grad(set_to_none=True)
            results.append(_bank_fwd_bwd(bank, x, counts, probs, out_grad))
        (o1, x1, p1, w1), (o2, x2, p2, w2) = results
        for a, b in ((o1, o2), (x1, x2), (p1, p2), *((w1[k], w2[k]) for k in w2)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert w1.keys() == w2.keys() and len(w1) == 2 * bank.num_local_experts
    # what the direct paths (lean loop, grouped) do not implement goes to megatron's modules
    from rexmoe_train.model.experts import _unsupported_by_direct_path

    assert _unsupported_by_direct_path(bank.config) is None
    for field, value, why in (("add_bias_linear", True, "biased"), ("fp8", "hybrid", "fp8"),
                              ("use_te_activation_func", True, "TE activation")):
        changed = copy.copy(bank.config)
        setattr(changed, field, value)
        assert why in _unsupported_by_direct_path(changed)


def test_grouped_mm_probe_answers_the_same_under_no_grad(monkeypatch):
    """A run's first expert forward is usually without autograd (the step-0 evaluation, full
    recompute's first pass). The probe must still find grouped_mm working there, or the cached False
    sends every grouped bank to the loop for the whole run."""
    from rexmoe_train.model import experts

    if experts._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    monkeypatch.setattr(experts, "_GROUPED_MM_WORKS", {})
    with torch.no_grad():
        first = experts.grouped_mm_available(torch.device("cpu"), torch.float32)
    assert first and experts._GROUPED_MM_WORKS == {("cpu", torch.float32): True}
    monkeypatch.setattr(experts, "_GROUPED_MM_WORKS", {})
    with torch.inference_mode():
        assert experts.grouped_mm_available(torch.device("cpu"), torch.float32)
