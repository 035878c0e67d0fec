"""What a simulated step records for one rank: its operations, its collectives, its memory.

The simulator (``plan.simulate``) fills these; the step-time model (``plan.timing``) reads them.
Plain dataclasses, torch-free, so both sides and the JSON output share one shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# collective kinds the simulator names (anything else keeps torch's op name)
COLLECTIVE_KINDS = (
    "expert_all_to_all", "expert_all_gather", "dp_reduce_scatter", "dp_all_gather", "dp_all_reduce",
    "tp", "pp_send_recv", "other",
)


@dataclass
class OpRecord:
    """One aten op of the traced step on one rank: FLOPs and bytes (inputs read + outputs written)."""

    name: str
    flops: int
    bytes_moved: int
    dtype: str


@dataclass
class CollectiveRecord:
    """One collective (or p2p) call as this rank issued it; bytes as this rank sends / receives."""

    kind: str  # one of COLLECTIVE_KINDS
    group: str  # "ep" | "dp" | "edp" | "tp" | "pp" | "world" | ...
    group_size: int
    bytes_sent: int
    bytes_received: int


@dataclass
class RankTrace:
    """One simulated rank and the ranks it stands for (identical by construction)."""

    ranks: list[int]
    ops: list[OpRecord] = field(default_factory=list)
    collectives: list[CollectiveRecord] = field(default_factory=list)
    peak_bytes: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    # the activations at the peak by the module that allocated them (simulate.module_label), largest first
    activations_by_module: dict[str, int] = field(default_factory=dict)
    # how it was simulated: micro-batches (step / simulated), wall seconds, stand-in host reads
    meta: dict = field(default_factory=dict)

    def traffic_by_kind(self) -> dict[str, dict[str, int]]:
        """{kind: {"sent": bytes, "received": bytes}} summed over this rank's collectives."""
        out: dict[str, dict[str, int]] = {}
        for c in self.collectives:
            slot = out.setdefault(c.kind, {"sent": 0, "received": 0})
            slot["sent"] += c.bytes_sent
            slot["received"] += c.bytes_received
        return out

    def total_flops(self) -> int:
        return sum(op.flops for op in self.ops)

    def summary(self) -> dict:
        """JSON-ready summary (no per-op list)."""
        return {"ranks": list(self.ranks), "peak_bytes": int(self.peak_bytes),
                "by_category": dict(self.by_category), "activations_by_module": dict(self.activations_by_module),
                "traffic": self.traffic_by_kind(),
                "flops": self.total_flops(), **({"meta": dict(self.meta)} if self.meta else {})}


def to_dict(record) -> dict:
    return asdict(record)
