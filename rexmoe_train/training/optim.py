"""Megatron DDP wrapping, optimizer and LR/WD schedule (warm-up then cosine to min_lr, as the paper)."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from rexmoe_train.config.schema import ExperimentConfig


def wrap_for_training(cfg: ExperimentConfig, chunks: list, tc) -> list:
    """bf16 wrapper (when used) + megatron DDP; expert grads reduce over expert-data-parallel ranks,
    every other grad over data-parallel ranks (megatron decides from each param's `allreduce`)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(tc, chunk) if tc.bf16 else chunk
        ddp = DistributedDataParallel(config=tc, ddp_config=ddp_config, module=module,
                                      disable_bucketing=i > 0)
        ddp.broadcast_params()  # identical replicas whatever each rank's init RNG did
        wrapped.append(ddp)
    return wrapped


def build_optimizer(cfg: ExperimentConfig, wrapped_chunks: list, tc):
    t = cfg.train
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=tc.bf16,
            params_dtype=tc.params_dtype,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        ),
        wrapped_chunks,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.resolved_lr_warmup_iters(),
        lr_decay_steps=t.lr_decay_iters or t.train_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
        # On resume the schedule is the config's (lr, min_lr, warm-up, decay, weight decay), not the
        # checkpoint's: megatron's default keeps the checkpoint's values while config.yaml would
        # record the new ones. Changes are logged by checkpoint/resume.py; the step count still
        # comes from the checkpoint.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler
