"""Step-time ESTIMATE for a named GPU from the traced operations and collectives of each rank.

Compute: a roofline per traced op, max(FLOPs / (peak x efficiency), bytes / (HBM x efficiency)) plus a
fixed per-kernel cost, summed over the rank's ops. Communication: each collective's wire bytes over
the link its group crosses (NVLink inside a node, the network between nodes: decided from the layout
and ``gpus_per_node``), plus a per-call latency. The pipeline adds a bubble. It is an estimate: no
kernel is run, nothing is timed; its check against a published figure is in docs/planning.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Optional

from rexmoe_train.plan.hardware import GPUSpec
from rexmoe_train.plan.records import CollectiveRecord, OpRecord, RankTrace


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks a step's kernels reach, and fixed per-call costs."""

    gemm: float  # matrix products (mm, bmm, addmm, grouped mm, ...)
    attention: float  # fused attention kernels (flash / cuDNN / memory-efficient)
    memory: float  # HBM bandwidth of memory-bound kernels
    nvlink: float  # NCCL bus bandwidth over NVLink / one-direction link rate
    network: float  # NCCL bus bandwidth over InfiniBand / NIC rate
    kernel_overhead_s: float  # added to every op that does work: launch, ramp-up and tail
    latency_intra_s: float  # per collective call inside a node
    latency_inter_s: float  # per collective call across nodes
    why: str


# Hopper: on the H100 and H200 machines lent to this project (.library/device/KINDS.md, 2026-10/11) an
# 8192^3 bf16 matmul ran at 769-798 TFLOP/s = 0.78-0.81 of 989.4, and a device-to-device copy moved
# 3.0 TB/s (H100, 0.90 of 3.35) and 4.3 TB/s (H200, 0.90 of 4.8). Fused attention (cuDNN / FA3 class,
# what TE uses) reaches ~0.75 of peak forward and ~0.45-0.55 backward on H100 (FlashAttention-3
# paper, 2024): 0.55 over a step. NCCL all-reduce bus bandwidth on 8 x H100 NVLink is ~360 GB/s of the
# 450 GB/s link (0.8); NDR InfiniBand reaches ~85 % of 400 Gb/s. Latencies: NCCL small-message
# times of ~10 us in a node and ~25 us across nodes. Per-kernel cost: ~4 us of launch + ramp + tail
# per kernel of an eager (not CUDA-graphed) step. Smaller GEMMs reach less than the 8192^3 rate,
# which one constant does not model: the compute estimate leans optimistic for narrow models.
HOPPER = Efficiency(gemm=0.80, attention=0.55, memory=0.90, nvlink=0.80, network=0.85,
                    kernel_overhead_s=4e-6, latency_intra_s=10e-6, latency_inter_s=25e-6,
                    why="measured ceilings on the lent H100/H200 (8192^3 bf16 GEMM 0.8 of peak, copy 0.9 "
                        "of HBM), FA3-class attention 0.55, NCCL NVLink 0.8 / InfiniBand 0.85")
# Blackwell: not measured here; the Hopper fractions are assumed.
BLACKWELL = Efficiency(**{**asdict(HOPPER), "why": "Hopper's fractions, assumed (no B200 measured)"})
# CPU: hardware.py's cpu row holds rates measured as achieved (not datasheet peaks), so the fractions
# are 1; a bare torch op dispatch measured 3.3 us, 10 us adds autograd's bookkeeping per op.
CPU = Efficiency(gemm=1.0, attention=1.0, memory=1.0, nvlink=1.0, network=1.0,
                 kernel_overhead_s=10e-6, latency_intra_s=100e-6, latency_inter_s=100e-6,
                 why="cpu row rates are measured achieved rates (fractions 1); 10 us per eager op")
EFFICIENCY = {"h100-sxm": HOPPER, "h200": HOPPER, "b200": BLACKWELL, "cpu": CPU}

