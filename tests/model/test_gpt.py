"""build_model: every parameter and buffer of every chunk on the platform's device."""

from __future__ import annotations

import torch

from tests.helpers import tiny_config


def test_build_model_puts_every_parameter_and_buffer_on_the_platform_device(layout, monkeypatch):
    """On a GPU megatron builds most weights on the current device but leaves the router weight,
    torch norms and our routers' step counters on the CPU. Here platform.device() answers a device
    nothing is built on by default (meta), so anything not moved by build_model stays visibly on the
    CPU. A dense first layer and expert bias: every kind of module and buffer is built."""
    from rexmoe_train import platform
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=2, layers=4)
    cfg.model.first_k_dense_layers = 1  # a dense MLP layer too
    cfg.rexmoe.balance.moe_router_enable_expert_bias = True  # megatron's expert_bias buffers too
    layout(cfg.parallel)
    monkeypatch.setattr(platform, "device", lambda: torch.device("meta"))
    built = build_model(cfg, 96)
    misplaced = [(name, t.device) for chunk in built.chunks
                 for name, t in [*chunk.named_parameters(), *chunk.named_buffers()]
                 if t.device != torch.device("meta")]
    assert not misplaced, misplaced
    names = {name for chunk in built.chunks for name, _ in chunk.named_buffers()}
    assert any(n.endswith("router.step_load") for n in names)
    assert any(n.endswith("router.expert_bias") for n in names)
