"""checkpoint/state.py: the optimizer-state part with the inner Adam megatron uses when Transformer
Engine is installed (TE's FusedAdam), through the real save / resume path."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import make_trainer, tiny_config


class FusedAdamStandIn(torch.optim.Optimizer):
    """What megatron-core 0.16.1 relies on in Transformer Engine 2.11's FusedAdam
    (transformer_engine/pytorch/optimizers/fused_adam.py), with megatron's arguments
    (master_weights off, fp32 states):

    - the step count is ONE int per param group, ``group["step"]``: set to 1 on the group's first
      step, incremented after; groups without params are skipped (``step``);
    - per-parameter state holds only ``exp_avg`` / ``exp_avg_sq`` (``initialize_state``);
    - ``state_dict()`` maps every state key through ``name_to_dtype_map`` (``get_unscaled_state``)
      and ``load_state_dict()`` likewise (``set_scaled_state``): a key outside exp_avg / exp_avg_sq /
      master_param raises KeyError;
    - the update is Adam (AdamW with ``adam_w_mode``) with bias correction.

    TE's multi-tensor CUDA kernels are replaced by the same arithmetic in torch."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 adam_w_mode=True, bias_correction=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction))
        self.adam_w_mode = adam_w_mode
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                                  "master_param": torch.float32}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            group["step"] = group["step"] + 1 if "step" in group else 1
            t, (beta1, beta2), lr = group["step"], group["betas"], group["lr"]
            wd, eps = group["weight_decay"], group["eps"]
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                if p.grad is None:
                    continue
                grad = p.grad if self.adam_w_mode else p.grad + wd * p
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(eps)
                if self.adam_w_mode:
                    p.mul_(1 - lr * wd)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))

    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {k: {name: self._unscaled(v, name) for name in v} for k, v in sd["state"].items()}
        return sd

    def _unscaled(self, state: dict, name: str) -> torch.Tensor:
        assert self.name_to_dtype_map[name] == torch.float32  # KeyError for any other key, as TE
        return state[name]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for v in state_dict["state"].values():
            for name in v:
                self.name_to_dtype_map[name]  # set_scaled_state's lookup: KeyError as TE


def _te_installed(monkeypatch, installed: bool) -> None:
    """megatron as it imports with (or without) Transformer Engine: with it, its optimizer factory
    builds the FusedAdam (``Adam``, ``USING_PYTORCH_OPTIMIZER=False``) and its DistributedOptimizer
    takes the TE branch (``HAVE_APEX_OR_TE``, ``USING_TE_OPTIMIZER``)."""
    import megatron.core.optimizer as factory
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(factory, "Adam", FusedAdamStandIn if installed else torch.optim.Adam)
    monkeypatch.setattr(factory, "USING_PYTORCH_OPTIMIZER", not installed)
    monkeypatch.setattr(distrib_optimizer, "Adam", FusedAdamStandIn if installed else torch.optim.Adam)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", installed)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", installed)


@pytest.fixture
def te_fused_adam(monkeypatch):
    _te_installed(monkeypatch, True)


def _config(run_dir, distributed=True, steps=3, **checkpoint):
    cfg = tiny_config(r=2, layers=2)
    cfg.parallel.use_distributed_optimizer = distributed
    cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = steps, 100, 1
    cfg.run.dir, cfg.run.progress = str(run_dir), False
    for key, value in checkpoint.items():
        setattr(cfg.checkpoint, key, value)
    return cfg


def _inner_adams(trainer):
    return [sub.optimizer for sub in trainer.optimizer.chained_optimizers]


