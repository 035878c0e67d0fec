"""ExpertPlacement: rank k holds the same N/ep slice of every owner layer; the map is a bijection."""

from __future__ import annotations

import pytest
import torch

from rexmoe_train.core.placement import ExpertPlacement


@pytest.mark.parametrize("n,r,ep", [(8, 4, 2), (8, 2, 4), (16, 3, 4), (8, 1, 2), (4, 4, 1)])
def test_bijection_and_even_spread(n, r, ep):
    p = ExpertPlacement(n, r, ep)
    seen = {}
    for c in range(n * r):
        rank, slot = p.locate(c)
        assert 0 <= rank < ep and 0 <= slot < p.local_slots
        assert (rank, slot) not in seen
        seen[(rank, slot)] = c
        owner, expert = divmod(c, n)
        assert p.slot_owner_expert(rank, slot) == (owner, expert)
        # the slice megatron would give rank `rank` for the owner layer alone
        assert rank == expert // (n // ep)
    assert len(seen) == n * r
    per_rank = [sum(1 for (k, _) in seen if k == rank) for rank in range(ep)]
    assert per_rank == [r * n // ep] * ep  # memory per rank equals vanilla (N/ep per owner layer)
    perm = p.candidate_of_physical
    assert sorted(perm.tolist()) == list(range(n * r))
    x = torch.arange(n * r).float().unsqueeze(0)
    physical = p.to_physical(x)
    for c in range(n * r):
        assert physical[0, p.physical_id(c)] == c


def test_r1_and_ep1_are_identity():
    assert ExpertPlacement(8, 1, 4).is_identity and ExpertPlacement(8, 4, 1).is_identity
    assert ExpertPlacement(8, 1, 4).candidate_of_physical.tolist() == list(range(8))


def test_ep_must_divide_n():
    with pytest.raises(ValueError, match="expert_model_parallel_size=3 must divide num_moe_experts=8"):
        ExpertPlacement(8, 2, 3)


def test_describe_is_printable_map():
    text = ExpertPlacement(4, 2, 2).describe()
    assert "candidate    5 (owner +1, expert   1) -> rank 0, slot 3" in text


def test_the_permutation_reaches_a_device_once():
    """Issue 29 item 4: to_physical copied the permutation to the device in every call (twice per
    router call); now one copy per placement and device."""
    p = ExpertPlacement(8, 4, 2)
    first = p.permutation_on(torch.device("cpu"))
    assert first is p.permutation_on("cpu") and torch.equal(first, p.candidate_of_physical)
    x = torch.randn(3, 32)
    assert torch.equal(p.to_physical(x), x.index_select(-1, p.candidate_of_physical))
    assert p == ExpertPlacement(8, 4, 2)  # the cache is not part of the placement's identity
