"""The training loop: megatron's forward-backward schedules over ReXMoE model chunks.

One optimizer step t:
  1. PSRState.set_step(t); routers reset their per-step load and global-batch counters.
  2. The data for step t (a pure function of (seed, t)) is split into this DP rank's micro-batches.
  3. megatron's schedule (no pipelining / 1F1B / interleaved) runs forward+backward per micro-batch;
     each router gates over its group's candidates under the step's PSR mask and attaches its
     balance losses; expert grads accumulate into the group's bank from all r layers.
  4. finalize_model_grads reduces grads (DP for dense params, expert-DP for experts), the megatron
     optimizer clips and steps, the LR schedule advances.
  5. With aux-loss-free balancing, the routers' selection biases move by the step's global-batch
     load (model/balance.py update_expert_bias); a skipped step moves neither weights nor biases.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from rexmoe_train import platform
from rexmoe_train.checkpoint import layout
from rexmoe_train.checkpoint.manager import CheckpointManager, NonFiniteWeights
from rexmoe_train.checkpoint.state import TrainState
from rexmoe_train.config.schema import ConfigError, ExperimentConfig
from rexmoe_train.data import micro_batches, valid_batches
from rexmoe_train.data.sources import build_datasets
from rexmoe_train.model import expert_padding
from rexmoe_train.model.balance import expert_bias_ranges, update_expert_bias
from rexmoe_train.model.gpt import build_model
from rexmoe_train.parallel.dispatcher import DEDUP_DISPATCHER
from rexmoe_train.parallel.state import init_distributed, init_model_parallel, set_collective_timeout
from rexmoe_train.resilience.straggler import StragglerReport
from rexmoe_train.resilience.watchdog import Watchdog
from rexmoe_train.training import guard
from rexmoe_train.training.metrics import (
    balance_losses,
    collapsed_groups,
    dispatch_bytes,
    init_aux_loss_tracker,
    router_load,
    throughput,
)
from rexmoe_train.training.optim import build_optimizer, wrap_for_training
from rexmoe_train.training.run_lock import RunLock
from rexmoe_train.training.run_logger import RunLogger, trim_metrics


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses.reshape(-1) * mask) / mask.sum()
    # clone: megatron divides the returned loss in place by the micro-batch count
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    dev = platform.device()
    output = model(batch["tokens"].to(dev), batch["position_ids"].to(dev), None,
                   labels=batch["labels"].to(dev))
    return output, partial(_loss_func, batch["loss_mask"].to(dev))


class Trainer:
    def __init__(self, cfg: ExperimentConfig, resolved_config: Optional[dict] = None,
                 signals: Optional[guard.StopSignals] = None) -> None:
        self.cfg = cfg
        self.start_time = time.monotonic()
        # The CLI installs the stop-signal handlers before anything slow (before torch is imported)
        # and hands them over, so a SIGTERM during start-up ends in the save-and-exit-75 path. A
        # Trainer built by library code installs its own only while run() runs: handlers installed
        # here would outlive a Trainer that is never run and swallow SIGTERM process-wide (e.g. for
        # worker processes forked later, which then cannot be terminated).
        self.signals = signals or guard.StopSignals(cfg.checkpoint.exit_signal_handler,
                                                    cfg.checkpoint.exit_duration_mins, self.start_time)
        self.state = TrainState()
        self.lock: Optional[RunLock] = None
        self._steps_run = self._steps_updated = 0  # by this process (the all-skipped check)
        try:
            self._build(cfg, resolved_config)
        except BaseException:
            if self.lock is not None:
                self.lock.release(failed=True)
            raise

    def _build(self, cfg: ExperimentConfig, resolved_config: Optional[dict]) -> None:
        self.rank, self.world_size = init_distributed(timeout_s=cfg.resilience.init_timeout_s)
        cfg.validate(self.world_size).check_machine()
        self._claim_run_dir(cfg)
        init_model_parallel(cfg.parallel, cfg.train.seed, timeout_s=cfg.resilience.init_timeout_s)
        t = cfg.train
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)

        self.train_data, self.valid_data, self.data_info = build_datasets(
            cfg.data, t.seq_length, t.seed, train_samples=t.train_iters * t.global_batch_size,
            valid_samples=t.eval_iters * t.micro_batch_size * self.dp_size, run_dir=cfg.run.dir)
        data_vocab = int(self.data_info["vocab_size"])
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < data_vocab:
            raise ConfigError(f"config error: model.vocab_size={cfg.model.vocab_size}: must be >= the "
                              f"tokenizer's vocabulary ({data_vocab}, data.tokenizer="
                              f"{cfg.data.tokenizer!r}), or null to take it from the tokenizer")
        self.vocab_size = cfg.model.vocab_size or data_vocab

        self.model = build_model(cfg, self.vocab_size)
        # found once (a module walk): the step loop asks for them several times per step
        self.routers = self.model.routers
        self.dispatchers = self.model.dedup_dispatchers  # [] unless rexmoe_dedup
        # found once, like the routers: the grouped-GEMM banks whose forward count is logged
        self.grouped_banks = [m for c in self.model.chunks for m in c.modules() if hasattr(m, "grouped_forwards")]
        tc = self.model.config
        self.chunks = wrap_for_training(cfg, self.model.chunks, tc)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.chunks, tc)
        tc.finalize_model_grads_func = finalize_model_grads
        tc.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        init_aux_loss_tracker(cfg.model.num_layers)
        self.forward_backward = get_forward_backward_func()
        self._collapse_streak: dict[int, int] = {}
        self.exit_code = 0  # ExitCode.PREEMPTED after a signal / the time budget
        self.resolved_config = resolved_config
        self.stop_reason: Optional[str] = None
        self.checkpoints = CheckpointManager(
            cfg, train_state=self.state, chunks=self.model.chunks, optimizer=self.optimizer,
            scheduler=self.scheduler, vocab_size=self.vocab_size, padded_vocab_size=self.model.vocab_size,
            resolved_config=resolved_config, log=self._log)
        # Resume before the run dir is touched: a bad checkpoint fails here and writes nothing.
        resumed = self.checkpoints.load()
        if resumed and self.rank == 0:
            trim_metrics(cfg.run.dir, self.step)
        self.logger = RunLogger(
            cfg.run.dir, enabled=self.rank == 0, total_steps=t.train_iters, start_step=self.step,
            progress=cfg.run.progress, wandb_cfg=cfg.run.wandb, resolved_config=resolved_config)
        self.logger.write_json("data.json", self.data_info)
        self.logger.write_json("model.json", self.describe())
        self._start_watching(cfg)
        if resumed:
            self.logger.message(f"[checkpoint] resumed from {resumed.path} at step {self.step}"
                                + "".join(f"; {note}" for note in resumed.notes))
            for change in resumed.changes:
                self.logger.message(change)

    def _start_watching(self, cfg: ExperimentConfig) -> None:
        """The hang watchdog and the straggler report (resilience: block; docs/reliability.md)."""
        res = cfg.resilience
        self.watchdog = Watchdog(cfg.run.dir, self.rank, self.world_size,
                                 {"step": res.step_timeout_s, "eval": res.eval_timeout_s,
                                  "save": res.save_timeout_s}, first_budget=res.first_step_timeout_s)
        self.straggler = StragglerReport(
            self.rank, self.world_size, res.straggler_threshold, res.straggler_min_excess_s,
            res.straggler_intervals) if res.straggler_report and self.world_size > 1 else None
        self._training_timeout_set = False

    def _claim_run_dir(self, cfg: ExperimentConfig) -> None:
        """Rank 0 locks run.dir for the whole run, then removes what a killed or failed save left
        (``iter_*.tmp``): before anything else writes, so a disk filled by a dead save has its space
        back before metrics.jsonl is trimmed. Every rank learns the outcome (one line, exit 2)."""
        error = None
        if self.rank == 0:
            try:
                save = layout.save_root(cfg)
                problem = layout.why_not_a_dir(save)  # a symlink loop: the save's mkdir says "File exists"
                if problem:
                    raise ConfigError(f"config error: checkpoint.save={str(save)!r}: {problem}")
                self.lock = RunLock(cfg.run.dir)
                self.lock.acquire()
                if save.is_dir():
                    layout.remove_stale_tmp(save)
            except ConfigError as err:
                error = str(err)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise ConfigError(box[0])

    # the run's counters live in the checkpointed TrainState
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.state.skipped_steps = value

    @property
    def last_saved_step(self) -> Optional[int]:
        return self.state.last_saved_step

    save_clock = staticmethod(time.monotonic)  # what checkpoint.save_interval_minutes is measured on

    def _save_clock_due(self) -> bool:
        """Rank 0's clock only (step_flags takes the MAX): checkpoint.save_interval_minutes have passed
        since the last save, or since this Trainer was built."""
        minutes = self.cfg.checkpoint.save_interval_minutes
        if minutes is None or self.rank != 0:
            return False
        return self.save_clock() - getattr(self, "_last_save_clock", self.start_time) >= 60.0 * minutes

    def _log(self, message: str) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.message(message)
        elif self.rank == 0:
            print(message, flush=True)

    def save_checkpoint(self, blocking: Optional[bool] = None):
        """Save the current step (collective). Non-finite weights halt the run instead. ``blocking``:
        None follows checkpoint.async_save (CheckpointManager.save)."""
        self._last_save_clock = self.save_clock()  # checkpoint.save_interval_minutes counts from here
        self.signals.agreed_save_due = False
        try:
            with self._saving():
                return self.checkpoints.save(blocking=blocking)
        except NonFiniteWeights as err:
            raise guard.TrainingHalted(str(err)) from None

    @contextmanager
    def _saving(self):
        """A save or a blocking finalize: the save watchdog section, with the collective timeout raised
        to resilience.save_collective_timeout_s (the ladder: above save_timeout_s), then set back."""
        res = self.cfg.resilience
        set_collective_timeout(res.save_collective_timeout_s)
        try:
            with self.watchdog.section("save", self.step):
                yield
        finally:
            set_collective_timeout(res.train_timeout_s if self._training_timeout_set else res.init_timeout_s)

    def _finish_saves(self) -> None:
        """Wait for the async save in flight (collective) inside the save section."""
        with self._saving():
            self.checkpoints.finalize(blocking=True)

    # ----------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Parameter counts (global, all ranks) and the layout, for the run dir."""
        local = {"total": 0, "experts": 0, "routers": 0}
        for chunk in self.model.chunks:
            for name, p in chunk.named_parameters():
                n = p.numel()
                # embeddings tied across stages count once (on the first stage)
                local["total"] += n
                if "expert_banks" in name:
                    local["experts"] += n
                elif ".router." in name:
                    local["routers"] += n
            # the model's parameters, not the fp8 zero padding of the expert FFN (model/expert_padding.py)
            pads = sum(expert_padding.padding_elements(module) for module in chunk.modules())
            local["total"] -= pads
            local["experts"] -= pads
        # Only ranks with tp=0, dp=0 count their stage once; experts are split over EP so add them all.
        c = parallel_state
        first_replica = c.get_tensor_model_parallel_rank() == 0 and c.get_data_parallel_rank() == 0
        expert_replica = c.get_expert_tensor_parallel_rank() == 0 and c.get_expert_data_parallel_rank() == 0
        dense = [local["total"] - local["experts"], local["routers"]] if first_replica else [0, 0]
        experts = [local["experts"]] if expert_replica else [0]
        # on the compute device: NCCL reduces device tensors only
        summary = torch.tensor(dense + experts, dtype=torch.float64, device=platform.device())
        dist.all_reduce(summary)
        summary = summary.tolist()
        return {
            "parameters_total": int(summary[0] + summary[2]),
            "parameters_experts": int(summary[2]),
            "parameters_routers": int(summary[1]),
            "world_size": self.world_size,
            "data_parallel_size": self.dp_size,
            "num_microbatches": self.num_microbatches,
            "padded_vocab_size": self.model.vocab_size,
        }

    def _iterators(self, batches: list) -> list:
        # every chunk's forward_step pulls one micro-batch per micro-batch index
        return [iter(batches) for _ in self.chunks]

    def _set_mode(self, train: bool) -> None:
        for chunk in self.chunks:
            chunk.train(train)

    def _last_stage_mean(self, losses: list, key: str = "lm loss") -> float:
        """Average a per-micro-batch value over micro-batches and DP ranks; the same on every rank."""
        contributes = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
            parallel_state.get_tensor_model_parallel_rank() == 0
        acc = torch.zeros(2, dtype=torch.float64, device=platform.device())
        if contributes and losses:
            acc[0] = sum(float(d[key]) for d in losses)
            acc[1] = len(losses)
        dist.all_reduce(acc)
        return float(acc[0] / acc[1]) if acc[1] > 0 else float("nan")

    # ----------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        step = self.step + 1
        self.model.psr_state.set_step(step)
        for router in self.routers:
            router.reset_step_state()
        for dispatcher in self.dispatchers:
            dispatcher.reset_bytes()
        batches = micro_batches(self.train_data, seed=t.seed, global_batch_size=t.global_batch_size,
                                micro_batch_size=t.micro_batch_size, dp_rank=self.dp_rank,
                                dp_size=self.dp_size, step=step - 1)
        if self.straggler is not None:
            self.straggler.step_started()
        start = time.perf_counter()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(
            forward_step_func=_forward_step,
            data_iterator=self._iterators(batches) if len(self.chunks) > 1 else iter(batches),
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        # Numerics guard + pre-emption check: one all_reduce(MAX) so every rank decides alike.
        bad, signalled, out_of_time = guard.step_flags(
            guard.local_step_is_bad(losses, self.chunks), self.signals, save_due=self._save_clock_due())
        if signalled or out_of_time:
            self.stop_reason = "signal" if signalled else "checkpoint.exit_duration_mins"
        success, grad_norm = False, None
        if not bad:
            success, grad_norm, _ = self.optimizer.step()
        self._steps_run += 1
        if success:
            self._steps_updated += 1
            self.scheduler.step(increment=1)
            # aux-loss-free balancing: the bias moves only with the weights (a skipped step leaves both)
            balance = cfg.rexmoe.balance
            if balance.moe_router_enable_expert_bias:
                update_expert_bias(self.routers, balance.expert_bias_scope,
                                   balance.moe_router_bias_update_rate)
        else:  # as Megatron-LM: the step's data is consumed, the weights and LR schedule stay
            self.skipped_steps += 1
        elapsed = time.perf_counter() - start
        if self.straggler is not None:
            self.straggler.step_ended(elapsed)
        self.step = step
        record = {"step": step, "consumed_samples": step * t.global_batch_size}
        if step % t.log_interval == 0 or step == t.train_iters or not success:
            lm_loss = self._last_stage_mean(losses)
            record.update(balance_losses(cfg, self.num_microbatches))
            record.update(router_load(cfg, self.routers, step))
            if cfg.rexmoe.balance.moe_router_enable_expert_bias:  # same on every rank
                record["expert_bias_range"] = expert_bias_ranges(
                    self.routers, len(cfg.reuse_plan().groups), platform.device())
            if cfg.parallel.moe_token_dispatcher_type == DEDUP_DISPATCHER:  # same on every rank
                record.update(dispatch_bytes(self.dispatchers))
            if self.grouped_banks:  # forwards on the grouped-GEMM path so far (0: it fell back to the loop)
                record["grouped_gemm_forwards"] = sum(b.grouped_forwards for b in self.grouped_banks)
            record.update({
                "lm_loss": lm_loss,
                "loss": lm_loss + record["aux_loss"],
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "update_successful": bool(success),
                "skipped_steps": self.skipped_steps,
                "step_time_s": round(elapsed, 4),
            })
            busy = self.straggler.local_vector() if self.straggler is not None else None
            record.update(throughput(cfg, self.model.vocab_size, t.global_batch_size * t.seq_length,
                                     elapsed, self.world_size, also_max=busy))  # gathers busy too
            self._watch_collapse(record)
            if busy is not None:
                self._report_stragglers(record, busy.tolist())
        return record

    def _report_stragglers(self, record: dict, busy: list) -> None:
        record.update(self.straggler.judge(busy))
        for rank in self.straggler.newly_named():
            self.logger.message(
                f"[straggler] step {record['step']}: rank {rank} is slower than the median rank in "
                f"{self.straggler.needed} of the last {self.straggler.intervals} logged intervals (busy "
                f"{busy[rank]:.3f} s per step, median {record['busy_s_median']:.3f} s)")

    def _watch_collapse(self, record: dict) -> None:
        """Warn when a reuse group has been dominated by one expert for several logged steps."""
        run = self.cfg.run
        hot = set(collapsed_groups(record, run.collapse_share))
        self._collapse_streak = {g: self._collapse_streak.get(g, 0) + 1 for g in hot}
        alarmed = sorted(g for g, n in self._collapse_streak.items() if n >= run.collapse_intervals)
        if alarmed:
            record["collapse_alarm"] = alarmed
            shares = ", ".join(f"group {g}: {record['group_max_share'][g]:.0%}" for g in alarmed)
            self.logger.message(f"[collapse] step {record['step']}: one expert takes > "
                                f"{run.collapse_share:.0%} of its group's tokens for "
                                f"{run.collapse_intervals}+ logged steps ({shares})")

    @torch.no_grad()
    def evaluate(self) -> float:
        with self.watchdog.section("eval", self.step):
            return self._evaluate()

    def _evaluate(self) -> float:
        t = self.cfg.train
        self._set_mode(False)
        batches = valid_batches(self.valid_data, micro_batch_size=t.micro_batch_size,
                                num_batches=t.eval_iters, dp_rank=self.dp_rank, dp_size=self.dp_size)
        losses = self.forward_backward(
            forward_step_func=_forward_step,
            data_iterator=self._iterators(batches) if len(self.chunks) > 1 else iter(batches),
            model=self.chunks,
            num_microbatches=len(batches),
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=True,
        )
        self._set_mode(True)
        return self._last_stage_mean(losses)

    def run(self) -> list[dict]:
        t = self.cfg.train
        history: list[dict] = []
        ck = self.cfg.checkpoint
        self.signals.install()  # for the run; the CLI's handlers (handed over) are simply reinstalled
        try:
            if self._stop_before_training():
                return history
            if self.step == 0:  # the untrained model's validation loss: the baseline the curve falls from
                record = {"step": 0, "consumed_samples": 0, "val_loss": self.evaluate()}
                self.logger.log(record)
                history.append(record)
                if self._stop_before_training():
                    return history
            self._set_mode(True)
            while self.step < t.train_iters:
                self._one_step(history)
                if self.checkpoints.save_in_flight is not None:  # completes it once all writes are done
                    with self._saving():
                        self.checkpoints.finalize(blocking=False)
                if self.skipped_steps > ck.max_skipped_steps:
                    self._finish_saves()
                    raise guard.TrainingHalted(
                        f"halted at step {self.step}: {self.skipped_steps} steps skipped for a "
                        f"non-finite loss or grad norm (checkpoint.max_skipped_steps="
                        f"{ck.max_skipped_steps}); last checkpoint: step {self.last_saved_step}")
                if self.stop_reason and self.step < t.train_iters:
                    self.save_checkpoint(blocking=True)
                    self.exit_code = self.signals.exit_code()
                    self.logger.message(f"[checkpoint] stopping at step {self.step} "
                                        f"({self.stop_reason}); exit {self.exit_code}: resume to continue")
                    break
                if (ck.save_interval and self.step % ck.save_interval == 0) or self.signals.agreed_save_due:
                    self.save_checkpoint()  # by steps or by minutes (rank 0's clock), whichever first
            self._finish_saves()  # no exit with a save in flight
            if self._steps_run and not self._steps_updated:
                # nothing trained: saving would record a step count for weights that never moved,
                # and exit 0 would read as success (e.g. a model that is NaN from its first step)
                raise guard.TrainingHalted(
                    f"halted at step {self.step}: all {self._steps_run} steps of this run were skipped "
                    "for a non-finite loss or grad norm; nothing was trained or saved; last checkpoint: "
                    f"step {self.last_saved_step}")
            # the final checkpoint is written unless this process saved this step, or the one on disk
            # is verified to be what it loaded (CheckpointManager.save decides that)
            if self.step >= t.train_iters and self.checkpoints.saved_step != self.step:
                self.save_checkpoint(blocking=True)
        finally:
            self.watchdog.close()
            self.signals.uninstall()
            self.logger.close()
            if self.lock is not None:
                self.lock.release()
        return history

    def _stop_before_training(self) -> bool:
        """A signal that arrived during start-up or the step-0 evaluation: exit 75 as a pre-emption
        does, saving first only if there is a step the disk does not hold. (The time budget is only
        checked after a step: a budget spent by start-up alone must still make progress, or a
        requeued job would loop without ever training.)"""
        signalled, _ = guard.stop_requested(self.signals)
        if not signalled:
            return False
        self.stop_reason = "signal"
        if self.step and self.checkpoints.saved_step != self.step:
            self.save_checkpoint(blocking=True)
        self.exit_code = self.signals.exit_code()
        self.logger.message(f"[checkpoint] stopping before training resumed at step {self.step} "
                            f"({self.stop_reason}); exit {self.exit_code}: run again to continue")
        return True

    def _one_step(self, history: list) -> None:
        t = self.cfg.train
        with self.watchdog.section("step", self.step + 1):
            record = self.train_step()
        if not self._training_timeout_set:  # start-up is over: collectives get the tighter timeout
            set_collective_timeout(self.cfg.resilience.train_timeout_s)
            self._training_timeout_set = True
            self.watchdog.end_start_up()  # later sections get their own budgets (below train_timeout_s)
        if self.step % t.eval_interval == 0 or self.step == t.train_iters:
            record["val_loss"] = self.evaluate()
        if "loss" in record or "val_loss" in record:
            self.logger.log(record)
            history.append(record)
        if "loss" in record:
            self.logger.progress(self.step, {"loss": f"{record['loss']:.3f}",
                                             "tok/s": f"{record['tokens_per_s']:.0f}",
                                             "cand": record["psr_candidates"]})
        if "val_loss" in record:
            self.logger.message(f"step {self.step}: val_loss {record['val_loss']:.4f}")
        if not record.get("update_successful", True):
            self.logger.message(f"[guard] step {self.step} skipped: non-finite loss or grad norm "
                                f"({self.skipped_steps} skipped so far)")


