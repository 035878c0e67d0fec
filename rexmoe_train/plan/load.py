"""Synthetic routing loads: what decides the MoE shapes of a simulated step.

Fake tensors carry no values, so the token counts each expert receives (and with them the
all-to-all split sizes, the permutation buffers and the expert GEMM shapes) come from a stated load,
never from an unwritten buffer. Pure numpy: tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOAD_KINDS = ("balanced", "imbalanced")


@dataclass(frozen=True)
class RoutingLoad:
    """``balanced``: every available candidate receives tokens*k / N_t assignments (each source rank
    alike). ``imbalanced``: the hottest candidate receives ``hot_factor`` times that mean (capped at
    one pick per token), from every source rank, and sits on the simulated rank (its worst case);
    the other candidates share the rest evenly."""

    kind: str = "balanced"
    hot_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LOAD_KINDS:
            raise ValueError(f"load={self.kind!r}: must be one of {', '.join(LOAD_KINDS)}")
        if self.kind == "imbalanced" and self.hot_factor < 1.0:
            raise ValueError(f"hot_factor={self.hot_factor}: must be >= 1")

    def describe(self) -> str:
        if self.kind == "balanced":
            return "balanced: every available candidate gets tokens*k/N_t assignments from every source rank"
        return (f"imbalanced: the hottest candidate gets {self.hot_factor:g}x the mean from every source "
                "rank and is held by the simulated rank; the rest share the remainder evenly")


def capacity(tokens: int, topk: int, available: int, factor: float) -> int:
    """megatron's rule ceil(C * tokens * k / candidates), over the available candidates (router.py)."""
    return math.ceil(factor * tokens * topk / available)


def column_counts(tokens: int, topk: int, available: np.ndarray, load: RoutingLoad,
                  hot_column: int = 0, capacity_factor: float | None = None) -> np.ndarray:
    """Assignments one source rank sends each physical column (int64 [E]); masked columns get 0.

    ``available``: bool [E] in physical order; ``hot_column``: the column the imbalanced load heats
    (moved to the first available column at or after it)."""
    available = np.asarray(available, dtype=bool)
    cols = np.flatnonzero(available)
    n = len(cols)
    if n == 0:
        raise ValueError("no available candidate")
    total = tokens * min(topk, n)
    counts = np.zeros(len(available), dtype=np.int64)
    if load.kind == "balanced" or n == 1:
        counts[cols] = total // n
        counts[cols[: total % n]] += 1
    else:
        later = cols[cols >= hot_column]
        hot = int(later[0]) if len(later) else int(cols[0])
        hot_count = min(tokens, round(load.hot_factor * total / n))
        rest = [c for c in cols if c != hot]
        remaining = total - hot_count
        counts[rest] = remaining // len(rest)
        counts[rest[: remaining % len(rest)]] += 1
        counts[hot] = hot_count
        np.minimum(counts, tokens, out=counts)  # one pick per token and column
    if capacity_factor is not None:
        np.minimum(counts, capacity(tokens, topk, n, capacity_factor), out=counts)
    return counts


def routing_map(tokens: int, counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """A bool [tokens, E] map whose column j holds counts[j] distinct tokens drawn uniformly (seeded),
    so a token's picks fall on unrelated columns."""
    rng = np.random.default_rng(seed)
    out = np.zeros((tokens, len(counts)), dtype=bool)
    for j, c in enumerate(counts):
        if c:
            out[rng.permutation(tokens)[: int(c)], j] = True
    return out


def rows_per_rank(route_map: np.ndarray, ep_size: int) -> np.ndarray:
    """Distinct tokens with at least one pick on each EP rank's columns (what rexmoe_dedup sends)."""
    tokens, columns = route_map.shape
    per_rank = route_map.reshape(tokens, ep_size, columns // ep_size).any(axis=2)
    return per_rank.sum(axis=0).astype(np.int64)
