"""The megatron-core CPU compatibility layer: installed explicitly, every target checked, the
supported megatron-core range enforced in one line."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import types

import pytest

from rexmoe_train import compat, platform
from rexmoe_train.compat import megatron_cpu

# Every attribute the layer replaces on CPU, in install order. A change to this list is a change to
# what the project does to torch and megatron process-wide: make it here on purpose, with a reason in
# megatron_cpu.py.
FACTORIES = ["tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "eye", "empty_strided", "zeros_like", "ones_like", "empty_like",
             "full_like", "rand_like", "randn_like"]
# What the layer replaces with CUDA too (megatron defects that are not about the CPU).
EXPECTED_ANY_DEVICE_TARGETS = ["megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__"]
EXPECTED_CPU_TARGETS = [
    "torch.compile",
    *(f"torch.cuda.{name}" for name in (
        "current_device", "set_device", "device_count", "synchronize", "empty_cache", "Stream",
        "ExternalStream", "Event", "current_stream", "default_stream", "stream", "set_stream",
        "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "memory_allocated",
        "max_memory_allocated", "memory_reserved", "max_memory_reserved", "reset_peak_memory_stats",
        "memory_stats")),
    "torch.cuda.nvtx.range_push", "torch.cuda.nvtx.range_pop", "torch.cuda.nvtx.range",
    "torch.Tensor.cuda", "torch.nn.modules.module.Module.cuda", "torch.Tensor.pin_memory",
    "torch.Tensor.record_stream",
    *(f"torch.{name}" for name in FACTORIES),
    "torch.Tensor.to", *(f"torch.Tensor.{n}" for n in ("new_zeros", "new_ones", "new_empty", "new_full",
                                                         "new_tensor")),
    "torch.Tensor.type",
    "torch.distributed.all_gather", "torch.distributed.reduce_scatter",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu",
    "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
    "megatron.core.pipeline_parallel.p2p_communication._batched_p2p_ops",
    *EXPECTED_ANY_DEVICE_TARGETS,
]


@pytest.mark.skipif(platform.HAS_CUDA, reason="with CUDA the layer replaces nothing")
def test_every_patched_target_is_listed():
    compat.install()  # the conftest did; idempotent
    assert compat.installed()
    assert compat.patched_targets() == EXPECTED_CPU_TARGETS
    compat.install()
    assert compat.patched_targets() == EXPECTED_CPU_TARGETS  # idempotent: nothing patched twice


@pytest.mark.skipif(platform.HAS_CUDA, reason="with CUDA torch.compile is left alone")
def test_megatron_fusions_are_eager():
    """torch.compile is eager on CPU: megatron's jit_fuser helpers are the plain functions (no
    inductor build on first call, no torch._dynamo import for them) and compute the same values."""
    import torch
    from megatron.core import jit
    from megatron.core.fusions import fused_bias_swiglu

    compat.install()
    assert jit.jit_fuser(len) is len
    assert isinstance(fused_bias_swiglu.bias_swiglu, types.FunctionType)
    x = torch.randn(4, 6)
    a, b = x.chunk(2, -1)
    assert torch.equal(fused_bias_swiglu.bias_swiglu(x, torch.zeros(6)), torch.nn.functional.silu(a) * b)


def test_a_missing_target_is_refused_not_created():
    owner = types.SimpleNamespace(present=1)
    owner.__name__ = "fake.module"
    with pytest.raises(compat.CompatError, match=r"fake\.module\.renamed does not exist"):
        megatron_cpu._replace(owner, "renamed", lambda: None)
    assert not hasattr(owner, "renamed")


@pytest.mark.parametrize("version, ok", [("0.16.1", True), ("0.16.9rc1", True), ("0.16.0", False),
                                         ("0.17.0", False), ("0.15.3", False), ("1.0.0", False)])
def test_supported_megatron_range(version, ok):
    if ok:
        assert compat.check_megatron_version(version) == version
    else:
        with pytest.raises(compat.CompatError) as err:
            compat.check_megatron_version(version)
        message = str(err.value)
        assert "\n" not in message and version in message and ">=0.16.1,<0.17" in message


def test_the_installed_megatron_is_in_range():
    assert compat.check_megatron_version() == importlib.metadata.version("megatron-core")


def test_install_outside_the_range_is_one_line(tmp_path):
    """A fake megatron-core 0.17 distribution first on the path: install() refuses before patching."""
    dist = tmp_path / "megatron_core-0.17.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-core\nVersion: 0.17.0\n")
    code = (f"import sys, torch\nsys.path.insert(0, {str(tmp_path)!r})\nfrom rexmoe_train import compat\n"
            "zeros = torch.zeros\ntry:\n    compat.install()\nexcept compat.CompatError as e:\n"
            "    print(e)\nassert torch.zeros is zeros and not compat.installed()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ("megatron-core 0.17.0 is not supported: rexmoe-train needs >=0.16.1,<0.17 "
                                   "(pip install 'megatron-core>=0.16.1,<0.17')")


def test_install_with_cuda_keeps_the_megatron_fixes_gpus_need():
    """install()'s CUDA branch, in a process that reports a GPU (torch.cuda.is_available patched
    before rexmoe_train.platform reads it; set_device is the one CUDA call the branch makes): torch is
    left alone, but megatron's TE-less MoE NameError (te_general_gemm) and the torch norm's refusal of
    sequence parallelism (on whenever tp > 1) are fixed as on CPU. A LOCAL_RANK without a GPU is one
    line, before anything is installed."""
    code = """
