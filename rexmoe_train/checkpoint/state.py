"""The pieces a checkpoint is made of, each a small Stateful object in torchtitan's spirit: it says
what it contributes to megatron's sharded state dict and how it takes its state back.

- :class:`TrainState`: the step, the skipped-step count (and the last saved step, not persisted);
- :class:`ModelState`: every model chunk's sharded weights (layout-free expert keys, model/experts.py);
- :class:`OptimizerState`: megatron's (chained, possibly distributed) optimizer;
- :class:`SchedulerState`: megatron's LR schedule;
- :class:`RNGState`: this rank's CPU/GPU generators and megatron's tracker (same layout only);
- :class:`DataPosition`: where the data stream stands. The data for step t is a pure function of the
  config and t, so the position is the consumed sample count, checked on load rather than restored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from rexmoe_train import platform
from rexmoe_train.checkpoint.errors import CheckpointError
from rexmoe_train.compat import require_installed

require_installed()  # megatron-facing

from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: E402
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # noqa: E402


class CheckpointPart(Protocol):
    """``entries`` are this part's top-level entries of the sharded state dict (``model_sd``: what
    the parts before it contributed, which megatron's optimizer maps its state onto); ``load`` takes
    them back from the loaded dict."""

    def entries(self, is_loading: bool, model_sd: dict) -> dict: ...

    def load(self, loaded: dict) -> None: ...


@dataclasses.dataclass
class TrainState:
    step: int = 0
    skipped_steps: int = 0  # steps skipped by the numerics guard (non-finite loss / grads)
    last_saved_step: Optional[int] = None  # not persisted: what this process saved or loaded

    def entries(self, is_loading: bool, model_sd: dict) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps}

    def load(self, loaded: dict) -> None:
        self.step = int(loaded["step"])
        self.skipped_steps = int(loaded["skipped_steps"])


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


class ModelState:
    """The unwrapped GPTModel chunks (the same parameter objects DDP wraps)."""

    def __init__(self, chunks: list, sharding_metadata: dict) -> None:
        self.chunks = chunks
        self.metadata = sharding_metadata

    def entries(self, is_loading: bool, model_sd: dict) -> dict:
        n = len(self.chunks)
        return {_model_key(i, n): chunk.sharded_state_dict(metadata=self.metadata)
                for i, chunk in enumerate(self.chunks)}

    def load(self, loaded: dict) -> None:
        n = len(self.chunks)
        for i, chunk in enumerate(self.chunks):
            chunk.load_state_dict(loaded[_model_key(i, n)], strict=True)

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for chunk in self.chunks for p in chunk.parameters())


def chain_length(optimizer) -> int:
    """How many optimizers megatron chains on this rank: 2 when the model has experts (they have
    their own, at every ep: model/experts.py), else 1."""
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


class OptimizerState:
    def __init__(self, optimizer, sharding_metadata: dict) -> None:
        self.optimizer = optimizer
        self.metadata = sharding_metadata

    def entries(self, is_loading: bool, model_sd: dict) -> dict:
        if is_loading:
            _init_distributed_optimizer_state(self.optimizer)
        return {"optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                               metadata=self.metadata)}

    # Hyperparameters that torch's load_state_dict copies from the checkpoint into every param group
    # but that the config decides (megatron keeps the schedule's max_lr/min_lr per group; betas and
    # eps are Adam's): the groups as built from this run's config are put back after a load, so a
    # resume with a changed train.lr/min_lr/adam_* runs what config.yaml says (checkpoint/resume.py).
    CONFIG_KEYS = ("max_lr", "min_lr", "betas", "eps")

    def load(self, loaded: dict) -> None:
        configured = [{k: g[k] for k in self.CONFIG_KEYS if k in g} for g in self.optimizer.param_groups]
        _match_step_convention(loaded["optimizer"], self.optimizer)
        with torch.no_grad():
            self.optimizer.load_state_dict(loaded["optimizer"])
        for group, values in zip(self.optimizer.param_groups, configured):
            group.update(values)
        _restore_distributed_optimizer_steps(self.optimizer)

    def skip(self) -> None:
        """Model weights loaded without optimizer state: refresh the fp32 main params from them."""
        self.optimizer.reload_model_params()


class SchedulerState:
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def entries(self, is_loading: bool, model_sd: dict) -> dict:
        return {"opt_param_scheduler": self.scheduler.state_dict()}

    def load(self, loaded: dict) -> None:
        try:
            self.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        except AssertionError as err:
            raise CheckpointError(f"checkpoint error: the LR schedule differs from the checkpoint's "
                                  f"({' '.join(str(err).split())})") from None

    def advance_to(self, step: int) -> None:
        if step:
            self.scheduler.step(increment=step)


class RNGState:
    """Generator states are device-specific: megatron's tracker holds CUDA generator states on a GPU
    (16 bytes) and, through the CPU layer, CPU generator states on a CPU (5056 bytes); each side's
    set_state refuses the other's at the tracker's next fork. So a checkpoint written on the other
    kind of device restores the CPU generator only (the tracker keeps this run's seeded streams)."""

    def entries(self, is_loading: bool, model_sd: dict) -> dict:
        rank, world = dist.get_rank(), dist.get_world_size()
        state = {"platform": platform.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
                 "device": platform.device().type}
        return {"rng_state": ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)}

    def load(self, loaded: dict) -> None:
        state = loaded["rng_state"]
        if state.get("device", "cpu") != platform.device().type:  # checkpoints before this key: CPU-made
            torch.set_rng_state(state["platform"]["cpu"])
            return
        platform.set_rng_state(state["platform"])
        get_cuda_rng_tracker().set_states(state["tracker"])


