"""The platform layer: one place for CPU/GPU differences."""

from __future__ import annotations

import torch

from rexmoe_train import compat, platform


def test_cpu_answers():
    if platform.HAS_CUDA:
        assert platform.dist_backend() == "nccl" and platform.transformer_config_overrides() == {}
        return
    assert platform.device() == torch.device("cpu")
    assert platform.dist_backend() == "gloo"
    assert platform.default_dtype() == torch.float32
    # gloo swaps activations/grads with batched p2p at pp=2: CPU runs must never use it
    assert platform.transformer_config_overrides()["batch_p2p_comm"] is False


def test_setup_idempotent_and_makes_megatron_cuda_calls_safe(layout):
    from rexmoe_train.config.schema import ParallelConfig

    layout(ParallelConfig())
    compat.install()
    compat.install()
    if platform.HAS_CUDA:
        return
    # what megatron does all over the place
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).to(torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.cuda.current_stream() == torch.cuda.Stream()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # fork really switched and restored state
    assert forked.shape == (3,)


def test_device_context_still_sees_wrapped_factories(megatron_world):
    """transformers builds models under `with torch.device("meta")`; the CPU layer's factory
    wrappers must not let tensors escape that context (it left HF RoPE buffers uninitialised)."""
    with torch.device("meta"):
        assert torch.zeros(2).device.type == "meta"
        assert torch.arange(4).device.type == "meta"
    assert torch.zeros(2, device="cuda" if not platform.HAS_CUDA else "cpu").device.type == "cpu"
