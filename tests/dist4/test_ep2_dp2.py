"""ep=2 + dp=2 on 4 processes (every expert on 2 ranks and replicated on 2: expert-data-parallel 2;
the dense layers are data-parallel over all 4): a checkpoint saved by 1 process (r=4, PSR mid-ramp,
micro-batches of 1 sequence so that both split a step's 4 sequences alike) continues with
the same loss, grad norm and post-step loss (rel. err <= 1e-5), with and without the distributed
optimizer, with megatron's alltoall and the rexmoe_dedup dispatcher.

The non-distributed optimizer's state loads into ep=2 (step 5 vs the straight 1-process run); the
distributed optimizer's does not (tests/dist/test_checkpoint_dist.py), so there step 5 is compared with
a 1-process run that also resumed from step 3 with a fresh Adam state."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.dist import _reference


@pytest.fixture(scope="module")
def one_process_checkpoint():
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.parallel.state import init_distributed

    init_distributed()
    base = _reference.shared_dir()
    yield base, _reference.one_process_reference(base, ["rexmoe.reuse_group_size=4",
                                                                "train.micro_batch_size=1"])
    _reference.remove_shared_dir(base)


@pytest.mark.parametrize("dispatcher", ["alltoall", "rexmoe_dedup"])
@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_ep2_dp2_matches_one_process(megatron_world, one_process_checkpoint, dispatcher,
                                     distributed_optimizer):
    from megatron.core import parallel_state
    from omegaconf import OmegaConf

    from rexmoe_train.config.schema import experiment_from_dict
    from rexmoe_train.training.trainer import Trainer

    assert dist.get_world_size() == 4
    base, ref = one_process_checkpoint
    ckpt = ref["ckpt"]
    cfg = experiment_from_dict(OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")))
    cfg.parallel.expert_model_parallel_size = 2
    cfg.parallel.moe_token_dispatcher_type = dispatcher
    cfg.parallel.use_distributed_optimizer = distributed_optimizer
    # the non-distributed optimizer's state is per parameter (layout-free keys): it loads into ep=2;
    # the distributed optimizer's follows the grad buffers of the 1-process layout: model only
    cfg.checkpoint.load, cfg.checkpoint.save = str(ckpt), None
    cfg.checkpoint.load_optimizer = not distributed_optimizer
    layout = f"ep2_dp2_{dispatcher}" + ("_distopt" if distributed_optimizer else "")
    cfg.run.dir = str(base / layout)
    from rexmoe_train import compat

    compat.reset_megatron_global_state()
    trainer = Trainer(cfg)
    assert trainer.step == 3
    assert trainer.dp_size == 4 and trainer.num_microbatches == 1
    assert parallel_state.get_expert_data_parallel_world_size() == 2
    history = trainer.run()
    got = _reference.summary({r["step"]: r for r in history if "lm_loss" in r})
    assert sorted(got["lm_loss"]) == [4, 5]
    _reference.check_mid_ramp(got["psr_candidates"], cfg.model.num_moe_experts, cfg.rexmoe.reuse_group_size)
    # step 4: the loaded weights (the straight and the resumed 1-process runs agree bitwise there);
    # step 5: after one update, from the loaded Adam state (as the straight 1-process run) or from a
    # fresh one (as the 1-process run resumed the same way)
    want = ref["fresh"] if distributed_optimizer else ref["straight"]
    _reference.assert_matches(f"[dist4] 1 process -> {layout} (r=4)", got, {4: want, 5: want})
    _reference.assert_replicas_equal(trainer)
