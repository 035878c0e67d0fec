"""Small builders shared by tests (configs sized for a 2-core CPU)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

from rexmoe_train.config.schema import ExperimentConfig


def tiny_config(r: int = 4, layers: int = 4, experts: int = 8, topk: int = 2, hidden: int = 64,
                gating: str = "softmax_then_topk", psr: str = "none", **psr_kw) -> ExperimentConfig:
    cfg = ExperimentConfig()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = layers, hidden, 4, 2
    m.num_moe_experts, m.moe_router_topk, m.moe_ffn_hidden_size = experts, topk, 64
    cfg.rexmoe.reuse_group_size = r
    cfg.rexmoe.gating = gating
    cfg.rexmoe.psr.schedule = psr
    cfg.rexmoe.psr.start_step = psr_kw.pop("start_step", 0)
    cfg.rexmoe.psr.end_step = psr_kw.pop("end_step", 10)
    for key, value in psr_kw.items():
        setattr(cfg.rexmoe.psr, key, value)
    cfg.train.seq_length, cfg.train.micro_batch_size, cfg.train.global_batch_size = 32, 2, 4
    cfg.train.train_iters, cfg.train.lr_warmup_iters = 10, 1
    return cfg


def make_trainer(cfg):
    """A Trainer for ``cfg`` in this process, after clearing megatron's global state of the last one."""
    from rexmoe_train import compat
    from rexmoe_train.training.trainer import Trainer

    compat.reset_megatron_global_state()
    return Trainer(cfg)


# activation recompute settings compared against no recompute (model.recompute_* fields)
RECOMPUTE_SETTINGS = {
    "full_uniform_1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_block_2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective_moe": dict(recompute_granularity="selective", moe_grouped_gemm=True,
                          recompute_modules=["moe", "moe_act", "core_attn"]),
}
# record fields that measure time or memory, not the computation (the grouped bank's forward count,
# which recompute replays raise, and the straggler report's per-rank busy times and the ranks it names)
_TIMING = ("time", "tokens_per_s", "tflops", "mfu", "memory", "grouped_gemm_forwards", "busy_s", "straggler")


def train_with_recompute(cfg, run_dir: str, settings: dict, steps: int = 2) -> dict:
    """Train ``steps`` steps from the same seed with each model.recompute_* setting (plus none):
    -> {name: (computational records, final parameters, router forward calls)}."""
    import dataclasses

    from rexmoe_train import compat
    from rexmoe_train.training.trainer import Trainer

    out = {}
    for name, fields in {"none": {}, **settings}.items():
        run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields),
                                      run=dataclasses.replace(cfg.run, dir=f"{run_dir}/{name}"))
        compat.reset_megatron_global_state()
        trainer = Trainer(run_cfg)
        calls = [0]
        hooks = [router.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
                 for router in trainer.model.routers]
        records = [{k: v for k, v in trainer.train_step().items()
                    if not any(t in k for t in _TIMING)} for _ in range(steps)]
        for hook in hooks:
            hook.remove()
        params = {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters()}
        out[name] = (records, params, calls[0])
    return out


def assert_same_training(runs: dict, atol: float = 1e-6) -> None:
    """Every record value and every final parameter of each run equals the "none" run's."""
    import torch

    ref_records, ref_params, _ = runs["none"]
    for name, (records, params, _) in runs.items():
        for ref, got in zip(ref_records, records):
            assert ref.keys() == got.keys(), name
            for key in ref:
                want, have = ref[key], got[key]
                if isinstance(want, (int, float)) and not isinstance(want, bool):
                    assert abs(have - want) <= atol * max(1.0, abs(want)), (name, key, have, want)
                else:
                    torch.testing.assert_close(torch.tensor(have, dtype=torch.float64),
                                               torch.tensor(want, dtype=torch.float64),
                                               rtol=0, atol=atol, msg=f"{name}: {key}")
        for pname, p in params.items():
            torch.testing.assert_close(p, ref_params[pname], rtol=0, atol=atol, msg=f"{name}: {pname}")


@contextlib.contextmanager
def script_module(path, name: str):
    """A repo script (bench/*.py, recipes/*/run.py) imported as module ``name`` for the duration of the
    block. Registered in sys.modules while it runs: dataclasses look their module up there."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def finish_session(proc: subprocess.Popen, timeout: float = 300) -> int:
    """Wait for a process started with ``start_new_session=True``, then SIGKILL whatever of its
    session is left (helpers of a killed trainer, a stuck agent): this test's processes only."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
