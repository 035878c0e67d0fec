"""Progressive scaling routing (PSR).

The number of candidates a router may choose from grows with the optimizer step t (spec §3):
N for t <= t_s, ramping to r*N at t_e. Each step, (r*N - N_t) candidates are masked at random.

Which ones (``mask_draw``): ``per_step`` (the paper) draws a fresh random set every optimizer step;
``nested`` draws one random order of the candidates per (seed, layer) for the whole run and masks its
last r*N - N_t, so the available set only grows: a candidate once opened stays open. The per-step
redraw makes a router's preferred candidates vanish at random (at t <= t_s a router keeps only N of
its r*N: its first choice is missing three steps in four at r=4); docs/ablation_tiny.md section 5
measures what that costs.

Both the count and the mask are pure functions of their inputs (step, and (seed, step, layer) for the
mask): every data- and expert-parallel rank and every micro-batch of a step sees the same mask, a
re-run reproduces it, and a resumed run continues it — nothing depends on wall time or a counter that a
restart could reset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

SCHEDULES = ("linear", "stepwise", "cosine", "none")
MASK_DRAWS = ("per_step", "nested")


@dataclass(frozen=True)
class PSRSchedule:
    kind: str
    experts_per_layer: int  # N
    reuse_group_size: int  # r (of the router's group; a partial last group has a smaller r)
    start_step: int  # t_s
    end_step: int  # t_e
    draw: str = "per_step"  # which candidates are masked: MASK_DRAWS (module docstring)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"PSR schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")
        if self.draw not in MASK_DRAWS:
            raise ValueError(f"PSR mask_draw must be one of {', '.join(MASK_DRAWS)}, got {self.draw!r}")
        if self.kind != "none" and self.end_step <= self.start_step:
            raise ValueError(f"PSR end_step ({self.end_step}) must be > start_step ({self.start_step})")

    @property
    def total(self) -> int:
        return self.experts_per_layer * self.reuse_group_size

    def num_candidates(self, step: int) -> int:
        """N_t, the candidates available at optimizer step ``step``.

        linear:   floor((1 + (r-1) x) N) with x = (t - t_s) / (t_e - t_s)   (the paper)
        stepwise: N (1 + floor((r-1) x)): whole layers' worth at a time, r*N at t_e. The paper's
                  stepwise run (128/192/256 at 10k/20k/30k, N=64, r=4) is start_step=0, end_step=30k.
        cosine:   floor((1 + (r-1) (1 - cos(pi x)) / 2) N)
        none:     r*N from the first step (reuse without PSR).
        """
        n, r = self.experts_per_layer, self.reuse_group_size
        if self.kind == "none" or r == 1 or step > self.end_step:
            return n * r
        if step <= self.start_step:
            return n
        span, done = self.end_step - self.start_step, step - self.start_step
        if self.kind == "linear":  # integer arithmetic: exact floor, no float drift
            return n + ((r - 1) * n * done) // span
        if self.kind == "stepwise":
            return n * (1 + ((r - 1) * done) // span)
        x = done / span
        return min(n * r, int(math.floor((1 + (r - 1) * (1 - math.cos(math.pi * x)) / 2) * n)))


def psr_allowed_mask(
    schedule: PSRSchedule,
    step: int,
    seed: int,
    moe_layer: int,
    protect: Optional[range] = None,
) -> torch.Tensor:
    """Bool [r*N]: True where candidate is available at ``step`` for MoE layer ``moe_layer``.

    ``protect`` (the layer's own candidates, for ``protect_local``) are never masked. The masked set is
    drawn from numpy's PCG64 seeded by (seed, step, layer) (``per_step``) or by (seed, layer) (``nested``:
    the last r*N - N_t of one fixed random order of the unprotected candidates): platform-independent
    and identical on every rank without communication.
    """
    total = schedule.total
    allowed = torch.ones(total, dtype=torch.bool)
    num_masked = total - schedule.num_candidates(step)
    if num_masked == 0:
        return allowed
    pool = np.arange(total)
    if protect is not None:
        pool = np.setdiff1d(pool, np.asarray(protect))
    if schedule.draw == "nested":
        order = np.random.default_rng([int(seed), int(moe_layer)]).permutation(pool)
        masked = order[len(order) - num_masked:]
    else:
        rng = np.random.default_rng([int(seed), int(step), int(moe_layer)])
        masked = rng.choice(pool, size=num_masked, replace=False)
    allowed[torch.from_numpy(np.sort(masked))] = False
    return allowed


class PSRState:
    """The step the routers are working on; the trainer sets it before each optimizer step (and
    before evaluation). Shared by all routers of a process, so it is set once."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.step = 1
        self._cache: dict[tuple, torch.Tensor] = {}

    def set_step(self, step: int) -> None:
        if step != self.step:
            self._cache.clear()
        self.step = step

    def allowed(self, schedule: PSRSchedule, moe_layer: int, protect: Optional[range]) -> torch.Tensor:
        key = (schedule, moe_layer, protect)
        if key not in self._cache:
            self._cache[key] = psr_allowed_mask(schedule, self.step, self.seed, moe_layer, protect)
        return self._cache[key]
