"""ep=2: the rexmoe_dedup dispatcher against megatron's alltoall and against its byte formula.

The ep=2-vs-ep=1 check for rexmoe_dedup is in test_expert_parallel.py (parametrized dispatcher).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist

from tests.helpers import tiny_config


def _forward_backward(model, x, pos):
    losses = model(x, pos, None, labels=x)
    losses.float().sum().backward()
    return losses.detach()


@pytest.mark.parametrize("r", [2, 4])
def test_dedup_matches_alltoall_at_ep2(layout, r):
    """Same ep=2 model and weights: outputs and every gradient equal the stock alltoall path."""
    from rexmoe_train.model.gpt import build_model
    from rexmoe_train.parallel.dispatcher import find_dedup_dispatchers

    cfg = tiny_config(r=r, layers=4, topk=3, psr="linear", start_step=0, end_step=10)
    cfg.parallel.expert_model_parallel_size = 2
    g = torch.Generator().manual_seed(300 + dist.get_rank())
    x = torch.randint(0, 96, (2, 32), generator=g)
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    results = {}
    for dispatcher in ("alltoall", "rexmoe_dedup"):
        run_cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, moe_token_dispatcher_type=dispatcher))
        layout(run_cfg.parallel)
        built = build_model(run_cfg, 96)
        built.psr_state.set_step(5)  # mid-ramp: masking active
        model = built.chunks[0]
        if dispatcher == "alltoall":
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(params[n])
        results[dispatcher] = (_forward_backward(model, x, pos),
                               {n: p.grad.clone() for n, p in model.named_parameters()})
        if dispatcher == "rexmoe_dedup":
            sent = [d.bytes_sent for d in find_dedup_dispatchers([model])]
            assert len(sent) == cfg.model.num_layers
            # top-3 of r*8 over 2 ranks: some tokens pick 2+ experts on one rank, so dedup must win
            assert sum(s["dispatch"] for s in sent) < sum(s["stock_dispatch"] for s in sent)
            assert sum(s["combine"] for s in sent) < sum(s["stock_combine"] for s in sent)
    ref_loss, ref_grads = results["alltoall"]
    loss, grads = results["rexmoe_dedup"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


# Constructed routing, E = 8 physical experts, L = 4 per rank, top-3. Rank 0 owns 0-3, rank 1 4-7.
_CHOICES = [
    [0, 1, 2],  # all on rank 0: one row instead of three
    [4, 5, 6],  # all on rank 1
    [0, 1, 4],
    [5, 7, 3],
    [1, 6, 7],
]


def _choices(rank: int) -> list[list[int]]:
    return _CHOICES + ([[0, 2, 3], [2, 3, 7]] if rank == 0 else [[4, 5, 0], [6, 1, 2], [7, 4, 6]])


def test_dedup_bytes_follow_formula_and_combine_is_exact(layout):
    """Dispatcher alone, ep=2, with fake experts f_e(x) = (e+1)*x: exact output, gradients, bytes.

    Bytes per forward call on rank p (W = min(topk, L) = 3, H*4 bytes per fp32 row):
      dispatch_p = 8*(ep-1) + rows(p->q) * (H*4 + 8*W)        combine_p = rows(q->p) * H*4
      stock_dispatch_p = 8*E*(ep-1) + copies(p->q) * (H*4 + 4)   stock_combine_p = copies(q->p) * H*4
    where rows(p->q) counts p's tokens with at least one expert on rank q != p, copies(p->q) the
    (token, expert) pairs of p's tokens on q.
    """
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from rexmoe_train.model.gpt import transformer_config
    from rexmoe_train.parallel.dispatcher import DedupAllToAllDispatcher
    from rexmoe_train.training.metrics import dispatch_bytes

    cfg = tiny_config(r=1, experts=8, topk=3)
    cfg.parallel.expert_model_parallel_size = 2
    layout(cfg.parallel)
    tc = copy.copy(transformer_config(cfg))
    rank, ep, local, hidden_size, topk = dist.get_rank(), 2, 4, cfg.model.hidden_size, 3
    dispatcher = DedupAllToAllDispatcher(local, [rank * local + i for i in range(local)], config=tc,
                                         pg_collection=get_default_pg_collection())

    def routing(p):
        choices = _choices(p)
        routing_map = torch.zeros(len(choices), 2 * local, dtype=torch.bool)
        for t, experts in enumerate(choices):
            routing_map[t, experts] = True
        g = torch.Generator().manual_seed(10 + p)
        probs = torch.where(routing_map, torch.rand(routing_map.shape, generator=g), 0.0)
        return routing_map, probs

    routing_map, probs = routing(rank)
    probs.requires_grad_(True)
    g = torch.Generator().manual_seed(20 + rank)
    x = torch.randn(len(_choices(rank)), 1, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(x.shape, generator=g)

    rows, meta = dispatcher.dispatch_preprocess(x, routing_map, probs)
    rows, meta = dispatcher.token_dispatch(rows, meta)
    expert_in, tokens_per_expert, expert_probs = dispatcher.dispatch_postprocess(rows, meta)
    assert tokens_per_expert.device.type == "cpu" and tokens_per_expert.dtype == torch.long
    experts = rank * local + torch.repeat_interleave(torch.arange(local), tokens_per_expert)
    expert_out = expert_in * (experts + 1).unsqueeze(-1) * expert_probs.unsqueeze(-1)
    out = dispatcher.token_combine(dispatcher.combine_preprocess(expert_out))
    out = dispatcher.combine_postprocess(out)
    (out * weight).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    probs_ref = probs.detach().clone().requires_grad_(True)
    scale = (probs_ref * torch.arange(1, 2 * local + 1)).sum(dim=1)
    ref = x_ref * scale.view(-1, 1, 1)
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(probs.grad, probs_ref.grad * routing_map, rtol=1e-6, atol=1e-6)

    def rows_and_copies(src, dst):
        rmap, _ = routing(src)
        on_dst = rmap[:, dst * local:(dst + 1) * local]
        return int(on_dst.any(dim=1).sum()), int(on_dst.sum())

    other = 1 - rank
    row_bytes, width = hidden_size * 4, min(topk, local)
    rows_out, copies_out = rows_and_copies(rank, other)
    rows_in, copies_in = rows_and_copies(other, rank)
    expected = {
        "dispatch": 8 * (ep - 1) + rows_out * (row_bytes + 8 * width),
        "combine": rows_in * row_bytes,
        "stock_dispatch": 8 * 8 * (ep - 1) + copies_out * (row_bytes + 4),
        "stock_combine": copies_in * row_bytes,
    }
    assert dispatcher.bytes_sent == expected
    assert rows_out < copies_out  # the constructed routing does dedupe

    both = {k: 0 for k in expected}
    for p in range(ep):  # world totals from the formula, both ranks
        r_out, c_out = rows_and_copies(p, 1 - p)
        r_in, c_in = rows_and_copies(1 - p, p)
        both["dispatch"] += 8 + r_out * (row_bytes + 8 * width)
        both["combine"] += r_in * row_bytes
        both["stock_dispatch"] += 64 + c_out * (row_bytes + 4)
        both["stock_combine"] += c_in * row_bytes
    logged = dispatch_bytes([dispatcher])
    assert logged == {f"{k}_bytes": v for k, v in both.items()}
    assert dispatcher.bytes_sent["dispatch"] == 0  # reset after logging


def test_trainer_logs_dispatch_bytes(megatron_world, tmp_path):
    """A real training step with rexmoe_dedup at ep=2 reports world-summed bytes, fewer than stock."""
    from rexmoe_train import compat
    from rexmoe_train.training.trainer import Trainer

    shared = [str(tmp_path)]
    dist.broadcast_object_list(shared, src=0)  # one run dir for both ranks
    cfg = tiny_config(r=2, topk=3)
    cfg.parallel.expert_model_parallel_size = 2
    cfg.parallel.moe_token_dispatcher_type = "rexmoe_dedup"
    cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = 2, 100, 1
    cfg.run.dir, cfg.run.progress = f"{shared[0]}/run", False
    compat.reset_megatron_global_state()
    trainer = Trainer(cfg)
    assert len(trainer.dispatchers) == cfg.model.num_layers
    record = trainer.train_step()
    values = torch.tensor([record[k] for k in ("dispatch_bytes", "combine_bytes",
                                               "stock_dispatch_bytes", "stock_combine_bytes")])
    gathered = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values)
    assert torch.equal(gathered[0], gathered[1])  # a world sum: the same on every rank
    dispatch, combine, stock_dispatch, stock_combine = values.tolist()
    assert 0 < dispatch < stock_dispatch and 0 < combine < stock_combine
    assert all(d.bytes_sent["dispatch"] == 0 for d in trainer.dispatchers)  # reset once logged
