"""Checkpoints on 2 processes: resume is bitwise at ep=2 (with and without the distributed optimizer)
and at pp=2 with virtual pipeline stages;
a checkpoint saved by 1 process (r=2 and r=4, PSR mid-ramp) reshards into ep=2 (both dispatchers,
distributed optimizer on and off), tp=2 (sequence parallel), tp=2 + ep=2, pp=2, pp=2 with
interleaving and pp=2 with uneven stages, and continues with the same loss, grad norm and post-step loss (rel. err <= 1e-5).
ep=2 + dp=2 on 4 processes: tests/dist4."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.dist import _reference
from tests.helpers import make_trainer, tiny_config

_shared_dir, _remove_shared_dir = _reference.shared_dir, _reference.remove_shared_dir


def _losses(history) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in history if "lm_loss" in r}


@pytest.mark.parametrize("layout,distributed_optimizer", [
    ("ep2", False), ("ep2", True),
    ("pp2_vpp2", False),  # two model chunks per rank: keys model0/model1, loaded in one call
])
def test_resume_bitwise(megatron_world, layout, distributed_optimizer):
    from rexmoe_train import checkpoint

    base = _shared_dir()

    def config(run_dir, **ck):
        # r=1 with pp*vpp=4 chunks of one layer: a reuse group may not span chunks
        cfg = tiny_config(r=4 if layout == "ep2" else 1, psr="linear", start_step=1, end_step=6)
        cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = 6, 100, 1
        if layout == "ep2":
            cfg.parallel.expert_model_parallel_size = 2
            # aux-loss-free balancing (physical scope) continues bitwise too
            b = cfg.rexmoe.balance
            b.moe_router_enable_expert_bias, b.expert_bias_scope = True, "physical"
            b.moe_router_bias_update_rate = 1e-2
        else:
            cfg.parallel.pipeline_model_parallel_size = 2
            cfg.parallel.virtual_pipeline_model_parallel_size = 2
            cfg.train.eval_iters = 2  # the interleaved schedule needs micro-batches >= pp
        cfg.parallel.use_distributed_optimizer = distributed_optimizer
        cfg.run.dir, cfg.run.progress = str(run_dir), False
        for key, value in ck.items():
            setattr(cfg.checkpoint, key, value)
        return cfg

    ref = _losses(make_trainer(config(base / "a", save_interval=3)).run())
    resumed = make_trainer(config(base / "b", load=str(base / "a" / "checkpoints" / checkpoint.iter_name(3))))
    assert resumed.step == 3
    got = _losses(resumed.run())
    assert sorted(got) == [4, 5, 6]
    assert all(got[s] == ref[s] for s in got), (got, ref)  # bitwise
    if layout == "ep2":
        _reference.assert_expert_bias_replicas_equal(resumed)
    _remove_shared_dir(base)


# layout -> (parallel overrides, optimizer state loaded?). The non-distributed optimizer's state is
# per parameter under layout-free keys (experts by owner layer and expert), so it reshards into any
# tp / pp / ep. Distributed-optimizer state follows the grad buffers of the layout that saved it: model
# + LR schedule + step only (checkpoint.load_optimizer=false); loading the optimizer too is refused in
# one line.
LAYOUTS = {
    "ep2": ({"expert_model_parallel_size": 2}, True),
    "ep2_dedup": ({"expert_model_parallel_size": 2, "moe_token_dispatcher_type": "rexmoe_dedup"}, True),
    "ep2_distopt": ({"expert_model_parallel_size": 2, "use_distributed_optimizer": True}, False),
    "ep2_allgather": ({"expert_model_parallel_size": 2, "moe_token_dispatcher_type": "allgather"}, True),
    "tp2_sp": ({"tensor_model_parallel_size": 2}, True),  # vocab padded to 384 as at tp=1 (see below)
    "tp2_ep2_sp": ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2}, True),
    "pp2": ({"pipeline_model_parallel_size": 2}, True),
    # 4 model chunks of 2 layers, one r=2 group each (needs the 8-layer reference)
    "pp2_vpp2": ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, True),
    # uneven stages on group boundaries: 1 group on the first stage, 3 on the last (8-layer reference)
    "pp2_uneven": ({"pipeline_model_parallel_size": 2, "num_layers_in_first_pipeline_stage": 2,
                    "num_layers_in_last_pipeline_stage": 6}, True),
}
EIGHT_LAYER_LAYOUTS = ("pp2_vpp2", "pp2_uneven")

# 1-process reference -> its CLI overrides (on top of _reference.COMMON). The TINY PSR ramp (step 1 ->
# 6) puts steps 4 and 5 mid-ramp: N_t = 12, 14 of 16 candidates at r=2 and 22, 27 of 32 at r=4.
# r=2 on 4 layers splits at pp=2 on a group boundary; r=4 is one group of 4 layers, which pp=2
# cannot split, so it covers the ep/tp layouts; pp=2 with interleaving needs 2*2 chunks of whole
# groups: 8 layers at r=2 (and 2 eval micro-batches, as the interleaved schedule needs >= pp).
BIAS = ["rexmoe.balance.moe_router_enable_expert_bias=true", "rexmoe.balance.moe_router_bias_update_rate=0.01",
        "rexmoe.balance.expert_bias_scope=physical"]
REFERENCES = {
    "r2": ["rexmoe.reuse_group_size=2"],
    "r4": ["rexmoe.reuse_group_size=4"],
    "r2_8layers": ["rexmoe.reuse_group_size=2", "model.num_layers=8", "train.eval_iters=2"],
    # aux-loss-free balancing: the bias (a router buffer) reshards and is updated alike on all ranks
    "r4_bias": ["rexmoe.reuse_group_size=4", *BIAS],
    "r2_bias": ["rexmoe.reuse_group_size=2", *BIAS[:2], "rexmoe.balance.expert_bias_scope=router"],
}
CASES = ([("r2", layout) for layout in LAYOUTS if layout not in EIGHT_LAYER_LAYOUTS]
         + [("r4", layout) for layout in LAYOUTS if not layout.startswith("pp")]
         + [("r2_8layers", layout) for layout in EIGHT_LAYER_LAYOUTS]
         + [("r4_bias", "ep2"), ("r4_bias", "tp2_ep2_sp"), ("r2_bias", "pp2")])


@pytest.fixture(scope="module")
def one_process_references():
    """reference name -> its 1-process runs, all computed on first use (the ranks share the work:
    tests/dist/_reference.py) and kept for the module.

    Each is the real CLI as ONE process: 5 steps with a checkpoint at step 3, and (when a layout
    of this reference cannot load the optimizer state) the same resumed from step 3 with a fresh Adam
    state. Not an indirectly parametrized module fixture: pytest sets that up again for every test
    whose parameter set differs (here: every layout)."""
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.parallel.state import init_distributed

    init_distributed()
    base = _reference.shared_dir()
    refs: dict = {}

    def get(name: str) -> tuple:
        if not refs:  # every rank gets here at its first test of this kind, together
            specs = {ref: (base / ref, REFERENCES[ref],
                           any(not LAYOUTS[layout][1] for r, layout in CASES if r == ref))
                     for ref in dict.fromkeys(r for r, _ in CASES)}
            refs.update(_reference.one_process_references(specs))
        return base / name, refs[name]

    yield get
    _reference.remove_shared_dir(base)


@pytest.mark.parametrize("reference,layout", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in CASES])
def test_reshard_one_process_checkpoint(megatron_world, one_process_references, reference, layout):
    """Same weights and data -> the same step-4 loss and grad norm in every layout; step 5 (after one
    update) against the straight run where the optimizer state was loaded, else against the
    1-process run that resumed with a fresh Adam state too. All with PSR masking active."""
    from omegaconf import OmegaConf

    from rexmoe_train.config.schema import experiment_from_dict

    base, ref = one_process_references(reference)
    ckpt = ref["ckpt"]
    cfg = experiment_from_dict(OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")))
    overrides, with_optimizer = LAYOUTS[layout]
    for key, value in overrides.items():
        setattr(cfg.parallel, key, value)
    if cfg.parallel.tensor_model_parallel_size == 2:
        # megatron pads the vocab to a multiple of make_vocab_size_divisible_by * tp: 128 at tp=1 and
        # 64 * 2 at tp=2 both give 384 rows (else the new rows start at zero; the loader says so)
        cfg.model.make_vocab_size_divisible_by = 64
    cfg.checkpoint.load, cfg.checkpoint.save = str(ckpt), None
    cfg.run.dir = str(base / layout)
    if not with_optimizer:
        from rexmoe_train.checkpoint import CheckpointError

        with pytest.raises(CheckpointError, match="set checkpoint.load_optimizer=false"):
            make_trainer(cfg)
        cfg.checkpoint.load_optimizer = False
    trainer = make_trainer(cfg)
    assert trainer.step == 3
    assert len(trainer.chunks) == (cfg.parallel.virtual_pipeline_model_parallel_size or 1)
    if layout == "pp2_uneven":
        assert len(trainer.model.chunks[0].decoder.layers) == (2, 6)[dist.get_rank()]
    history = trainer.run()
    got = _reference.summary({r["step"]: r for r in history if "lm_loss" in r})
    assert sorted(got["lm_loss"]) == [4, 5]
    _reference.check_mid_ramp(got["psr_candidates"], cfg.model.num_moe_experts, cfg.rexmoe.reuse_group_size)
    assert all(got["psr_candidates"][s] == ref["straight"]["psr_candidates"][s] for s in (4, 5))
    _reference.assert_matches(
        f"[reshard] 1 process -> {layout} (r={cfg.rexmoe.reuse_group_size}, {cfg.model.num_layers} layers)",
        got, {4: ref["straight"], 5: ref["straight"] if with_optimizer else ref["fresh"]})
    _reference.assert_replicas_equal(trainer)
    if reference.endswith("_bias"):
        _reference.assert_expert_bias_replicas_equal(trainer)
        # the bias continued from the checkpoint and moved the same way as in the 1-process run
        for step in (4, 5):
            assert got["expert_bias_range"][step] == ref["straight"]["expert_bias_range"][step], step
            assert got["expert_bias_range"][step][0] > 0
