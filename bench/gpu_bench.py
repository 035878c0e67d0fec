"""Single-GPU benchmark (not a test): the paper's 0.5B and 2.3B shapes at reduced depth.

    python bench/gpu_bench.py --out runs/gpu_bench.json

For each model shape x precision (bf16, fp8) x reuse r (1, 4) x dispatcher (megatron's ``alltoall``,
ours ``rexmoe_dedup``): tokens/s, TFLOP/s and MFU of one fwd+bwd micro-batch (no optimizer step),
median over timed iterations after warm-up. The model is built as the Trainer builds it (Float16Module
under bf16, megatron DDP: ``build_like_trainer``) and routes with FORCED BALANCE
(``model.moe_router_force_load_balancing``; ``--natural-routing`` turns it off): the output says
which. Then the custom kernels' effective bandwidth (dedup
permute/unpermute, fused router; Triton vs their torch references) next to a measured device-to-
device copy. Prints a table and writes JSON. Without CUDA it exits with status 2 and one line.
Each case and section records its own failure (a row's ``error``, ``errors[<section>]``: exception
type and first line) and the next one runs; the JSON is rewritten after each, so it exists whatever
fails. Exit status 1 when anything failed, else 0.

FLOPs (``flops_per_token``) are counted honestly for MFU: attention (QKV/out projections + causal
score/value matmuls), the ACTIVE experts only (top-k SwiGLU experts, plus shared experts and dense
MLPs where a shape has them) and the router. Embedding and LM head are excluded from MFU (reported
separately as ``lm_head``), so a reduced-depth run, where the LM head is a larger share of the step
time, understates MFU. Training FLOPs = 3 x forward (backward = 2 x forward). Reuse r changes only
the router (r*N candidates): compute per token is otherwise unchanged, as in the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIGS = {"0.5b": "rexmoe_0.5b", "2.3b": "rexmoe_2.3b"}  # configs/model/<name>.yaml
from rexmoe_train.core.flops import PEAK_TFLOPS, Shape, flops_per_token, peak_tflops  # noqa: E402,F401


def shape_from_config(name: str, layers: Optional[int] = None, vocab: int = 32000) -> Shape:
    """A paper model's shape from its packaged config; ``layers`` overrides the depth."""
    from rexmoe_train.config.compose import compose_experiment

    m = compose_experiment([f"model={MODEL_CONFIGS[name]}"]).experiment.model
    return Shape(name=name, hidden=m.hidden_size, heads=m.num_attention_heads,
                 kv_heads=m.num_query_groups or m.num_attention_heads,
                 layers=layers or m.num_layers, experts=m.num_moe_experts, topk=m.moe_router_topk,
                 moe_ffn=m.moe_ffn_hidden_size, shared_ffn=m.moe_shared_expert_intermediate_size or 0,
                 dense_layers=m.first_k_dense_layers,
                 dense_ffn=m.ffn_hidden_size or 4 * m.hidden_size, vocab=vocab)


