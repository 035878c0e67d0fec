"""Expert FFN padding (model/expert_padding.py): zero pads change no output, get zero gradients, stay
zero under AdamW, and never reach a checkpoint (a padded run's checkpoint loads into an unpadded
model and back, bitwise). fp8 itself needs a GPU: here padding is forced by model.moe_ffn_pad_multiple."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rexmoe_train.config.schema import ConfigError
from rexmoe_train.model.expert_padding import ExpertFFNPadding, pads_are_zero, slot_weights
from tests.helpers import make_trainer, tiny_config


# --------------------------------------------------------------------------------------------------
# the arithmetic, against an unpadded reference, with plain torch
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gated, act", [(True, F.silu), (False, F.gelu), (False, F.relu)])
def test_zero_pads_contribute_nothing_get_zero_grads_and_stay_zero_under_adamw(gated, act):
    torch.manual_seed(0)
    hidden, ffn, padded, rows = 24, 20, 32, 37
    pad = ExpertFFNPadding(ffn, padded, gated)
    fc1 = torch.randn((2 if gated else 1) * ffn, hidden, dtype=torch.float64)
    fc2 = torch.randn(hidden, ffn, dtype=torch.float64)
    x = torch.randn(rows, hidden, dtype=torch.float64)
    probs = torch.rand(rows, 1, dtype=torch.float64)

    def mlp(w1, w2):
        h = x @ w1.T
        if gated:
            g, lin = h.chunk(2, dim=-1)
            h = act(g) * lin
        else:
            h = act(h)
        return (h * probs) @ w2.T

    u1, u2 = fc1.clone().requires_grad_(), fc2.clone().requires_grad_()
    p1, p2 = (t.clone().requires_grad_() for t in pad.padded_weights(fc1, fc2))
    assert p1.shape == ((2 if gated else 1) * padded, hidden) and p2.shape == (hidden, padded)
    assert pad.pads_are_zero(p1, p2)
    out_u, out_p = mlp(u1, u2), mlp(p1, p2)
    torch.testing.assert_close(out_p, out_u, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out_u)
    out_u.backward(grad)
    out_p.backward(grad)
    assert pad.pads_are_zero(p1.grad, p2.grad)  # exactly zero
    for got, want in zip(pad.unpadded_weights(p1.grad, p2.grad), (u1.grad, u2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # AdamW with decoupled weight decay: the zero pads stay exactly zero, the rest is updated as unpadded
    opt_u = torch.optim.AdamW([u1, u2], lr=0.1, weight_decay=0.1)
    opt_p = torch.optim.AdamW([p1, p2], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt_u.step()
        opt_p.step()
    assert pad.pads_are_zero(p1, p2)
    assert pad.pads_are_zero(opt_p.state[p1]["exp_avg"], opt_p.state[p2]["exp_avg_sq"])
    for got, want in zip(pad.unpadded_weights(p1, p2), (u1, u2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# validate(): pads where it can, refuses in one line what TE's fp8 GEMMs cannot run
# --------------------------------------------------------------------------------------------------
def _fp8(model: str, *extra: str):
    from rexmoe_train.config.compose import compose_experiment

    return compose_experiment([f"model={model}", "train=paper", "train.fp8=hybrid",
                               "model.transformer_impl=transformer_engine", *extra]).experiment


def test_every_packaged_model_validates_under_fp8_with_every_recipe_and_the_2_3b_is_padded():
    from rexmoe_train.config.schema import FP8_RECIPES

    for model in ("rexmoe_0.5b", "rexmoe_0.5b_se", "rexmoe_2.3b", "rexmoe_2.3b_se", "rexmoe_7b_se",
                  "rexmoe_18.7b_se"):
        cfg = _fp8(model)
        for recipe in FP8_RECIPES:
            cfg.train.fp8_recipe = recipe
            cfg.validate()
            stored = cfg.model.expert_ffn_stored_size(cfg.train.fp8)
            assert stored % 16 == 0 and 0 <= stored - cfg.model.moe_ffn_hidden_size < 16, (model, recipe)
    cfg = _fp8("rexmoe_2.3b").validate()
    assert (cfg.model.moe_ffn_hidden_size, cfg.model.expert_ffn_stored_size("hybrid")) == (744, 752)
    assert cfg.model.expert_ffn_stored_size(None) == 744  # bf16: stored as is


@pytest.mark.parametrize("extra, field, needle", [
    (["model.moe_ffn_pad_multiple=1"], "model.moe_ffn_hidden_size=744", "model.moe_ffn_pad_multiple=1"),
    (["model.moe_ffn_pad_multiple=8"], "model.moe_ffn_hidden_size=744", "multiple of 16"),
    (["model.moe_shared_expert_intermediate_size=1000"], "model.moe_shared_expert_intermediate_size=1000",
     "per-rank GEMM width 1000"),
    (["model.hidden_size=520", "model.num_attention_heads=8", "model.num_query_groups=2"],
     "model.hidden_size=520", "multiple of 16"),
    (["model.moe_ffn_pad_multiple=0"], "model.moe_ffn_pad_multiple=0", ">= 1"),
])
def test_fp8_shapes_that_cannot_run_are_refused_in_one_line(extra, field, needle):
    with pytest.raises(ConfigError) as err:
        _fp8("rexmoe_2.3b_se", *extra).validate()
    message = str(err.value)
    assert message.startswith(f"config error: {field}") and needle in message and "\n" not in message, message
    if "moe_ffn_hidden_size" in field:
        assert "train.fp8='hybrid'" in message


def test_padding_refuses_expert_tensor_parallelism():
    cfg = tiny_config()
    cfg.model.moe_ffn_hidden_size, cfg.model.moe_ffn_pad_multiple = 56, 16
    cfg.parallel.expert_tensor_parallel_size = 2
    with pytest.raises(ConfigError, match=r"^config error: parallel.expert_tensor_parallel_size=2: must be 1 "):
        cfg.validate()
    cfg.model.moe_ffn_pad_multiple = 1  # no padding: the layout check is not this one's business
    assert cfg.model.expert_ffn_stored_size(None) == 56


# --------------------------------------------------------------------------------------------------
# a padded model trains as the unpadded one, and their checkpoints are interchangeable
# --------------------------------------------------------------------------------------------------
FFN = 56  # 56 % 16 = 8: padded to 64 (and 16-byte aligned in fp32 both ways, so the grouped bank runs)


def _config(run_dir, pad: int, grouped: bool, load=None):
    cfg = tiny_config(r=2, layers=2)
    cfg.model.moe_ffn_hidden_size, cfg.model.moe_ffn_pad_multiple = FFN, pad
    cfg.model.moe_grouped_gemm = grouped
    cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = 2, 100, 1
    cfg.train.weight_decay = 0.1
    cfg.run.dir, cfg.run.progress = str(run_dir), False
    cfg.checkpoint.load = None if load is None else str(load)
    cfg.checkpoint.async_save = False  # the test loads right after saving
    return cfg


def _banks(trainer):
    return [bank for chunk in trainer.model.chunks for bank in chunk.expert_banks.banks.values()]


def _params(trainer) -> dict:
    """Every parameter by name, the expert weights as the unpadded model stores them."""
    out = {}
    for chunk in trainer.model.chunks:
        names = {p: n for n, p in chunk.named_parameters()}
        out.update({n: p.detach().clone() for p, n in names.items()})
        for bank in chunk.expert_banks.banks.values():
            pad = getattr(bank, "ffn_padding", None)
            for fc1, fc2 in slot_weights(bank):
                if pad is not None:
                    out[names[fc1]], out[names[fc2]] = pad.unpadded_weights(fc1.detach(), fc2.detach())
    return out


def _adam_state(trainer) -> dict:
    """Adam's moments by parameter name, the expert ones as the unpadded model would hold them."""
    state = {p: st for opt in trainer.optimizer.chained_optimizers for p, st in opt.optimizer.state.items()}
    out = {}
    for chunk in trainer.model.chunks:
        names = {p: n for n, p in chunk.named_parameters()}
        for bank in chunk.expert_banks.banks.values():
            pad = getattr(bank, "ffn_padding", None)
            for fc1, fc2 in slot_weights(bank):
                for key in ("exp_avg", "exp_avg_sq"):
                    m1, m2 = state[fc1][key], state[fc2][key]
                    if pad is not None:
                        assert pad.pads_are_zero(m1, m2), key
                        m1, m2 = pad.unpadded_weights(m1, m2)
                    out[f"{names[fc1]}.{key}"], out[f"{names[fc2]}.{key}"] = m1, m2
        for p, name in names.items():
            if "expert_banks" not in name and p in state:
                out.update({f"{name}.{k}": state[p][k] for k in ("exp_avg", "exp_avg_sq")})
    return out


