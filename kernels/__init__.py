"""Custom kernels for the GPU path, each with a plain-torch reference.

Every public function takes ``impl="auto"|"torch"|"triton"``. ``auto`` runs the Triton kernel only
when ``platform.has_triton_gpu()`` says so, and the torch reference otherwise (CPU, CI). The torch
references are also the test oracles (tests/kernels runs the kernels through the Triton interpreter).
"""

from rexmoe_train.kernels._triton import HAVE_TRITON
from rexmoe_train.kernels.dedup_permute import (
    DedupPermuted,
    dedup_layout,
    dedup_permute,
    dedup_permute_reference,
    dedup_unpermute,
    dedup_unpermute_reference,
    dense_from_topk,
)
from rexmoe_train.kernels.fused_router import RouterOutput, fused_router, fused_router_reference

__all__ = [
    "HAVE_TRITON", "DedupPermuted", "dedup_layout", "dedup_permute", "dedup_permute_reference",
    "dedup_unpermute", "dedup_unpermute_reference", "dense_from_topk", "RouterOutput", "fused_router",
    "fused_router_reference",
]
