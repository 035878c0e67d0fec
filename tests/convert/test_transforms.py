"""Round trip export -> import is bitwise; upcycling keeps the vanilla model's outputs."""

from __future__ import annotations

import pytest
import torch

from rexmoe_train.convert.hf_format import ConvertError
from tests.helpers import tiny_config

# multi-process, conversion or end-to-end CLI runs: `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow


def _model(cfg, seed=0):
    from rexmoe_train.model.gpt import build_model

    built = build_model(cfg, 257)
    chunk = built.chunks[0].eval()
    with torch.no_grad():  # move off the init distribution so copies are distinguishable
        g = torch.Generator().manual_seed(seed)
        for p in chunk.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return built, chunk


def _state(chunk):
    return {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}


def _logits(chunk, x):
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
    with torch.no_grad():
        return chunk(x, pos, None)


@pytest.mark.parametrize("shared", [None, 32])
def test_round_trip_bitwise(tmp_path, layout, shared):
    from rexmoe_train.convert.export import export_hf, load_hf_tensors
    from rexmoe_train.convert.transforms import from_hf_unrolled

    cfg = tiny_config(r=2, layers=4)
    cfg.model.moe_shared_expert_intermediate_size = shared
    layout(cfg.parallel)
    built, chunk = _model(cfg)
    out = export_hf(cfg, chunk.state_dict(), built.vocab_size, tmp_path / "hf", progress=False)
    back = from_hf_unrolled(cfg, load_hf_tensors(out))
    state = _state(chunk)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_import_rejects_copies_that_differ(tmp_path, layout):
    from safetensors.torch import load_file, save_file

    from rexmoe_train.convert.export import export_hf, load_hf_tensors
    from rexmoe_train.convert.transforms import from_hf_unrolled

    cfg = tiny_config(r=2, layers=4)
    layout(cfg.parallel)
    built, chunk = _model(cfg)
    out = export_hf(cfg, chunk.state_dict(), built.vocab_size, tmp_path / "hf", progress=False)
    shard = out / "model-00003-of-00005.safetensors"  # decoder layer 1: second layer of group 0
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.experts.3.up_proj.weight"] += 1.0
    save_file(tensors, str(shard))
    with pytest.raises(ConvertError, match="layer 1 expert 3 differs from the other copies in reuse group 0"):
        from_hf_unrolled(cfg, load_hf_tensors(out))


def test_upcycle_outputs_equal_then_training_continues(layout):
    from rexmoe_train.convert.transforms import upcycle, upcycle_config
    from rexmoe_train.model.gpt import build_model

    vanilla_cfg = tiny_config(r=1, layers=4, psr="linear", start_step=0, end_step=40)
    layout(vanilla_cfg.parallel)
    _, vanilla = _model(vanilla_cfg)
    target = upcycle_config(vanilla_cfg, 4, start_step=11)
    assert target.rexmoe.reuse_group_size == 4 and target.rexmoe.psr.protect_local
    built = build_model(target, 257)
    chunk = built.chunks[0].eval()
    result = chunk.load_state_dict(upcycle(vanilla_cfg, vanilla.state_dict(), target), strict=False)
    assert not [k for k in result.missing_keys if not k.endswith("_extra_state")] and not result.unexpected_keys
    built.psr_state.set_step(11)
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(chunk, x), _logits(vanilla, x), rtol=0, atol=1e-6)
    # the experts are stored once: the bank holds the 4 layers' vanilla experts
    assert sum(p.numel() for n, p in chunk.named_parameters() if n.startswith("expert_banks.")) == \
        sum(p.numel() for n, p in vanilla.named_parameters() if n.startswith("expert_banks."))
    # training continues: a real optimizer step on the upcycled model lowers the loss on its batch
    chunk.train()
    opt = torch.optim.Adam(chunk.parameters(), lr=1e-3)
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = chunk(x, pos, None, labels=x).float().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_upcycle_refuses_a_reuse_model():
    from rexmoe_train.convert.transforms import upcycle_config

    with pytest.raises(ConvertError, match="must be a vanilla MoE"):
        upcycle_config(tiny_config(r=2, layers=4), 4, start_step=0)