def _losses(run_dir) -> dict:
    return {r["step"]: r["lm_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "lm_loss" in r}


def _adam_steps(trainer) -> set:
    """The step count as each inner Adam keeps it (FusedAdam: param groups; torch: per parameter)."""
    out = set()
    for inner in _inner_adams(trainer):
        if isinstance(inner, FusedAdamStandIn):
            out |= {g["step"] for g in inner.param_groups if g["params"]}
        else:
            out |= {int(s["step"]) for s in inner.state.values()}
    return out


def test_distributed_optimizer_resume_with_te_fused_adam(megatron_world, tmp_path, te_fused_adam):
    """Save at step 2, resume, run step 3: the same loss bitwise as the uninterrupted run, the step
    count carried where FusedAdam keeps it (the param groups), no "step" state written for it."""
    from rexmoe_train import checkpoint

    straight = make_trainer(_config(tmp_path / "a", save_interval=2))
    assert all(isinstance(inner, FusedAdamStandIn) for inner in _inner_adams(straight))
    straight.run()
    ref = {r["step"]: r["lm_loss"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl")
                                                  .read_text().splitlines()) if "lm_loss" in r}
    resumed = make_trainer(_config(tmp_path / "b", load=str(tmp_path / "a" / "checkpoints" / checkpoint.iter_name(2))))
    assert resumed.step == 2
    for inner in _inner_adams(resumed):
        assert {g["step"] for g in inner.param_groups if g["params"]} == {2}
        assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in inner.state.values())
    record = resumed.train_step()
    assert record["lm_loss"] == ref[3]  # bitwise
    assert all({g["step"] for g in inner.param_groups if g["params"]} == {3} for inner in _inner_adams(resumed))


@pytest.mark.parametrize("saved_with_te", [False, True], ids=["torch_to_te", "te_to_torch"])
def test_resume_across_adam_implementations(megatron_world, tmp_path, monkeypatch, saved_with_te):
    """A checkpoint written without TE (torch's Adam: the step as megatron's ``common_step``) resumed
    where TE is installed (FusedAdam: the step in the param groups), and the reverse: the step count
    arrives where the loading Adam keeps it, and step 4 (the first whose loss sees a resumed update)
    matches an uninterrupted run of the loading implementation up to the two Adams' rounding."""
    from rexmoe_train import checkpoint

    _te_installed(monkeypatch, not saved_with_te)
    make_trainer(_config(tmp_path / "straight", distributed=False, steps=4)).run()
    _te_installed(monkeypatch, saved_with_te)
    make_trainer(_config(tmp_path / "a", distributed=False, steps=2)).run()
    _te_installed(monkeypatch, not saved_with_te)
    resumed = make_trainer(_config(tmp_path / "b", distributed=False, steps=4,
                               load=str(tmp_path / "a" / "checkpoints" / checkpoint.iter_name(2))))
    assert resumed.step == 2 and _adam_steps(resumed) == {2}
    resumed.run()
    assert _adam_steps(resumed) == {4}
    ref, got = _losses(tmp_path / "straight"), _losses(tmp_path / "b")
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got[step], ref[step])


def test_rng_state_from_the_other_kind_of_device_restores_the_cpu_generator_only(layout):
    """A GPU rank saves CUDA generator states (16 bytes) for megatron's tracker; restoring them on a
    CPU (or a CPU rank's 5056-byte states on a GPU) fails at the tracker's next fork. The CPU
    generator is the same on both and is restored; the tracker keeps this run's seeded streams."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from rexmoe_train import platform
    from rexmoe_train.checkpoint.state import RNGState
    from rexmoe_train.config.schema import ParallelConfig

    layout(ParallelConfig())
    rng = RNGState()
    saved = rng.entries(False, {})["rng_state"].data
    assert saved["device"] == platform.device().type
    other = "cpu" if platform.device().type != "cpu" else "cuda"
    cuda_generator_state = torch.zeros(16, dtype=torch.uint8)
    foreign = {"platform": {"cpu": saved["platform"]["cpu"], "cuda": cuda_generator_state},
               "tracker": {name: cuda_generator_state for name in saved["tracker"]}, "device": other}
    tracker = {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()}
    torch.rand(3)  # move the CPU generator on
    rng.load({"rng_state": foreign})
    assert torch.equal(torch.get_rng_state(), saved["platform"]["cpu"])
    assert all(torch.equal(state, tracker[name]) for name, state in get_cuda_rng_tracker().get_states().items())
    with get_cuda_rng_tracker().fork():
        torch.rand(1)
    rng.load({"rng_state": saved})  # the same kind of device: everything restored
    assert torch.equal(torch.get_rng_state(), saved["platform"]["cpu"])
