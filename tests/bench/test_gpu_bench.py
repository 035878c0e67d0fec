"""bench/gpu_bench.py on CPU: its FLOP count, its config reading, --help and the no-GPU exit."""

from __future__ import annotations

import os

import pytest

from rexmoe_train import platform
from tests.helpers import script_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu_bench.py")


@pytest.fixture(scope="module")
def gpu_bench():
    with script_module(_PATH, "gpu_bench") as module:
        yield module


def test_flops_of_the_paper_2_3b_shape(gpu_bench):
    shape = gpu_bench.shape_from_config("2.3b")
    assert (shape.hidden, shape.layers, shape.experts, shape.topk, shape.moe_ffn) == (512, 32, 64, 8, 744)
    f = gpu_bench.flops_per_token(shape, reuse=4, seq=4096)
    # per layer: QKV 2*512*(16+2*2)*32, out 2*512*512, causal core 2*2*512*(4096+1)/2
    assert f["attention"] == 32 * (655_360 + 524_288 + 4_195_328)
    assert f["experts"] == 32 * 8 * 744 * 3 * 2 * 512  # top-8 SwiGLU experts only, not all 64
    assert f["router"] == 32 * 2 * 512 * 4 * 64  # r*N candidates
    assert f["counted"] == f["attention"] + f["experts"] + f["router"]
    assert f["train"] == 3 * f["counted"] and "lm_head" in f


@pytest.mark.parametrize("name, active", [("2.3b", 0.3e9), ("0.5b", 0.07e9)])
def test_matmul_flops_match_the_papers_active_parameters(gpu_bench, name, active):
    """2 FLOPs per active parameter per token (minus the attention core): the 'A0.3B'/'A0.07B'."""
    shape = gpu_bench.shape_from_config(name)
    f = gpu_bench.flops_per_token(shape, reuse=1, seq=1)
    core = shape.layers * 2 * 2 * shape.hidden * 1
    assert 0.9 * active < (f["counted"] - core) / 2 < 1.2 * active


def test_reuse_only_changes_the_router(gpu_bench):
    shape = gpu_bench.shape_from_config("0.5b", layers=4)
    one, four = (gpu_bench.flops_per_token(shape, reuse=r, seq=512) for r in (1, 4))
    assert one["attention"] == four["attention"] and one["experts"] == four["experts"]
    assert four["router"] - one["router"] == 4 * 2 * 768 * 3 * 32


def test_peak_lookup(gpu_bench):
    assert gpu_bench.peak_tflops("NVIDIA H100 80GB HBM3", "bf16", None) == 989.4
    assert gpu_bench.peak_tflops("NVIDIA H100 80GB HBM3", "fp8", None) == 1978.9
    assert gpu_bench.peak_tflops("cpu", "bf16", None) is None
    assert gpu_bench.peak_tflops("cpu", "bf16", 100.0) == 100.0


def test_help_and_no_gpu_exit(gpu_bench, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_bench.main(["--help"])
    assert exc.value.code == 0 and "MFU" in capsys.readouterr().out
    if platform.HAS_CUDA:
        pytest.skip("CUDA present: main() would run the benchmark")
    assert gpu_bench.main(["--models", "0.5b"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_failing_case_or_section_is_recorded_and_the_json_is_always_written(gpu_bench, tmp_path, capsys):
    """main()'s own loop (collect) with stand-in measurements: the fp8 row raises as TE's cuBLASLt
    check did, the kernel section raises; the other rows and sections still run and the JSON holds all."""
    import json

    out = tmp_path / "bench.json"
    cases = [{"model": "2.3b", "layers": 4, "r": r, "precision": p, "dispatcher": "alltoall"}
             for p in ("bf16", "fp8") for r in (1, 4)]
    cleaned, seen_on_disk = [], []

    def measure(case):
        if out.exists():  # rewritten after every row: a killed run keeps what it measured
            seen_on_disk.append(len(json.loads(out.read_text())["models"]))
        if case["precision"] == "fp8":
            raise RuntimeError("Leading dimension requirement on A for FP8 GEMM. Caller must pad.\nmore")
        return {**case, "transformer_impl": "local", "tokens_per_s": 1000.0 * case["r"], "tflops": 1.0,
                "mfu": 0.1, "peak_memory_gib": 1.0}

    def kernels():
        raise ValueError("no triton")

    result = gpu_bench.collect(cases, measure, {"kernels": kernels, "shapes": lambda: {"2.3b": 1}},
                               str(out), {"device": "test"}, cleanup=lambda: cleaned.append(1))
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result, default=str))
    rows = on_disk["models"]
    assert [("error" in r) for r in rows] == [False, False, True, True]
    assert rows[2]["error"] == "RuntimeError: Leading dimension requirement on A for FP8 GEMM. Caller must pad."
    assert rows[1]["tokens_per_s"] == 4000.0 and len(cleaned) == 2
    assert on_disk["errors"] == {"kernels": "ValueError: no triton"} and on_disk["kernels"] == []
    assert on_disk["shapes"] == {"2.3b": 1} and on_disk["device"] == "test"
    assert seen_on_disk == [1, 2, 3]
    assert "skipped: RuntimeError" in capsys.readouterr().out


def test_the_bench_builds_its_model_as_the_trainer_does(gpu_bench, layout, tmp_path):
    """Issue 29 item 5: the timed model is the Trainer's (Float16Module under bf16, megatron DDP), not
    the bare fp32-norm chunk: same wrapper chain, same parameter dtypes as the real Trainer's chunk."""
    import torch
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    from tests.helpers import make_trainer, tiny_config

    cfg = tiny_config(r=4, layers=4)
    cfg.train.bf16, cfg.run.dir, cfg.run.progress = True, str(tmp_path / "run"), False
    trainer_chunk = make_trainer(cfg).chunks[0]
    layout(cfg.parallel)
    bench_chunk = gpu_bench.build_like_trainer(cfg, trainer_chunk.module.module.vocab_size)

    def chain(chunk):
        return [type(chunk), type(chunk.module), type(chunk.module.module)]

    assert chain(bench_chunk) == chain(trainer_chunk)
    assert chain(bench_chunk)[:2] == [DistributedDataParallel, Float16Module]
    dtypes = {n: p.dtype for n, p in bench_chunk.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in trainer_chunk.named_parameters()}
    norms = [n for n in dtypes if "layernorm" in n or "final_norm" in n]
    assert norms and all(dtypes[n] == torch.bfloat16 for n in norms), norms
    assert dtypes["module.module.embedding.word_embeddings.weight"] == torch.bfloat16


def test_the_bench_forces_balanced_routing_and_says_so(gpu_bench):
    import argparse

    from rexmoe_train.model.gpt import transformer_config

    shape = gpu_bench.shape_from_config("0.5b", layers=4)
    args = argparse.Namespace(seq=128, micro_batch=1, natural_routing=False)
    cfg = gpu_bench._config(shape, 4, "bf16", "alltoall", args)
    assert cfg.model.moe_router_force_load_balancing
    assert transformer_config(cfg).moe_router_force_load_balancing  # reaches megatron's routers
    assert "FORCED BALANCE" in gpu_bench.routing_note(args)
    args.natural_routing = True
    assert not gpu_bench._config(shape, 4, "bf16", "alltoall", args).model.moe_router_force_load_balancing
    assert "natural" in gpu_bench.routing_note(args)
