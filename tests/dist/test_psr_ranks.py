"""PSR masks agree across ranks without communication."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rexmoe_train.core.psr import PSRSchedule, psr_allowed_mask


def test_mask_identical_on_all_ranks(megatron_world):
    schedule = PSRSchedule("linear", 8, 4, 0, 100)
    masks = torch.stack([psr_allowed_mask(schedule, t, seed=42, moe_layer=layer)
                         for t in range(1, 101, 3) for layer in range(4)]).to(torch.uint8)
    gathered = [torch.zeros_like(masks) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, masks)
    assert dist.get_world_size() >= 2
    for other in gathered[1:]:
        assert torch.equal(other, gathered[0])
