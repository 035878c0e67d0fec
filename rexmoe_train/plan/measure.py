"""The independent reference the planner is checked against: the same config run for real on CPU
tensors (one process, gloo, world size 1), its memory read from the operating system.

``python -m rexmoe_train.plan.measure OUT OVERRIDES...`` builds the model, DDP and optimizer with
the project's code and runs two real training steps on random tokens (the second step has Adam's
moments, as the planner's simulated step does). It writes the peak resident-set growth over the
process's resident set before the model was built (the kernel's peak mark, VmHWM, reset there;
glibc is told to map every large block separately and return it on free, so the resident set
follows the live tensors).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence

# every allocation over 64 KiB is its own mapping, unmapped on free: RSS follows live tensor bytes
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_in_subprocess(overrides: Sequence[str], fused_attention: bool = False,
                          timeout_s: float = 900) -> dict:
    """Run the real step in a fresh process; {"peak_growth_bytes", "baseline_bytes", ...}."""
    with tempfile.TemporaryDirectory(prefix="rexmoe-measure-") as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1"}
        fused = ["--fused-attention"] if fused_attention else []
        args = [sys.executable, "-m", "rexmoe_train.plan.measure", out, *fused, *overrides]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"real step failed (exit {proc.returncode}): {tail[0]}")
        with open(out) as f:
            return json.load(f)


def _real_step(overrides: Sequence[str], fused_attention: bool) -> dict:
    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.model.gpt import build_model
    from rexmoe_train.parallel.state import init_distributed, init_model_parallel
    from rexmoe_train.plan.fake_env import _fused_core_attention
    from rexmoe_train.plan.simulate import BYTE_VOCAB
    from rexmoe_train.training.metrics import init_aux_loss_tracker
    from rexmoe_train.training.optim import build_optimizer, wrap_for_training
    from rexmoe_train.training.trainer import _forward_step

    cfg = compose_experiment(list(overrides)).experiment
    cfg.train.bf16 = False
    init_distributed()
    cfg.validate(1)
    init_model_parallel(cfg.parallel, cfg.train.seed)
    if fused_attention:  # the planner's --spec te emulation, run for real
        from megatron.core.transformer import dot_product_attention

        dot_product_attention.DotProductAttention.forward = _fused_core_attention
    t = cfg.train
    vocab = cfg.model.vocab_size or BYTE_VOCAB
    generator = torch.Generator().manual_seed(0)
    nmb = t.global_batch_size // t.micro_batch_size

    def batch():
        tokens = torch.randint(0, vocab, (t.micro_batch_size, t.seq_length), generator=generator)
        return {"tokens": tokens, "position_ids": torch.arange(t.seq_length).expand_as(tokens).contiguous(),
                "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(tokens.shape)}

    batches = [[batch() for _ in range(nmb)] for _ in range(2)]
    baseline = _rss_bytes()
    reset = _reset_peak_rss()
    model = build_model(cfg, vocab)
    tc = model.config
    chunks = wrap_for_training(cfg, model.chunks, tc)
    optimizer, _ = build_optimizer(cfg, chunks, tc)
    tc.finalize_model_grads_func = finalize_model_grads
    tc.no_sync_func = chunks[0].no_sync
    init_aux_loss_tracker(cfg.model.num_layers)
    losses = []
    for step_batches in batches:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(step_batches), model=chunks,
            num_microbatches=nmb, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
            forward_only=False)
        optimizer.step()
        losses.append(float(sum(float(d["lm loss"]) for d in out) / len(out)))
    peak = _peak_rss_bytes()
    return {"peak_growth_bytes": peak - baseline, "baseline_bytes": baseline, "peak_rss_bytes": peak,
            "peak_mark_reset": reset, "losses": losses, "micro_batches": nmb}


def main(argv: Sequence[str]) -> int:
    out, *rest = argv
    fused = "--fused-attention" in rest
    overrides = [a for a in rest if a != "--fused-attention"]
    from rexmoe_train import compat

    compat.install()
    result = _real_step(overrides, fused)
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
