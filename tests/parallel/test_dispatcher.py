"""rexmoe_dedup dispatcher, single process: pure helpers vs a naive reference, ep=1 vs megatron."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_config


def _routing(tokens: int, experts: int, topk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    top = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, top, True)
    probs = torch.where(routing_map, scores, torch.zeros_like(scores))
    return routing_map, probs


@pytest.mark.parametrize("ep,local,topk", [(4, 6, 3), (2, 2, 4), (1, 8, 2), (8, 32, 8)])
def test_pack_expand_reduce_match_naive(ep, local, topk):
    """The source rank's packing (kernels/dedup_permute.py, torch path), the expert rank's expansion
    and reduction, each against a loop over the wire order."""
    from rexmoe_train.kernels.dedup_permute import dedup_permute
    from rexmoe_train.parallel.dispatcher import expand_pairs, reduce_rows

    width = min(topk, local)
    routing_map, probs = _routing(29, ep * local, topk, seed=ep + local)
    hidden = torch.randn(29, 5)
    packed = dedup_permute(hidden, routing_map, probs, ep, width, impl="torch")

    # naive: loop over ranks then tokens (the wire order), slots ascending, padded to width
    tokens, slots, gates, rows_per_rank = [], [], [], [0] * ep
    for q in range(ep):
        for t in range(routing_map.shape[0]):
            chosen = [s for s in range(local) if routing_map[t, q * local + s]]
            if not chosen:
                continue
            rows_per_rank[q] += 1
            tokens.append(t)
            slots.append(chosen + [-1] * (width - len(chosen)))
            gates.append([float(probs[t, q * local + s]) for s in chosen] + [0.0] * (width - len(chosen)))
    assert packed.tokens.tolist() == tokens
    assert packed.rows_per_rank.tolist() == rows_per_rank
    assert packed.slots.tolist() == slots
    torch.testing.assert_close(packed.gates, torch.tensor(gates))
    assert torch.equal(packed.rows, hidden[tokens])

    # expansion on a receiving rank: pairs grouped by slot, received-row order within a slot
    pairs = expand_pairs(packed.slots, local)
    naive_pairs = sorted(((s, row, j) for row, row_slots in enumerate(slots)
                          for j, s in enumerate(row_slots) if s >= 0))
    assert pairs.rows.tolist() == [row for _, row, _ in naive_pairs]
    assert pairs.flat.tolist() == [row * width + j for _, row, j in naive_pairs]
    assert pairs.tokens_per_expert.device.type == "cpu"
    assert pairs.tokens_per_expert.tolist() == [sum(1 for s, _, _ in naive_pairs if s == e)
                                                for e in range(local)]

    out = torch.randn(len(naive_pairs), 5)
    reduced = reduce_rows(out, pairs.rows, len(slots))
    naive = torch.zeros(len(slots), 5)
    for i, (_, row, _) in enumerate(naive_pairs):
        naive[row] += out[i]
    torch.testing.assert_close(reduced, naive)


def _forward_backward(model, x, pos):
    losses = model(x, pos, None, labels=x)
    losses.float().sum().backward()
    return losses.detach()


@pytest.mark.parametrize("r,capacity", [(1, None), (2, None), (4, None), (4, 0.75)])
def test_ep1_dedup_matches_megatron_alltoall(layout, r, capacity):
    from rexmoe_train.model.gpt import build_model
    from rexmoe_train.parallel.dispatcher import DedupAllToAllDispatcher, find_dedup_dispatchers

    cfg = tiny_config(r=r, layers=4, topk=3, psr="linear", start_step=0, end_step=10)
    cfg.model.moe_expert_capacity_factor = capacity  # dropped tokens must be handled alike
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 96, (2, 32), generator=g)
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    results = {}
    for dispatcher in ("alltoall", "rexmoe_dedup"):
        cfg.parallel.moe_token_dispatcher_type = dispatcher
        layout(cfg.parallel)
        built = build_model(cfg, 96)
        built.psr_state.set_step(5)
        model = built.chunks[0]
        if dispatcher == "alltoall":
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            assert len(find_dedup_dispatchers([model])) == cfg.model.num_layers
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(params[n])
        loss = _forward_backward(model, x, pos)
        results[dispatcher] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()})
        if dispatcher == "rexmoe_dedup":
            for d in find_dedup_dispatchers([model]):
                assert isinstance(d, DedupAllToAllDispatcher)
                assert d.bytes_sent == {"dispatch": 0, "combine": 0, "stock_dispatch": 0,
                                        "stock_combine": 0}  # ep=1: nothing leaves the rank
    ref_loss, ref_grads = results["alltoall"]
    loss, grads = results["rexmoe_dedup"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_rejects_padding_to_capacity(layout):
    import copy

    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from rexmoe_train.model.gpt import transformer_config
    from rexmoe_train.parallel.dispatcher import DedupAllToAllDispatcher

    cfg = tiny_config(r=1)
    layout(cfg.parallel)
    tc = copy.copy(transformer_config(cfg))
    tc.moe_expert_capacity_factor = 1.25  # dropping alone is fine (it happens in the router) ...
    DedupAllToAllDispatcher(8, list(range(8)), config=tc, pg_collection=get_default_pg_collection())
    tc.moe_pad_expert_input_to_capacity = True  # ... padding to capacity is not
    with pytest.raises(ValueError, match="moe_pad_expert_input_to_capacity"):
        DedupAllToAllDispatcher(8, list(range(8)), config=tc, pg_collection=get_default_pg_collection())


def test_schema_accepts_rexmoe_dedup():
    cfg = tiny_config(r=2)
    cfg.parallel.moe_token_dispatcher_type = "rexmoe_dedup"
    cfg.validate(world_size=1)
