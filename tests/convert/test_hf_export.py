"""export-hf: stock transformers loads the export and computes what ReXMoE computes."""

from __future__ import annotations

import pytest
import torch

from rexmoe_train.convert.hf_format import ConvertError
from tests.helpers import tiny_config

transformers = pytest.importorskip("transformers")


# multi-process, conversion or end-to-end CLI runs: `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow


def _trained_model(cfg, steps: int = 3):
    """A tiny ReXMoE after a few real optimizer steps (routers and experts no longer at init)."""
    from rexmoe_train.training.trainer import Trainer

    cfg.train.train_iters, cfg.train.eval_interval, cfg.run.progress = steps, 1000, False
    cfg.train.global_batch_size = cfg.train.micro_batch_size = 2
    cfg.train.lr = 1e-2
    trainer = Trainer(cfg)
    trainer.logger.enabled = False
    for _ in range(steps):
        trainer.train_step()
    model = trainer.model
    model.psr_state.set_step(10**9)  # PSR fully open: what the export computes
    chunk = model.chunks[0]
    chunk.eval()
    return chunk, model.vocab_size


def _greedy(step_logits, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(new_tokens):
        nxt = step_logits(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[:, prompt.shape[1]:]


def _packaged_default_gate() -> tuple[str, str]:
    """(gating, gate_normalization) of the packaged default preset (configs/rexmoe/default.yaml)."""
    from rexmoe_train.config.compose import compose_experiment

    rexmoe = compose_experiment([]).experiment.rexmoe
    return rexmoe.gating, rexmoe.gate_normalization


@pytest.mark.parametrize("r,shared,gate", [(2, None, ("softmax_then_topk", "none")),
                                           (4, 32, ("softmax_then_topk", "none")),
                                           (4, None, ("topk_then_softmax", "none")),
                                           (4, 32, ("softmax_then_topk", "renorm_topk")),
                                           (4, None, "packaged default")])
def test_stock_transformers_matches(tmp_path, megatron_world, r, shared, gate):
    from rexmoe_train.convert.export import export_hf

    gating, normalization = _packaged_default_gate() if gate == "packaged default" else gate
    cfg = tiny_config(r=r, layers=4, gating=gating, psr="linear", start_step=0, end_step=2)
    cfg.rexmoe.gate_normalization = normalization
    cfg.model.moe_shared_expert_intermediate_size = shared
    cfg.run.dir = str(tmp_path / "run")
    chunk, vocab = _trained_model(cfg)
    out = export_hf(cfg, chunk.state_dict(), vocab, tmp_path / "hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert hf.config.num_experts == r * cfg.model.num_moe_experts
    # kept gates renormalised (topk_then_softmax, or renorm_topk) <=> Qwen's norm_topk_prob
    assert hf.config.norm_topk_prob == (gating == "topk_then_softmax" or normalization == "renorm_topk")

    def ours(tokens):
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
        return chunk(tokens, pos, None)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randint(0, 257, (2, 24), generator=g)
            torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=1e-4)
        prompt = torch.randint(0, 257, (2, 8), generator=g)
        mine = _greedy(ours, prompt, 20)
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             pad_token_id=0)[:, prompt.shape[1]:]
    assert torch.equal(mine, theirs)


def test_sigmoid_gating_refused():
    from rexmoe_train.convert.hf_format import check_exportable

    with pytest.raises(ConvertError, match="sigmoid has no Qwen2-MoE equivalent"):
        check_exportable(tiny_config(gating="sigmoid"))


def test_gate_scaled_by_candidates_refused():
    from rexmoe_train.convert.hf_format import check_exportable

    cfg = tiny_config()
    cfg.rexmoe.gate_normalization = "scale_candidates"
    with pytest.raises(ConvertError, match="gate_normalization=scale_candidates has no Qwen2-MoE equivalent"):
        check_exportable(cfg)
