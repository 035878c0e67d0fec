"""Trainer pieces that can be checked without training: describe()'s global parameter counts."""

from __future__ import annotations

import types

import pytest
import torch


class _Chunk(torch.nn.Module):
    """Parameter names as describe() sorts them: expert banks, routers, everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Linear(4, 3, bias=False)  # 12
        self.expert_banks = torch.nn.Linear(5, 2, bias=False)  # 10
        self.layer = torch.nn.Module()
        self.layer.router = torch.nn.Linear(7, 1, bias=False)  # 7


def _stub():
    return types.SimpleNamespace(model=types.SimpleNamespace(chunks=[_Chunk()], vocab_size=96),
                                 world_size=1, dp_size=1, num_microbatches=2)


def test_describe_counts_and_reduces_on_the_platform_device(layout, monkeypatch):
    """NCCL reduces device tensors only: the counts go to all_reduce on platform.device(). A distinct
    device label (meta) makes a CPU-built tensor visible on this CPU machine."""
    from rexmoe_train import platform
    from rexmoe_train.config.schema import ParallelConfig
    from rexmoe_train.training import trainer

    layout(ParallelConfig())
    counts = trainer.Trainer.describe(_stub())  # world size 1, gloo: the numbers
    assert (counts["parameters_total"], counts["parameters_experts"], counts["parameters_routers"]) == (29, 10, 7)

    class Reduced(Exception):
        pass

    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Reduced  # a meta tensor has no values to go on with

    monkeypatch.setattr(platform, "device", lambda: torch.device("meta"))
    monkeypatch.setattr(trainer.dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        trainer.Trainer.describe(_stub())
    assert seen == [torch.device("meta")]