def _copy_into_padded(src, dst) -> None:
    """dst (padded) <- src (unpadded): the same function, pads zero."""
    with torch.no_grad():
        wanted = _params(src)
        for chunk in dst.model.chunks:
            for name, p in chunk.named_parameters():
                if p.shape == wanted[name].shape:
                    p.copy_(wanted[name])
        for bank_u, bank_p in zip(_banks(src), _banks(dst)):
            for (u1, u2), (p1, p2) in zip(slot_weights(bank_u), slot_weights(bank_p)):
                w1, w2 = bank_p.ffn_padding.padded_weights(u1, u2)
                p1.copy_(w1)
                p2.copy_(w2)


def _assert_same(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("grouped", [False, True], ids=["loop_bank", "grouped_bank"])
def test_padded_model_trains_as_unpadded_and_checkpoints_cross_load(megatron_world, tmp_path, grouped):
    unpadded = make_trainer(_config(tmp_path / "u", 1, grouped))
    padded = make_trainer(_config(tmp_path / "p", 16, grouped))
    banks = _banks(padded)
    assert all(b.ffn_padding.padded == 64 for b in banks) and not any(
        getattr(b, "ffn_padding", None) for b in _banks(unpadded))
    assert slot_weights(banks[0])[0][1].shape[1] == 64 and pads_are_zero(banks[0])
    # model.json counts the model's parameters, not the padding
    assert padded.describe()["parameters_experts"] == unpadded.describe()["parameters_experts"]
    assert sum(p.numel() for b in banks for p in b.parameters()) > padded.describe()["parameters_experts"]
    _copy_into_padded(unpadded, padded)
    _assert_same(_params(unpadded), _params(padded), exact=True)

    rec_u = [unpadded.train_step() for _ in range(2)]
    rec_p = [padded.train_step() for _ in range(2)]
    if grouped:
        assert rec_p[-1]["grouped_gemm_forwards"] > rec_p[0]["grouped_gemm_forwards"] > 0
        assert rec_u[-1]["grouped_gemm_forwards"] == rec_p[-1]["grouped_gemm_forwards"]
    else:
        assert "grouped_gemm_forwards" not in rec_p[-1]
    for ru, rp in zip(rec_u, rec_p):
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert rp[key] == pytest.approx(ru[key], rel=1e-5), key
    _assert_same(_params(unpadded), _params(padded), exact=False)
    assert all(pads_are_zero(b) for b in banks)  # after two AdamW steps with weight decay
    _assert_same(_adam_state(unpadded), _adam_state(padded), exact=False)  # also: the pads' moments are 0
    if grouped:
        return

    # checkpoints: padded -> unpadded and unpadded -> padded load bitwise (weights and Adam state)
    padded.save_checkpoint()
    unpadded.save_checkpoint()
    from_padded = make_trainer(_config(tmp_path / "u2", 1, grouped, load=tmp_path / "p" / "checkpoints"))
    from_unpadded = make_trainer(_config(tmp_path / "p2", 16, grouped, load=tmp_path / "u" / "checkpoints"))
    assert from_padded.step == from_unpadded.step == 2
    _assert_same(_params(from_padded), _params(padded), exact=True)
    _assert_same(_params(from_unpadded), _params(unpadded), exact=True)
    assert all(pads_are_zero(b) for b in _banks(from_unpadded))
    _assert_same(_adam_state(from_padded), _adam_state(padded), exact=True)
    _assert_same(_adam_state(from_unpadded), _adam_state(unpadded), exact=True)
    # the HF export streamed from the padded run's files is the unpadded model's, tensor for tensor
    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.convert.export import export_hf, load_hf_tensors

    cfg_s, streamed, _ = checkpoint_io.open_streamed(tmp_path / "p" / "checkpoints")
    vocab = from_padded.model.vocab_size
    hf_files = load_hf_tensors(export_hf(cfg_s, streamed, vocab, tmp_path / "hf_p", progress=False))
    hf_model = load_hf_tensors(export_hf(from_padded.cfg, from_padded.model.chunks[0].state_dict(), vocab,
                                         tmp_path / "hf_u", progress=False))
    assert hf_files.keys() == hf_model.keys() and any(".experts." in k for k in hf_files)
    for key in hf_files:
        assert torch.equal(hf_files[key], hf_model[key]), key
    # and the next step is the same function on both sides of each load
    for a, b in ((padded, from_padded), (unpadded, from_unpadded)):
        assert b.train_step()["lm_loss"] == pytest.approx(a.train_step()["lm_loss"], rel=1e-6)



def test_distributed_optimizer_state_is_not_exchanged_across_a_different_padding():
    """Model weights are saved unpadded, the distributed optimizer's buffers are not: its state loads
    only into the same stored width; an unpadded run's signature is what it always was."""
    from rexmoe_train.checkpoint import compatibility

    cfg = tiny_config()
    cfg.model.moe_ffn_hidden_size, cfg.parallel.use_distributed_optimizer = FFN, True
    plain = compatibility.parallel_signature(cfg, 1)
    assert "expert_ffn_padded_to" not in plain
    cfg.model.moe_ffn_pad_multiple = 16
    padded = compatibility.parallel_signature(cfg, 1)
    assert padded["expert_ffn_padded_to"] == 64
    assert not compatibility.optimizer_compatible(plain, padded)
    assert not compatibility.optimizer_compatible(padded, plain)
    assert compatibility.optimizer_compatible(padded, dict(padded))
    assert "expert FFN padded to 64" in compatibility._describe_layout(padded)
    for side in (plain, padded):  # the non-distributed optimizer's state is per parameter: any padding
        side["use_distributed_optimizer"] = False
    assert compatibility.optimizer_compatible(plain, padded)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_te_fp8_trains_an_unaligned_expert_width_and_saves_it_unpadded(megatron_world, tmp_path, recipe):
    """On a GPU with Transformer Engine: a 40-wide expert FFN (the 2.3B's 744 problem at test size)
    trains in fp8 with each recipe through the padded TE bank (48 wide), its pads stay zero, and its
    checkpoint loads bitwise into an unpadded bf16 model."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except Exception as err:  # noqa: BLE001 - any import failure means no TE here
        pytest.skip(f"Transformer Engine does not import: {err}")
    ok, why = check_fp8_support()
    if not ok:
        pytest.skip(f"no fp8 on this GPU: {why}")
    if recipe == "blockwise":
        from transformer_engine.pytorch.fp8 import check_fp8_block_scaling_support

        ok, why = check_fp8_block_scaling_support()
        if not ok:
            pytest.skip(f"no fp8 block scaling on this GPU: {why}")

    def config(run_dir, fp8, load=None):
        cfg = tiny_config(r=2, layers=2)
        cfg.model.moe_ffn_hidden_size, cfg.model.transformer_impl = 40, "transformer_engine"
        cfg.train.fp8, cfg.train.fp8_recipe, cfg.train.bf16 = fp8, recipe, True
        cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = 2, 100, 1
        cfg.run.dir, cfg.run.progress, cfg.run.wandb.mode = str(run_dir), False, "disabled"
        cfg.checkpoint.load, cfg.checkpoint.async_save = None if load is None else str(load), False
        return cfg

    fp8 = make_trainer(config(tmp_path / "fp8", "hybrid"))
    banks = _banks(fp8)
    assert type(banks[0]).__name__ == "TEExpertBank" and banks[0].ffn_padding.padded == 48
    records = [fp8.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records), records
    assert all(pads_are_zero(b) for b in banks)
    fp8.save_checkpoint()
    bf16 = make_trainer(config(tmp_path / "bf16", None, load=tmp_path / "fp8" / "checkpoints"))
    assert not getattr(_banks(bf16)[0], "ffn_padding", None) and bf16.step == 2
    want = _params(fp8)
    got = _params(bf16)
    for name in want:
        if "expert_banks" in name:
            assert torch.equal(got[name], want[name]), name


def test_padded_resume_with_the_distributed_optimizer(megatron_world, tmp_path):
    """The distributed optimizer's buffers hold the pads: a padded run resumes from its own checkpoint
    (next step equal to the uninterrupted run's), and an unpadded run is refused its optimizer state."""
    from rexmoe_train.checkpoint import CheckpointError

    def config(run, pad, load=None):
        cfg = _config(tmp_path / run, pad, False, load)
        cfg.parallel.use_distributed_optimizer = True
        return cfg

    first = make_trainer(config("a", 16))
    for _ in range(2):
        first.train_step()
    first.save_checkpoint()
    resumed = make_trainer(config("b", 16, load=tmp_path / "a" / "checkpoints"))
    assert resumed.step == 2 and all(pads_are_zero(b) for b in _banks(resumed))
    _assert_same(_params(resumed), _params(first), exact=True)
    assert resumed.train_step()["lm_loss"] == first.train_step()["lm_loss"]
    from rexmoe_train.checkpoint import compatibility

    ckpt = next((tmp_path / "a" / "checkpoints").glob("iter_*"))
    with pytest.raises(CheckpointError, match="expert FFN padded to 64 cannot be loaded with distributed"):
        compatibility.validate_for_load(config("c", 1), ckpt, first.vocab_size, 1)  # what load() checks first