import os, types, torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
selected = []
torch.cuda.set_device = selected.append
from rexmoe_train import compat, platform
assert platform.HAS_CUDA
zeros, to = torch.zeros, torch.Tensor.to
os.environ["LOCAL_RANK"] = "2"  # more processes than GPUs: one line, nothing installed
try:
    compat.install()
    raise SystemExit("LOCAL_RANK beyond the GPUs was accepted")
except compat.CompatError as err:
    assert str(err).startswith("LOCAL_RANK=2 but this process sees 2 GPU(s)") and chr(10) not in str(err), err
assert not compat.installed() and not selected
os.environ["LOCAL_RANK"] = "0"
compat.install()
assert selected == [torch.device("cuda", 0)], selected
assert torch.zeros is zeros and torch.Tensor.to is to, "CUDA branch patched torch"
assert compat.patched_targets() == EXPECTED_TARGETS, compat.patched_targets()
from megatron.core.transformer.moe import moe_utils
if not moe_utils.HAVE_TE:
    assert moe_utils.te_general_gemm is None  # megatron's router gating reads it unconditionally
from megatron.core.transformer.torch_norm import WrappedTorchNorm
config = types.SimpleNamespace(normalization="RMSNorm", sequence_parallel=True, persist_layer_norm=False,
                               memory_efficient_layer_norm=False, layernorm_zero_centered_gamma=False)
norm = WrappedTorchNorm(config, 8)
assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel
print("ok")
""".replace("EXPECTED_TARGETS", repr(EXPECTED_ANY_DEVICE_TARGETS))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_no_cuda_runtime_log_line_is_silenced_without_a_gpu(tmp_path):
    """A CUDA toolkit without a GPU (CUDA_HOME set, as on a CUDA build of torch with nvcc on PATH):
    torch.utils.cpp_extension, which megatron imports, logs "No CUDA runtime is found" once per process,
    a stray second line after a one-line error. The layer filters exactly that record."""
    code = (
        "from rexmoe_train import compat\n"
        "compat.install()\n"
        "import torch.utils.cpp_extension as ext\n"
        "ext._find_cuda_home()  # what a CUDA build of torch runs when megatron imports the module\n"
        "import logging\n"
        "logging.getLogger('torch.utils.cpp_extension').warning('another warning stays')\n"
    )
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No CUDA runtime is found" not in proc.stderr
    assert "another warning stays" in proc.stderr