# Fused attention kernels on a causal mask skip the masked upper half of the score matrix; torch's
# flop counter (the records' FLOPs) counts all of it. Every model here is a causal GPT.
CAUSAL_EXECUTED_SHARE = 0.5

_GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_grouped_mm",
             "_scaled_mm", "_scaled_grouped_mm", "convolution", "convolution_backward"}


@dataclass(frozen=True)
class Layout:
    """The parallel layout the estimate assumes (megatron's rank order: tp fastest, then dp, then pp
    for dense groups; etp, ep, edp, pp for expert groups)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1  # model chunks per pipeline rank (1: no interleaving)
    num_micro_batches: int = 1  # per data-parallel rank and step
    overlap_dp: bool = False  # the project's DDP runs overlap_grad_reduce=False (training/optim.py)

    def __post_init__(self):
        for name in ("tp", "pp", "ep", "etp", "vpp", "num_micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name} must be >= 1, got {getattr(self, name)}")
        if self.world_size % (self.tp * self.pp) or self.world_size % (self.etp * self.ep * self.pp):
            raise ValueError(f"Layout.world_size={self.world_size} is not divisible by tp*pp "
                             f"({self.tp * self.pp}) and etp*ep*pp ({self.etp * self.ep * self.pp})")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    @classmethod
    def from_experiment(cls, cfg, world_size: int) -> Layout:
        p, t = cfg.parallel, cfg.train
        dp = cfg.data_parallel_size(world_size)
        return cls(world_size=world_size, tp=p.tensor_model_parallel_size,
                   pp=p.pipeline_model_parallel_size, ep=p.expert_model_parallel_size,
                   etp=p.expert_tensor_parallel_size, vpp=p.virtual_pipeline_model_parallel_size or 1,
                   num_micro_batches=t.global_batch_size // (t.micro_batch_size * dp))

    def group_members(self, group: str) -> list[int]:
        """The ranks of rank 0's group named as the simulator names megatron's groups (recorder.py):
        tp, etp, ep, tp_ep (expert tp x ep), dp, edp, pp, mp (tp x pp), embd (first and last stage),
        world. Unknown names: []."""
        stage = self.world_size // self.pp
        members = {
            "tp": range(self.tp), "etp": range(self.etp), "tp_ep": range(self.etp * self.ep),
            "ep": range(0, self.etp * self.ep, self.etp), "dp": range(0, self.tp * self.dp, self.tp),
            "edp": range(0, stage, self.etp * self.ep), "pp": range(0, self.world_size, stage),
            "mp": [t + p * stage for p in range(self.pp) for t in range(self.tp)],
            "embd": sorted({0, (self.pp - 1) * stage}), "world": range(self.world_size),
        }
        return list(members.get(group, []))

    def members_per_node(self, group: str, size: int, gpus_per_node: int) -> int:
        """How many of the group's members share a node (== size: the group fits one node). Megatron's
        groups are regular, so rank 0's node tells; a group the layout does not name (or whose size
        disagrees with it) is taken as ``size`` contiguous ranks."""
        ranks = self.group_members(group)
        if len(ranks) != size:
            ranks = list(range(size))
        return max(1, sum(1 for r in ranks if r < gpus_per_node))


def _normalise(name: str) -> str:
    base = name.split("::")[-1]
    base = base[5:] if base.startswith("aten.") else base
    return base.split(".")[0]


def op_class(name: str) -> str:
    """"gemm" | "attention" | "memory" for a traced op name ("aten.mm.default", "aten::bmm", ...)."""
    base = _normalise(name)
    if "attention" in base or "flash" in base:
        return "attention"
    return "gemm" if base in _GEMM_OPS else "memory"


def _dtype_name(dtype: str) -> str:
    d = dtype.lower()
    if "float8" in d or d == "fp8":
        return "fp8"
    if "bfloat16" in d or d == "bf16":
        return "bf16"
    if "float16" in d or "half" in d or d == "fp16":
        return "fp16"
    return "fp32"


def op_time_s(op: OpRecord, gpu: GPUSpec, dtype: str, eff: Efficiency) -> float:
    """Roofline time of one op. GEMMs and attention run at the rate of the op's own dtype, except
    that ``dtype="fp8"`` runs bf16/fp16 GEMMs at the fp8 rate (TE's fp8 recipes cast the linear
    layers' GEMMs, while attention and fp32 GEMMs such as the router keep their dtype). A fused
    attention op executes CAUSAL_EXECUTED_SHARE of its counted (full-square) FLOPs."""
    if op.flops <= 0 and op.bytes_moved <= 0:
        return 0.0  # views, metadata: no kernel
    kind = op_class(op.name)
    own = _dtype_name(op.dtype)
    if kind == "memory":
        compute = op.flops / gpu.peak_fp32_flops  # CUDA-core arithmetic, if any is counted
    else:
        rate = own
        if kind == "gemm" and dtype == "fp8" and own in ("bf16", "fp16"):
            rate = "fp8"
        if kind == "gemm":
            compute = op.flops / (gpu.peak_flops(rate) * eff.gemm)
        else:
            compute = op.flops * CAUSAL_EXECUTED_SHARE / (gpu.peak_flops(rate) * eff.attention)
    memory = op.bytes_moved / (gpu.hbm_bytes_per_s * eff.memory)
    return max(compute, memory) + eff.kernel_overhead_s


# Collective cost models (per rank; ``wire`` = max(bytes_sent, bytes_received) as the record holds
# them, i.e. what the standard algorithm puts on this rank's links, see ``wire_bytes``):
#   ring reduce-scatter / all-gather of an S-byte buffer over n ranks: (n-1)/n * S per rank;
#   ring all-reduce: 2 (n-1)/n * S per rank (a reduce-scatter then an all-gather);
#   all-to-all: the (n-1)/n of its buffer a rank sends to the others; p2p: the tensor.
# Inside one node a collective runs at the NVLink rate. A ring spanning nodes with k members per node
# runs k rings, each crossing nodes through another GPU's NIC (NCCL's rail-aligned rings): every
# rank's NVLink carries the wire bytes and its NIC 1/k of them, so time = wire * max(1/(k*net), 1/nvl).
# An all-to-all spanning nodes sends (n-k)/(n-1) of its bytes off the node through the rank's own
# NIC and the rest over NVLink, concurrently: time = max(off-node / net, on-node / nvl).
def wire_bytes(op: str, buffer_bytes: int, group_size: int) -> int:
    """What one rank sends (= receives) for a collective ``op`` on an S-byte buffer, standard algorithm
    ("all_reduce" | "reduce_scatter" | "all_gather" (S = the full, gathered buffer) | "all_to_all" |
    "send_recv"): the convention CollectiveRecord.bytes_sent / bytes_received follow."""
    n = group_size
    if n <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (n - 1) * buffer_bytes // n
    if op in ("reduce_scatter", "all_gather", "all_to_all"):
        return (n - 1) * buffer_bytes // n
    if op == "send_recv":
        return buffer_bytes
    raise ValueError(f"unknown collective {op!r}; allowed: all_reduce, reduce_scatter, all_gather, "
                     f"all_to_all, send_recv")


def collective_time_s(rec: CollectiveRecord, layout: Layout, gpu: GPUSpec, eff: Efficiency) -> tuple[float, str]:
    """(seconds, "nvlink" | "network" | "none") for one collective of one rank."""
    wire = max(rec.bytes_sent, rec.bytes_received)
    if rec.group_size <= 1 or wire <= 0:
        return 0.0, "none"
    nvl = gpu.nvlink_bytes_per_s * eff.nvlink
    net = gpu.network_bytes_per_s * eff.network
    k = layout.members_per_node(rec.group, rec.group_size, gpu.gpus_per_node)
    n = rec.group_size
    if k >= n:
        return wire / nvl + eff.latency_intra_s, "nvlink"
    if "all_to_all" in rec.kind:
        off = wire * (n - k) / (n - 1)
        return max(off / net, (wire - off) / nvl) + eff.latency_inter_s, "network"
    return wire * max(1.0 / (k * net), 1.0 / nvl) + eff.latency_inter_s, "network"


def _comm_class(kind: str) -> str:
    if kind.startswith("dp_") or kind.startswith("edp_"):
        return "dp"
    if kind == "pp_send_recv":
        return "pp"
    if kind.startswith("expert_"):
        return "expert"
    return "tp" if kind == "tp" else "other"


def model_flops_per_step(cfg, padded_vocab: int) -> float:
    """Model FLOPs of one step over all ranks, as the trainer's MFU counts them (core/flops.py: attention,
    the k active experts, the router and the LM head; 3 x forward)."""
    from rexmoe_train.core.flops import flops_per_token, shape_from_experiment

    per_token = flops_per_token(shape_from_experiment(cfg, padded_vocab), cfg.rexmoe.reuse_group_size,
                                cfg.train.seq_length)
    return 3.0 * (per_token["counted"] + per_token["lm_head"]) * cfg.train.global_batch_size * cfg.train.seq_length


def estimate_step_time(traces: Sequence[RankTrace], layout: Layout, gpu: GPUSpec, dtype: str = "bf16",
                       model_flops: Optional[float] = None,
                       efficiency: Optional[Efficiency] = None) -> dict:
    """Step-time estimate of one training step from every distinct rank's trace (each trace's ops and
    collectives cover the whole step: all micro-batches, the gradient reduction, the optimizer).

    Critical path: the slowest rank's micro-batch work (its compute plus the collectives inside the
    layers: expert all-to-all, tensor parallel, exposed pipeline p2p) stretched by the pipeline bubble
    (pp-1)/(m*vpp) of 1F1B (interleaved when vpp > 1), then the data-parallel gradient reduction and
    parameter gather. ``model_flops``: the step's model FLOPs over all ranks for the MFU
    (``model_flops_per_step``); None falls back to the traced GEMM/attention FLOPs (then a hardware
    utilisation, said in ``assumptions``)."""
    if not traces:
        raise ValueError("estimate_step_time needs at least one RankTrace")
    eff = efficiency or EFFICIENCY.get(gpu.name, HOPPER)
    gpu.peak_flops(dtype)  # an unknown dtype, or fp8 on a device without it, fails here
    m, bubble_fraction = layout.num_micro_batches, 0.0
    if layout.pp > 1:
        bubble_fraction = (layout.pp - 1) / (m * layout.vpp)
    per_rank = []
    memo: dict[tuple, float] = {}  # a step repeats the same op shapes layer after layer
    for trace in traces:
        compute = 0.0
        for op in trace.ops:
            key = (op.name, op.flops, op.bytes_moved, op.dtype)
            if key not in memo:
                memo[key] = op_time_s(op, gpu, dtype, eff)
            compute += memo[key]
        by_class = {"expert": 0.0, "tp": 0.0, "pp": 0.0, "dp": 0.0, "other": 0.0}
        by_link = {"nvlink": 0.0, "network": 0.0}
        # p2p: a stage's sends and receives run at once over full-duplex links (megatron batches
        # send-forward with recv-backward): the busier direction is the time
        p2p = {"out": 0.0, "in": 0.0}
        p2p_link = "none"
        for rec in trace.collectives:
            if rec.kind == "pp_send_recv":
                for direction, one_way in (("out", replace(rec, bytes_received=0)),
                                           ("in", replace(rec, bytes_sent=0))):
                    t, link = collective_time_s(one_way, layout, gpu, eff)
                    p2p[direction] += t
                    p2p_link = link if link != "none" else p2p_link
                continue
            t, link = collective_time_s(rec, layout, gpu, eff)
            by_class[_comm_class(rec.kind)] += t
            if link != "none":
                by_link[link] += t
        by_class["pp"] = max(p2p.values())
        if p2p_link != "none":
            by_link[p2p_link] += by_class["pp"]
        # Exposure. Expert all-to-all and TP collectives sit between the layer's kernels on the compute
        # stream (no --overlap-moe-expert-parallel-comm, no TP comm overlap): exposed. Pipeline p2p is
        # exposed without interleaving; megatron overlaps it with compute when vpp > 1 except where
        # the pipeline fills and drains, taken as the bubble's share. DP: exposed when the DDP does not
        # overlap; with overlap_dp, the reduce-scatter hides under the last micro-batch's backward and
        # the all-gather under the first one's forward: one micro-batch of compute, at most.
        pp_exposed = by_class["pp"] * (1.0 if layout.vpp == 1 else bubble_fraction)
        in_layer = compute + by_class["expert"] + by_class["tp"] + pp_exposed
        after = by_class["dp"]
        if layout.overlap_dp:
            after = max(0.0, by_class["dp"] - compute / m)
        after += by_class["other"]  # grad-norm / embedding syncs and the like: after the schedule
        per_rank.append({"ranks": list(trace.ranks), "compute_s": compute, "comm_s": sum(by_class.values()),
                         "comm_by_kind_s": by_class, "comm_by_link_s": by_link,
                         "in_layer_s": in_layer, "after_schedule_s": after,
                         "exposed_comm_s": in_layer - compute + after})
    slowest = max(per_rank, key=lambda r: r["in_layer_s"])
    pipeline = slowest["in_layer_s"] * (1.0 + bubble_fraction)
    step = pipeline + max(r["after_schedule_s"] for r in per_rank)
    world_peak = gpu.peak_flops(dtype) * layout.world_size
    label = "mfu"
    if model_flops is None:  # traced FLOPs of the distinct ranks, weighted by the ranks each stands for
        model_flops = sum(sum(op.flops for op in t.ops if op_class(op.name) != "memory") * len(t.ranks)
                          for t in traces)
        label = "hardware FLOPs utilisation (traced GEMM/attention FLOPs; no model_flops given)"
    comm_by_link = {k: max(r["comm_by_link_s"][k] for r in per_rank) for k in ("nvlink", "network")}
    return {
        "estimate": True,
        "gpu": gpu.name,
        "dtype": dtype,
        "step_time_s": step,
        "compute_s": max(r["compute_s"] for r in per_rank),
        "comm_s": max(r["comm_s"] for r in per_rank),
        "comm_by_link_s": comm_by_link,
        "exposed_comm_s": step - pipeline + slowest["in_layer_s"] - slowest["compute_s"],
        "bubble_s": pipeline - slowest["in_layer_s"],
        "mfu": model_flops / (step * world_peak),
        "model_flops_per_step": model_flops,
        "per_rank": per_rank,
        "assumptions": {
            "kind": "estimate: roofline per traced op + link-bandwidth collectives; nothing was timed",
            "efficiency": asdict(eff),
            "peak": f"{dtype} dense peak of {gpu.name}: {gpu.peak_flops(dtype):.3g} FLOP/s per device",
            "mfu": label,
            "pipeline": f"1F1B bubble (pp-1)/(m*vpp) = ({layout.pp}-1)/({m}*{layout.vpp}) = "
                        f"{bubble_fraction:.4f} of the slowest stage's micro-batch work",
            "overlap": "expert all-to-all and TP collectives exposed; pp p2p exposed unless vpp > 1 "
                       "(then the bubble's share); dp " + ("overlapped with one micro-batch's compute"
                                                          if layout.overlap_dp else "exposed (no overlap)")
                       + "; other collectives (grad norm, embedding sync) exposed after the schedule",
            "links": f"{gpu.gpus_per_node} GPUs per node; a group whose ranks fit one node uses NVLink, "
                     f"else the network (megatron's rank order)",
            "layout": asdict(layout),
        },
    }