class DataPosition:
    """Consumed samples. Not a tensor in the checkpoint: the manifest records it and a load checks
    that the resumed run's batch size puts the data stream at the same sample."""

    def __init__(self, global_batch_size: int) -> None:
        self.global_batch_size = global_batch_size

    def consumed_samples(self, step: int) -> int:
        return step * self.global_batch_size


def _keeps_step_per_param(inner) -> bool:
    """Where the inner Adam keeps its step count. torch's Adam/AdamW: a 0-d ``state[p]["step"]``
    per parameter (megatron's torch path reads it there: DistributedOptimizer.state_dict asserts one
    value). Transformer Engine's FusedAdam (what megatron uses whenever TE is installed) and Apex's:
    an int ``param_groups[i]["step"]``; TE's ``state_dict()`` / ``load_state_dict()`` pass every state
    key through its dtype table (exp_avg, exp_avg_sq, master_param), so a "step" state raises KeyError
    (transformer_engine/pytorch/optimizers/fused_adam.py 2.11, get_unscaled_state / set_scaled_state)."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _match_step_convention(loaded_optimizer, optimizer) -> None:
    """A non-distributed optimizer's checkpoint loaded by the other Adam (saved where TE is missing,
    resumed where it is installed, or the reverse): megatron saves torch's per-parameter step as
    ``state["common_step"]`` and puts it back into every parameter's state on load (FusedAdam then
    raises KeyError on it), while FusedAdam's step travels in the param groups (torch's Adam then
    finds no per-parameter step). Move the step to where the live inner optimizer keeps it, in place.
    (The distributed optimizer writes the step into the param groups for both: see
    _restore_distributed_optimizer_steps.)"""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(subs) == 1:
        entries = [loaded_optimizer]
    elif isinstance(loaded_optimizer, dict):  # megatron's ChainedOptimizer.load_state_dict order
        entries = [v for _, v in sorted(loaded_optimizer.items())]
    else:
        entries = list(loaded_optimizer)
    for sub, entry in zip(subs, entries):
        if isinstance(sub, DistributedOptimizer) or getattr(sub, "optimizer", None) is None:
            continue
        inner = entry if "state" in entry else entry.get("optimizer")  # FP32Optimizer | Float16Optimizer
        if inner is None:
            continue
        state, groups = inner["state"], inner["param_groups"]
        if _keeps_step_per_param(sub.optimizer):
            steps = {g["step"] for g in groups if "step" in g}
            if "common_step" not in state and len(steps) == 1:
                state["common_step"] = torch.tensor(float(steps.pop()), dtype=torch.float32)
        elif "common_step" in state:
            step = int(state.pop("common_step"))
            for group in groups:
                group["step"] = step


def _init_distributed_optimizer_state(optimizer) -> None:
    """Before a load, the DistributedOptimizer builds its state dict from the inner Adam's state,
    which is empty until the first step (and megatron's init_state_fn sets no 'step', which torch's
    Adam needs per parameter)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or sub.optimizer is None:
            continue
        inner = sub.optimizer
        step_per_param = _keeps_step_per_param(inner)
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
                    if step_per_param:
                        inner.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)


def _restore_distributed_optimizer_steps(optimizer) -> None:
    """After a dp_reshardable load, megatron copies each param's Adam 'step' from the (local,
    non-persistent) pre-load value; the saved step is in the param groups. Put it back (torch's
    Adam only: TE's FusedAdam reads the param groups' step, which the load already restored)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or sub.optimizer is None:
            continue
        inner = sub.optimizer
        if not _keeps_step_per_param(inner):
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
