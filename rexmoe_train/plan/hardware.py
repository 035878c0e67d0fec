"""The hardware the planner targets, kept as data: one row per GPU with the source of every figure.

Rates are dense (no 2:4 sparsity), bytes/s are per GPU and per direction (unidirectional). Where a
vendor quotes NVLink as a bidirectional total (900 GB/s on Hopper, 1.8 TB/s on Blackwell) the row
holds half of it. ``memory_bytes`` is the capacity the driver reports (``nvidia-smi``'s memory.total),
not the marketing "80GB"; what a job can use is that minus ``RESERVE`` (``usable_memory_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GB = 10 ** 9
GIB = 1024 ** 3
MIB = 1024 ** 2
TFLOPS = 10 ** 12


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int  # device memory as the driver reports it
    peak_bf16_flops: float  # dense tensor-core bf16 FLOP/s
    peak_fp8_flops: Optional[float]  # dense fp8 FLOP/s; None where the device has no fp8 path
    peak_fp32_flops: float  # plain fp32 (no tensor cores; torch's default for fp32 matmuls)
    hbm_bytes_per_s: float  # device-memory bandwidth
    nvlink_bytes_per_s: float  # intra-node link, per GPU, one direction
    network_bytes_per_s: float  # inter-node link, per GPU, one direction
    gpus_per_node: int
    source: str  # where the figures come from

    def peak_flops(self, dtype: str) -> float:
        """Dense peak for a GEMM in ``dtype`` ("bf16" | "fp16" | "fp8" | "fp32")."""
        if dtype == "fp8":
            if self.peak_fp8_flops is None:
                raise ValueError(f"gpu {self.name!r} has no fp8 rate; use dtype bf16 or fp32")
            return self.peak_fp8_flops
        if dtype in ("bf16", "fp16"):
            return self.peak_bf16_flops
        if dtype == "fp32":
            return self.peak_fp32_flops
        raise ValueError(f"unknown dtype {dtype!r}; allowed: bf16, fp16, fp8, fp32")


# What a job cannot use on a GPU. The CUDA context with cuBLAS/cuDNN workspaces and the NCCL
# communicators' buffers take about 1-2 GiB before the first tensor (a bare context is ~0.5 GiB on
# Hopper; each NCCL communicator adds tens to hundreds of MiB, and a 3D-parallel rank holds several);
# PyTorch's caching allocator then keeps reserved-but-unallocated blocks, typically a few percent of
# the peak on LLM training (torch.cuda.memory_reserved vs max_memory_allocated).
@dataclass(frozen=True)
class MemoryReserve:
    context_bytes: int = 2 * GIB  # CUDA context + library workspaces + NCCL buffers
    fragmentation_fraction: float = 0.05  # of what is left, lost to the caching allocator


RESERVE = MemoryReserve()

# A CPU "device" for validating the planner against a real step on this machine: one rank on one
# thread (OMP_NUM_THREADS=1), fp32. Figures measured on the development machine (AMD EPYC, 2 cores
# shared with other jobs) on 2026-12-07 by `python bench/plan_time_check.py --cpu-step` (measure_cpu,
# best of 3 rounds, the least disturbed moments): single-thread fp32 matmuls 512^3..2048^3 at
# 82-92 GFLOP/s, a 256 MiB copy at 14 GB/s counting read + write. Under the others' load both fall
# to a half or a quarter. The links are the loopback a gloo run on one machine uses (shared memory
# + TCP; stated, not measured: one rank sends nothing).
_CPU_GEMM = 90e9
_CPU_COPY = 14e9

_TABLE: dict[str, GPUSpec] = {
    "h100-sxm": GPUSpec(
        name="h100-sxm", memory_bytes=81559 * MIB,
        peak_bf16_flops=989.4 * TFLOPS, peak_fp8_flops=1978.9 * TFLOPS, peak_fp32_flops=66.9 * TFLOPS,
        hbm_bytes_per_s=3.35e12, nvlink_bytes_per_s=450 * GB, network_bytes_per_s=50 * GB, gpus_per_node=8,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM5, 2023): bf16 1979 / fp8 3958 TFLOPS with "
               "sparsity (halved here), fp32 67 TFLOPS, HBM3 3.35 TB/s, NVLink 900 GB/s bidirectional; "
               "DGX H100 datasheet (2023): 8 GPUs, one 400 Gb/s ConnectX-7 (InfiniBand NDR) per GPU; "
               "memory 81559 MiB as nvidia-smi reports an H100 80GB HBM3"),
    "h200": GPUSpec(
        name="h200", memory_bytes=143771 * MIB,
        peak_bf16_flops=989.4 * TFLOPS, peak_fp8_flops=1978.9 * TFLOPS, peak_fp32_flops=66.9 * TFLOPS,
        hbm_bytes_per_s=4.8e12, nvlink_bytes_per_s=450 * GB, network_bytes_per_s=50 * GB, gpus_per_node=8,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM, 2024): the H100's tensor rates, 141 GB "
               "HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional; HGX H200 (2024): 8 GPUs, 400 Gb/s "
               "InfiniBand NDR per GPU; memory 143771 MiB as nvidia-smi reports an H200"),
    "b200": GPUSpec(
        name="b200", memory_bytes=183359 * MIB,
        peak_bf16_flops=2250 * TFLOPS, peak_fp8_flops=4500 * TFLOPS, peak_fp32_flops=75 * TFLOPS,
        hbm_bytes_per_s=8e12, nvlink_bytes_per_s=900 * GB, network_bytes_per_s=50 * GB, gpus_per_node=8,
        source="NVIDIA DGX B200 / HGX B200 datasheets (2024), per GPU: bf16 4.5 / fp8 9 PFLOPS with "
               "sparsity (halved here), fp32 75 TFLOPS (600 per 8 GPUs), HBM3e 8 TB/s, NVLink 5 1.8 TB/s "
               "bidirectional, one 400 Gb/s ConnectX-7 per GPU; memory 183359 MiB as nvidia-smi "
               "reports a B200"),
    "cpu": GPUSpec(
        name="cpu", memory_bytes=8 * GIB,
        peak_bf16_flops=_CPU_GEMM, peak_fp8_flops=None, peak_fp32_flops=_CPU_GEMM,
        hbm_bytes_per_s=_CPU_COPY, nvlink_bytes_per_s=_CPU_COPY / 2, network_bytes_per_s=_CPU_COPY / 2,
        gpus_per_node=2,
        source="this development machine (AMD EPYC, 2 shared cores), one thread, measured 2026-12-07 by "
               "bench/plan_time_check.py --cpu-step (best of 3 rounds): fp32 matmul 82-92 GFLOP/s, copy "
               "14 GB/s; bf16 taken as fp32 (not measured), no fp8; memory: the 8 GiB a validation run "
               "may use"),
}

GPU_NAMES = tuple(_TABLE)


def get_gpu(name: str) -> GPUSpec:
    """The row for ``name``; an unknown name is a ValueError naming the allowed values."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"unknown gpu {name!r}; allowed: {', '.join(GPU_NAMES)}") from None


def usable_memory_bytes(gpu: GPUSpec, reserve: MemoryReserve = RESERVE) -> int:
    """What one job's tensors may peak at on ``gpu``: the driver's capacity less the context
    reserve, less the allocator's fragmentation share of the rest."""
    if gpu.name == "cpu":  # no CUDA context, no caching allocator: the stated budget is all usable
        return gpu.memory_bytes
    return usable_of_capacity(gpu.memory_bytes, reserve)


def usable_of_capacity(capacity_bytes: int, reserve: MemoryReserve = RESERVE) -> int:
    """The same for a GPU known only by its capacity (what CUDA reports at start-up)."""
    return int((capacity_bytes - reserve.context_bytes) * (1.0 - reserve.fragmentation_fraction))
