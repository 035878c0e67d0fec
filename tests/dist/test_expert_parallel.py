"""ep=2: the reuse-aware placement + megatron's dispatchers compute what one rank computes alone.

Each rank first builds the ep=1 model (the same weights on both ranks) and records outputs and
gradients for its own batch; then it builds the ep=2 model, copies the weights in through the
placement map (candidate -> rank, slot) and must reproduce them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from tests.helpers import tiny_config


def _expert_params_with_reference_names(model, rank: int, experts_per_layer: int):
    """Each local expert parameter of the ep=2 model with the name of the same expert's parameter
    in the ep=1 model (where a bank's slot is its candidate index), through the placement map."""
    for key, bank in model.expert_banks.banks.items():
        for slot, expert in enumerate(bank.local_experts):
            owner, e = bank.placement.slot_owner_expert(rank, slot)
            src = f"expert_banks.banks.{key}.local_experts.{owner * experts_per_layer + e}."
            for pname, p in expert.named_parameters():
                yield p, src + pname


def _forward_backward(model, x, pos):
    losses = model(x, pos, None, labels=x)
    losses.float().sum().backward()
    return losses.detach()


# capacity: the quota is computed from each rank's own tokens before dispatch, as each rank's ep=1
# reference computes it, so dropping must give the same result in every layout and dispatcher
CASES = [(d, r, None) for r in (2, 4) for d in ("alltoall", "allgather", "rexmoe_dedup")]
CASES += [("alltoall", 4, 0.75), ("rexmoe_dedup", 4, 0.75)]


@pytest.mark.parametrize("dispatcher,r,capacity", CASES)
def test_ep2_matches_single_rank(layout, dispatcher, r, capacity):
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=r, layers=4, psr="linear", start_step=0, end_step=10)
    cfg.model.moe_expert_capacity_factor = capacity
    cfg.rexmoe.balance.layer_aux_coeff = 0.0  # local-token losses differ by design across layouts
    cfg.rexmoe.balance.z_loss_coeff = 0.0
    cfg.parallel.moe_token_dispatcher_type = dispatcher
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, 96, (2, 32), generator=g)
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)

    layout(cfg.parallel)
    ref = build_model(cfg, 96)
    ref.psr_state.set_step(5)  # mid-ramp: masking active
    ref_model = ref.chunks[0]
    ref_loss = _forward_backward(ref_model, x, pos)
    ref_params = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None}

    ep_cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, expert_model_parallel_size=2))
    layout(ep_cfg.parallel)
    ep = build_model(ep_cfg, 96)
    ep.psr_state.set_step(5)
    model = ep.chunks[0]
    n = cfg.model.num_moe_experts
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("expert_banks."):
                p.copy_(ref_params[name])
        for p, ref_name in _expert_params_with_reference_names(model, rank, n):
            p.copy_(ref_params[ref_name])
    loss = _forward_backward(model, x, pos)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if name.startswith("expert_banks."):
            continue
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # The ep=1 expert grads of rank k cover rank k's tokens; an ep=2 expert sees the tokens of both
    # ranks routed to it. So sum the reference over ranks (same names, same order on every rank).
    for name in sorted(ref_grads):
        if name.startswith("expert_banks."):
            dist.all_reduce(ref_grads[name])
    for p, ref_name in _expert_params_with_reference_names(model, rank, n):
        torch.testing.assert_close(p.grad, ref_grads[ref_name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r", [1, 4])
def test_grouped_bank_equals_sequential_bank_at_ep2(layout, r):
    """model.moe_grouped_gemm at ep=2: the grouped bank's loss and gradients equal the SequentialMLP
    bank's (fp32, 1e-6), through the bank alone (slots with no rows, uneven rows) and the model; so
    do the loop bank's own F.linear loop and megatron's SequentialMLP.forward."""
    from rexmoe_train.model.experts import ExpertBank, GroupedExpertBank
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=r, layers=4)
    cfg.parallel.expert_model_parallel_size = 2
    cfg.parallel.moe_token_dispatcher_type = "rexmoe_dedup" if r == 4 else "alltoall"
    rank = dist.get_rank()
    built = {}
    for grouped in (False, True):
        cfg.model.moe_grouped_gemm = grouped
        layout(cfg.parallel)
        built[grouped] = build_model(cfg, 96).chunks[0]
    built[True].load_state_dict(built[False].state_dict())
    banks = {k: m.expert_banks.banks["0"] for k, m in built.items()}
    assert type(banks[False]) is ExpertBank and type(banks[True]) is GroupedExpertBank
    assert banks[False]._lean_loop  # the loop bank's own F.linear loop ...
    cfg.model.moe_grouped_gemm = False
    layout(cfg.parallel)
    megatron_path = build_model(cfg, 96).chunks[0]  # ... and megatron's SequentialMLP.forward
    megatron_path.load_state_dict(built[False].state_dict())
    megatron_path.expert_banks.banks["0"]._lean_loop = False

    g = torch.Generator().manual_seed(7 + rank)
    slots = banks[True].num_local_experts
    counts = torch.randint(1, 7, (slots,), generator=g)
    counts[rank % slots] = 0
    x = torch.randn(int(counts.sum()), cfg.model.hidden_size, generator=g)
    probs = torch.rand(x.shape[0], generator=g)
    assert banks[True].grouped_ok(x)
    outs = {}
    for k, bank in banks.items():
        xi = x.clone().requires_grad_()
        out = bank(xi, counts, probs)[0]
        out.square().sum().backward()
        outs[k] = (out.detach(), xi.grad)
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    x = torch.randint(0, 96, (2, 32), generator=g)
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    results = {}
    for k, model in (*built.items(), ("megatron", megatron_path)):
        model.zero_grad(set_to_none=True)
        loss = _forward_backward(model, x, pos)
        results[k] = (loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for k in (True, "megatron"):
        torch.testing.assert_close(results[k][0], results[False][0], rtol=0, atol=1e-6)
        assert results[k][1].keys() == results[False][1].keys()
        for name, grad in results[False][1].items():
            torch.testing.assert_close(results[k][1][name], grad, rtol=0, atol=1e-6, msg=f"{k} {name}")


def test_recompute_at_ep2_counts_once(megatron_world, tmp_path):
    """ep=2, rexmoe_dedup: full and selective recompute train exactly as without, including the
    world-summed dispatch bytes (a replay re-sends, but must not re-count)."""
    from tests.helpers import RECOMPUTE_SETTINGS, assert_same_training, train_with_recompute

    shared = [str(tmp_path)]
    dist.broadcast_object_list(shared, src=0)  # one run dir for both ranks
    cfg = tiny_config(r=4, layers=4)
    cfg.parallel.expert_model_parallel_size = 2
    cfg.parallel.moe_token_dispatcher_type = "rexmoe_dedup"
    cfg.rexmoe.balance.group_aux_coeff = 1e-2
    cfg.rexmoe.balance.group_aux_scope = "global_batch"
    cfg.train.global_batch_size = 8  # 2 micro-batches per rank
    cfg.run.progress = False
    cfg.train.eval_interval = 100
    runs = train_with_recompute(cfg, shared[0], RECOMPUTE_SETTINGS)
    assert runs["none"][0][0]["dispatch_bytes"] > 0
    assert_same_training(runs)
    assert runs["full_uniform_1"][2] == 2 * runs["none"][2]
