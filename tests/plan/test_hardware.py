"""The GPU table: the rows the planner needs, their figures against the datasheets, the bad-name error."""

from __future__ import annotations

import pytest

from rexmoe_train.core.flops import peak_tflops
from rexmoe_train.plan.hardware import GPU_NAMES, RESERVE, get_gpu, usable_memory_bytes


def test_rows_the_planner_promises_exist_with_a_source():
    for name in ("h100-sxm", "h200", "b200", "cpu"):
        gpu = get_gpu(name)
        assert gpu.name == name
        assert gpu.memory_bytes > 0 and gpu.hbm_bytes_per_s > 0 and gpu.gpus_per_node >= 1
        assert gpu.peak_bf16_flops > 0 and gpu.nvlink_bytes_per_s > 0 and gpu.network_bytes_per_s > 0
        assert len(gpu.source) > 40  # where the figures come from, in words


def test_unknown_gpu_names_the_allowed_values():
    with pytest.raises(ValueError) as info:
        get_gpu("a100")
    message = str(info.value)
    assert "'a100'" in message
    for name in ("h100-sxm", "h200", "b200", "cpu"):
        assert name in message
    assert set(GPU_NAMES) == {"h100-sxm", "h200", "b200", "cpu"}


@pytest.mark.parametrize("name,device", [("h100-sxm", "NVIDIA H100 80GB HBM3"), ("h200", "NVIDIA H200"),
                                         ("b200", "NVIDIA B200")])
def test_peaks_agree_with_the_trainers_mfu_table(name, device):
    """core/flops.py's table (the trainer's MFU) and this one must not drift apart."""
    gpu = get_gpu(name)
    assert gpu.peak_bf16_flops == pytest.approx(peak_tflops(device, "bf16", None) * 1e12)
    assert gpu.peak_fp8_flops == pytest.approx(peak_tflops(device, "fp8", None) * 1e12)


def test_datasheet_figures_by_hand():
    h100, h200, b200 = get_gpu("h100-sxm"), get_gpu("h200"), get_gpu("b200")
    # sparse datasheet figures halved: 1979 -> 989.5 bf16, 3958 -> 1979 fp8 (TFLOPS)
    assert h100.peak_bf16_flops == pytest.approx(1979e12 / 2, rel=1e-3)
    assert h100.peak_fp8_flops == pytest.approx(3958e12 / 2, rel=1e-3)
    assert b200.peak_bf16_flops == pytest.approx(4.5e15 / 2)
    # NVLink quoted bidirectional (900 GB/s Hopper, 1.8 TB/s Blackwell): one direction is half
    assert h100.nvlink_bytes_per_s == h200.nvlink_bytes_per_s == 900e9 / 2
    assert b200.nvlink_bytes_per_s == 1.8e12 / 2
    # 400 Gb/s InfiniBand NDR per GPU = 50 GB/s
    assert h100.network_bytes_per_s == 400e9 / 8
    assert (h100.hbm_bytes_per_s, h200.hbm_bytes_per_s, b200.hbm_bytes_per_s) == (3.35e12, 4.8e12, 8e12)
    assert h100.memory_bytes == 81559 * 2 ** 20 and h200.memory_bytes == 143771 * 2 ** 20


def test_usable_memory_subtracts_the_stated_reserve():
    h100 = get_gpu("h100-sxm")
    expected = (81559 * 2 ** 20 - 2 * 2 ** 30) * 0.95  # 2 GiB context, 5 % fragmentation
    assert RESERVE.context_bytes == 2 * 2 ** 30 and RESERVE.fragmentation_fraction == 0.05
    assert usable_memory_bytes(h100) == pytest.approx(expected, abs=1)
    assert 73 * 2 ** 30 < usable_memory_bytes(h100) < 74 * 2 ** 30
    assert usable_memory_bytes(get_gpu("cpu")) == get_gpu("cpu").memory_bytes


def test_peak_by_dtype_and_the_bad_ones():
    h100, cpu = get_gpu("h100-sxm"), get_gpu("cpu")
    assert h100.peak_flops("bf16") == h100.peak_flops("fp16") == h100.peak_bf16_flops
    assert h100.peak_flops("fp8") == h100.peak_fp8_flops
    assert h100.peak_flops("fp32") == h100.peak_fp32_flops
    with pytest.raises(ValueError, match="no fp8"):
        cpu.peak_flops("fp8")
    with pytest.raises(ValueError, match="allowed: bf16, fp16, fp8, fp32"):
        h100.peak_flops("int8")
