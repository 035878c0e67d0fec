"""Checkpoints on 2 processes: resume is bitwise at ep=2 (with and without the distributed optimizer)
and at pp=2 with virtual pipeline stages;
a checkpoint saved by 1 process reshards into ep=2, tp=2 (sequence parallel) and pp=2 and continues
with the same losses."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.helpers import tiny_config


def _shared_dir() -> Path:
    box = [tempfile.mkdtemp(prefix="rexmoe-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _remove_shared_dir(base: Path) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(base, ignore_errors=True)


def _trainer(cfg):
    from rexmoe_train import platform
    from rexmoe_train.training.trainer import Trainer

    platform.reset_megatron_global_state()
    return Trainer(cfg)


def _losses(history) -> dict[int, float]:
    return {r["step"]: r["lm_loss"] for r in history if "lm_loss" in r}


@pytest.mark.parametrize("layout,distributed_optimizer", [
    ("ep2", False), ("ep2", True),
    ("pp2_vpp2", False),  # two model chunks per rank: keys model0/model1, loaded in one call
])
def test_resume_bitwise(megatron_world, layout, distributed_optimizer):
    from rexmoe_train.training import checkpoint

    base = _shared_dir()

    def config(run_dir, **ck):
        # r=1 with pp*vpp=4 chunks of one layer: a reuse group may not span chunks
        cfg = tiny_config(r=4 if layout == "ep2" else 1, psr="linear", start_step=1, end_step=6)
        cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = 6, 100, 1
        if layout == "ep2":
            cfg.parallel.expert_model_parallel_size = 2
        else:
            cfg.parallel.pipeline_model_parallel_size = 2
            cfg.parallel.virtual_pipeline_model_parallel_size = 2
            cfg.train.eval_iters = 2  # the interleaved schedule needs micro-batches >= pp
        cfg.parallel.use_distributed_optimizer = distributed_optimizer
        cfg.run.dir, cfg.run.progress = str(run_dir), False
        for key, value in ck.items():
            setattr(cfg.checkpoint, key, value)
        return cfg

    ref = _losses(_trainer(config(base / "a", save_interval=3)).run())
    resumed = _trainer(config(base / "b", load=str(base / "a" / "checkpoints" / checkpoint.iter_name(3))))
    assert resumed.step == 3
    got = _losses(resumed.run())
    assert sorted(got) == [4, 5, 6]
    assert all(got[s] == ref[s] for s in got), (got, ref)  # bitwise
    _remove_shared_dir(base)


# layout -> (parallel overrides, optimizer state loaded?). The non-distributed optimizer's state is
# per parameter under layout-free keys, so it reshards into tp=2 / pp=2. With ep>1 megatron gives the
# experts their own chained optimizer, a different structure from ep=1: model + LR schedule + step
# only (checkpoint.load_optimizer=false); loading the optimizer too is refused in one line.
LAYOUTS = {
    "ep2": ({"expert_model_parallel_size": 2}, False),
    "ep2_dedup": ({"expert_model_parallel_size": 2, "moe_token_dispatcher_type": "rexmoe_dedup"}, False),
    "ep2_distopt": ({"expert_model_parallel_size": 2, "use_distributed_optimizer": True}, False),
    "ep2_allgather": ({"expert_model_parallel_size": 2, "moe_token_dispatcher_type": "allgather"}, False),
    "tp2_sp": ({"tensor_model_parallel_size": 2}, True),  # vocab padded to 384 as at tp=1 (see below)
    "tp2_ep2_sp": ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2}, False),
    "pp2": ({"pipeline_model_parallel_size": 2}, True),
}


@pytest.fixture(scope="module")
def one_process_checkpoint():
    """Rank 0 runs the real CLI as ONE process (r=2 so that pp=2 splits on a group boundary; balance
    losses off: they are per-rank by design): 5 steps, a checkpoint at step 3."""
    from rexmoe_train import platform

    platform.setup()
    from rexmoe_train.parallel.state import init_distributed
    from rexmoe_train.training import checkpoint
    from tests.training.test_checkpoint import cli, finish, losses

    def grad_norms(run_dir):
        import json

        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["grad_norm"] for r in records if r.get("grad_norm") is not None}

    init_distributed()
    base = _shared_dir()
    result = [None]
    if dist.get_rank() == 0:
        rc, out, err = finish(cli("train.train_iters=5", "checkpoint.save_interval=3",
                                  "rexmoe.reuse_group_size=2", "rexmoe.balance.layer_aux_coeff=0",
                                  "rexmoe.balance.z_loss_coeff=0", "model.make_vocab_size_divisible_by=128",
                                  f"run.dir={base / 'one'}",
                                  log=base / "logs" / "one"))
        result = [(rc, err[-3000:], losses(base / "one"), grad_norms(base / "one"))]
    dist.broadcast_object_list(result, src=0)
    rc, err, ref, ref_norms = result[0]
    assert rc == 0, err
    yield base, base / "one" / "checkpoints" / checkpoint.iter_name(3), ref, ref_norms
    _remove_shared_dir(base)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reshard_one_process_checkpoint(megatron_world, one_process_checkpoint, layout):
    from omegaconf import OmegaConf

    from rexmoe_train.config.schema import experiment_from_dict

    base, ckpt, ref, ref_norms = one_process_checkpoint
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
        from rexmoe_train.training.checkpoint import CheckpointError

        with pytest.raises(CheckpointError, match="set checkpoint.load_optimizer=false"):
            _trainer(cfg)
        cfg.checkpoint.load_optimizer = False
    trainer = _trainer(cfg)
    assert trainer.step == 3
    history = trainer.run()
    got = _losses(history)
    assert sorted(got) == [4, 5]
    # same weights and data -> the same gradient: the global grad norm of step 4 agrees in every layout
    norm = next(r["grad_norm"] for r in history if r["step"] == 4)
    assert abs(norm - ref_norms[4]) / ref_norms[4] <= 1e-5, (layout, norm, ref_norms[4])
    # 4: the model state; 5: the optimizer state after one more update (when it was loaded)
    for step in (4, 5) if with_optimizer else (4,):
        rel = abs(got[step] - ref[step]) / abs(ref[step])
        print(f"[reshard] 1 process -> {layout}: step {step} lm_loss {got[step]:.7f} vs {ref[step]:.7f}, "
              f"rel err {rel:.1e}")
        assert rel <= 1e-5, (layout, step, got[step], ref[step], rel)
