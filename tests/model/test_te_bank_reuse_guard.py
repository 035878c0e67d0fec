"""The Transformer Engine bank refuses fused wgrad accumulation for a reused group (docs/gpu.md): TE
would let the group's first layer overwrite the other layers' expert gradients. The check runs
before TE is touched, so it is tested here without TE."""

from __future__ import annotations

import pytest

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.core.reuse import ReuseGroup
from rexmoe_train.model.experts import TEExpertBank
from rexmoe_train.model.gpt import transformer_config

pytestmark = pytest.mark.skipif(TEExpertBank is None, reason="this megatron build has no TEGroupedMLP")


def _build(r: int, fusion: bool):
    config = transformer_config(ExperimentConfig().validate())
    config.gradient_accumulation_fusion = fusion
    group = ReuseGroup(index=0, first_moe_layer=0, size=r, experts_per_layer=8)
    return TEExpertBank(r * 8, config, None, None, group=group, placement=None, num_moe_layers=4)


def test_reused_te_bank_refuses_gradient_accumulation_fusion():
    with pytest.raises(ValueError, match=r"reuse group 0 \(r=4\).*gradient_accumulation_fusion"):
        _build(4, fusion=True)


@pytest.mark.parametrize("r,fusion", [(1, True), (4, False)])
def test_guard_only_for_reuse_with_fusion(r, fusion):
    # without TE (or with these toy arguments) building may still fail further on, but not here
    try:
        _build(r, fusion)
    except Exception as err:  # noqa: BLE001 - any failure past the guard is TE's/megatron's own
        assert "gradient_accumulation_fusion" not in str(err)
