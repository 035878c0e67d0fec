"""``rexmoe-train`` with torch's deterministic algorithms on: the GPU check kit's resume sections.

    python bench/gpu_check_train.py KEY=VALUE ...        # the same overrides as rexmoe-train

A resume can only be compared bitwise with the uninterrupted run when both runs compute alike: on a
GPU, atomics (megatron's unpermute scatter-add, the embedding's backward) make float sums depend on
thread order. ``torch.use_deterministic_algorithms`` selects the deterministic kernels (and cuBLAS
needs ``CUBLAS_WORKSPACE_CONFIG``, read when the CUDA context starts); ``warn_only`` lets an op that
has none run anyway with a warning in the section's log, which then names the op if the comparison
fails. Not a training option: it is slower, and training needs no bitwise repeatability.
"""

from __future__ import annotations

import importlib
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from rexmoe_train.cli import train  # first: it sets the OpenMP wait policy before torch loads

    torch = importlib.import_module("torch")
    torch.use_deterministic_algorithms(True, warn_only=True)
    sys.exit(train.main(sys.argv[1:]))