# --------------------------------------------------------------------------------------------------
# GPU measurements
# --------------------------------------------------------------------------------------------------
def _cuda_time(fn, warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``fn``, one CUDA-event pair per call."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _config(shape: Shape, reuse: int, precision: str, dispatcher: str, args):
    from rexmoe_train.config.compose import compose_experiment
    from rexmoe_train.config.schema import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.model = compose_experiment([f"model={MODEL_CONFIGS[shape.name]}"]).experiment.model
    cfg.model.num_layers = shape.layers
    cfg.rexmoe.reuse_group_size = reuse
    cfg.rexmoe.psr.schedule = "none"  # steady state: every router sees all r*N candidates
    # forced balance (benchmark only): random router logits, so the time does not depend on how an
    # untrained router happens to route (an unlucky layer can send most tokens to one expert)
    cfg.model.moe_router_force_load_balancing = not args.natural_routing
    cfg.train.seq_length, cfg.train.micro_batch_size = args.seq, args.micro_batch
    cfg.train.global_batch_size = args.micro_batch
    cfg.train.bf16 = True
    cfg.train.fp8 = "hybrid" if precision == "fp8" else None
    cfg.parallel.expert_model_parallel_size = 1
    cfg.parallel.moe_token_dispatcher_type = dispatcher
    return cfg.validate(1)


def build_like_trainer(cfg, vocab: int):
    """The model as the Trainer builds it (training/trainer.py): build_model, then
    ``wrap_for_training`` (megatron's Float16Module under bf16, so norms, embeddings and the router's
    input are bf16 and the fused paths run, then megatron DDP with its fp32 main-grad buffers)."""
    from rexmoe_train.model.gpt import build_model
    from rexmoe_train.training.optim import wrap_for_training

    built = build_model(cfg, vocab)
    return wrap_for_training(cfg, built.chunks, built.config)[0]


def bench_model(shape: Shape, reuse: int, precision: str, dispatcher: str, args) -> dict:
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

    from rexmoe_train import compat, platform

    cfg = _config(shape, reuse, precision, dispatcher, args)
    model = build_like_trainer(cfg, shape.vocab)
    dev = platform.device()
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, shape.vocab, (args.micro_batch, args.seq), device=dev, generator=gen)
    pos = torch.arange(args.seq, device=dev).unsqueeze(0).expand(args.micro_batch, -1)

    def step() -> None:
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0, device=dev)
        model(x, pos, None, labels=x).float().mean().backward()
        model.zero_grad_buffer()
        clear_aux_losses_tracker()

    times = _cuda_time(step, args.warmup, args.iters)
    median = statistics.median(times)
    tokens = args.micro_batch * args.seq
    flops = flops_per_token(shape, reuse, args.seq)
    tflops = flops["train"] * tokens / median / 1e12
    peak = peak_tflops(platform.device_name(), precision, args.peak_tflops)
    row = {"model": shape.name, "layers": shape.layers, "r": reuse, "precision": precision,
           "dispatcher": dispatcher, "transformer_impl": cfg.model.resolved_transformer_impl(),
           "median_s": median, "times_s": times, "tokens_per_s": tokens / median,
           "tflops": tflops, "mfu": tflops / peak if peak else None,
           "tflops_incl_lm_head": 3 * (flops["counted"] + flops["lm_head"]) * tokens / median / 1e12,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    model = None  # drop the last reference (step() closes over it) before emptying the cache
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    compat.reset_megatron_global_state()
    return row


def bench_kernels(args) -> list[dict]:
    """Effective bandwidth (bytes the op must move / time) of each kernel and of a plain copy."""
    import torch

    from rexmoe_train import platform
    from rexmoe_train.kernels.dedup_permute import dedup_permute, dedup_unpermute
    from rexmoe_train.kernels.fused_router import fused_router

    dev, dt = platform.device(), torch.bfloat16
    tokens, hidden, ep, cands, topk = args.kernel_tokens, 512, 8, 256, 8  # 2.3B, r=4, EP 8 layout
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(tokens, cands, device=dev, generator=gen)
    top = logits.topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, cands, dtype=torch.bool, device=dev).scatter(1, top, True)
    probs = torch.softmax(logits, dim=-1) * routing_map
    hidden_states = torch.randn(tokens, hidden, device=dev, dtype=dt, generator=gen)
    width = min(topk, cands // ep)
    rows = dedup_permute(hidden_states, routing_map, probs, ep, width, impl="torch")
    num_rows, s = rows.rows.shape[0], hidden_states.element_size()
    src = torch.empty(num_rows * hidden, device=dev, dtype=dt)
    dst = torch.empty_like(src)
    results = []

    def record(name: str, impl: str, nbytes: int, fn) -> None:
        median = statistics.median(_cuda_time(fn, args.warmup, args.iters))
        results.append({"kernel": name, "impl": impl, "bytes": nbytes, "median_s": median,
                        "gb_per_s": nbytes / median / 1e9})

    record("copy (reference bandwidth)", "torch", 2 * src.numel() * s, lambda: dst.copy_(src))
    permute_bytes = 2 * num_rows * hidden * s + tokens * cands * 5 + num_rows * (width * 12 + 8)
    unpermute_bytes = num_rows * hidden * s + tokens * hidden * s + tokens * ep * 8
    router_bytes = tokens * cands * 4 + tokens * topk * 8 * 2
    for impl in ("torch", "triton"):
        record("dedup_permute", impl, permute_bytes,
               lambda i=impl: dedup_permute(hidden_states, routing_map, probs, ep, width, impl=i))
        record("dedup_unpermute", impl, unpermute_bytes,
               lambda i=impl: dedup_unpermute(rows.rows, rows.row_of, impl=i))
        record("fused_router (sparse outputs)", impl, router_bytes,
               lambda i=impl: fused_router(logits, topk, None, dense=False, impl=i))
    copy_bw = results[0]["gb_per_s"]
    for row in results:
        row["fraction_of_copy"] = row["gb_per_s"] / copy_bw
    return results


def routing_note(args) -> str:
    if args.natural_routing:
        return "routing: natural (the untrained routers' own choice; load depends on the init)"
    return ("routing: FORCED BALANCE (model.moe_router_force_load_balancing: random router logits, "
            "k candidates per token uniformly among the available ones; benchmark only)")


def print_tables(rows: list[dict], kernels: list[dict]) -> None:
    print(f"{'model':<6}{'L':>4}{'r':>3} {'prec':<6}{'dispatcher':<14}{'impl':<20}{'tok/s':>10}"
          f"{'TFLOP/s':>9}{'MFU':>7}{'GiB':>7}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        if "error" in r:
            print(f"{r['model']:<6}{r['layers']:>4}{r['r']:>3} {r['precision']:<6}{r['dispatcher']:<14}"
                  f"  skipped: {r['error']}")
            continue
        print(f"{r['model']:<6}{r['layers']:>4}{r['r']:>3} {r['precision']:<6}{r['dispatcher']:<14}"
              f"{r['transformer_impl']:<20}{r['tokens_per_s']:>10.0f}{r['tflops']:>9.1f}{mfu:>7}"
              f"{r['peak_memory_gib']:>7.1f}")
    if kernels:
        print(f"\n{'kernel':<32}{'impl':<8}{'GB/s':>9}{'of copy':>9}")
        for k in kernels:
            print(f"{k['kernel']:<32}{k['impl']:<8}{k['gb_per_s']:>9.0f}{100 * k['fraction_of_copy']:>8.0f}%")


def error_line(exc: BaseException) -> str:
    """One line for the JSON: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _free_device() -> None:
    """After a failed case: drop what it left on the GPU and megatron's global state."""
    import gc

    import torch

    from rexmoe_train import compat

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    compat.reset_megatron_global_state()


def collect(cases: list[dict], measure_case, sections: dict, out: str, head: dict,
            cleanup=_free_device) -> dict:
    """Run every case and section; each failure is recorded (``error``) and the next one runs.

    ``measure_case(case) -> row``; ``sections``: name -> zero-argument function whose result is stored
    under that name (a failure stores ``<name>_error``). The JSON at ``out`` is rewritten after every
    case and section, so it exists whatever fails later, and also if the process is killed."""
    result = {**head, "models": [], "errors": dict(head.get("errors", {}))}

    def write() -> None:
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    for case in cases:
        try:
            row = measure_case(case)
        except Exception as exc:  # noqa: BLE001 - every failure is a row of the result, not the end
            row = {**case, "error": error_line(exc)}
            try:
                cleanup()
            except Exception as err:  # noqa: BLE001
                result["errors"].setdefault("cleanup", error_line(err))
        result["models"].append(row)
        print_tables([row], [])
        write()
    for name, fn in sections.items():
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001
            result[name] = []
            result["errors"][name] = error_line(exc)
            print(f"{name}: failed: {result['errors'][name]}")
        write()
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="0.5b,2.3b", help="comma list of: " + ",".join(MODEL_CONFIGS))
    parser.add_argument("--layers", type=int, default=4,
                        help="depth of every shape (reduced to fit one GPU; must be a multiple of r)")
    parser.add_argument("--reuse", default="1,4", help="comma list of reuse group sizes r")
    parser.add_argument("--precisions", default="bf16,fp8", help="comma list of: bf16, fp8")
    parser.add_argument("--dispatchers", default="alltoall,rexmoe_dedup",
                        help="comma list: alltoall (megatron's), rexmoe_dedup (ours, if available)")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length (the paper: 4096)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--kernel-tokens", type=int, default=32768, help="tokens for the kernel part")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel bandwidth part")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOP/s for MFU (default: by device name, bf16 or fp8)")
    parser.add_argument("--natural-routing", action="store_true",
                        help="route with the (untrained) router weights instead of forced balance")
    parser.add_argument("--out", default="gpu_bench.json", help="JSON results path")
    args = parser.parse_args(argv)

    sys.path.insert(0, REPO)
    from rexmoe_train import platform  # the one module that knows whether a GPU exists

    if not platform.HAS_CUDA:
        print("gpu_bench: no CUDA GPU on this machine; nothing measured (run it on a GPU host)",
              file=sys.stderr)
        return 2
    from rexmoe_train import compat

    compat.install()
    from rexmoe_train.parallel.state import init_distributed, init_model_parallel

    names = args.models.split(",")
    head = {"device": platform.device_name(), "args": vars(args), "routing": routing_note(args)}
    print(head["routing"])
    cases = [{"model": name, "layers": args.layers, "r": int(reuse), "precision": precision,
              "dispatcher": dispatcher}
             for name in names for precision in args.precisions.split(",")
             for reuse in args.reuse.split(",") for dispatcher in args.dispatchers.split(",")]
    shapes: dict = {}

    def measure_case(case: dict) -> dict:
        # a bad case (fp8 without TE, an fp8 shape validate() refuses, a CUDA error) is this row's error
        if case["model"] not in shapes:
            shapes[case["model"]] = shape_from_config(case["model"], args.layers)
        shape = shapes[case["model"]]
        init_model_parallel(_config(shape, case["r"], case["precision"], case["dispatcher"], args).parallel, 1234)
        return bench_model(shape, case["r"], case["precision"], case["dispatcher"], args)

    sections = {
        "shapes": lambda: {n: asdict(shape_from_config(n, args.layers)) for n in names},
        "flops_per_token": lambda: {f"{n}-r{r}": flops_per_token(shape_from_config(n, args.layers), int(r), args.seq)
                                    for n in names for r in args.reuse.split(",")},
    }
    if not args.no_kernels:
        sections = {"kernels": lambda: bench_kernels(args), **sections}
    try:
        init_distributed()
    except Exception as exc:  # noqa: BLE001 - still write what this run is and why nothing ran
        head["errors"] = {"init": error_line(exc)}
        cases, sections = [], {}
    result = collect(cases, measure_case, sections, args.out, head)
    print()
    print(head["routing"])
    print_tables(result["models"], result.get("kernels") or [])
    print(f"wrote {args.out}")
    failed = bool(result["errors"]) or any("error" in row for row in result["models"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
