"""Why r=4 costs more than r=1 at equal active compute (not a test): the expert MLPs alone.

With reuse, each EP rank holds r times more candidate experts (r*N/ep instead of N/ep) while every
token still picks top-k, so the same rows are spread over r times more experts: r times more GEMMs,
each r times smaller. This times exactly that, on one process, fwd+bwd of the same rows through

  megatron  megatron's SequentialMLP (what ExpertBank is on the local path)
  plain     a bare loop of F.linear per expert with the same weights (no megatron Python around it)
  grouped   GroupedExpertBank's path (model.moe_grouped_gemm): one torch grouped_mm per projection,
            stacking the weights once per call (a bank shares that stack among its group's r layers)
  grouped_prestacked  the same with the weights stacked outside the timed region: the GEMMs alone

for each expert count, so the gap between the counts is the GEMM-size cost and the gap between the
two implementations is megatron's per-expert overhead.

    OMP_NUM_THREADS=1 python bench/expert_gemm_bench.py --experts 8 32 --out expert_gemm.json

Prints a table and writes JSON (median / min ms per implementation and expert count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from rexmoe_train import compat, platform

compat.install()  # before megatron: it binds torch.cuda names at import

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection  # noqa: E402

from rexmoe_train.parallel.state import init_distributed  # noqa: E402


def build_experts(num_experts: int, hidden: int, ffn: int) -> SequentialMLP:
    tc = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4,
                           num_moe_experts=num_experts, moe_ffn_hidden_size=ffn, gated_linear_unit=True,
                           activation_func=F.silu, add_bias_linear=False,
                           **platform.transformer_config_overrides())
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    return SequentialMLP(num_experts, tc, spec.submodules.mlp.submodules.experts.submodules,
                         pg_collection=get_default_pg_collection())


def plain_forward(experts: SequentialMLP, x: torch.Tensor, counts: list[int], probs: torch.Tensor):
    """The same computation as SequentialMLP (SwiGLU, gate applied before fc2) with bare F.linear."""
    outs = []
    for expert, xs, ps in zip(experts.local_experts, torch.split(x, counts), torch.split(probs, counts)):
        a, b = torch.chunk(F.linear(xs, expert.linear_fc1.weight), 2, dim=-1)
        outs.append(F.linear(F.silu(a) * b * ps.unsqueeze(-1), expert.linear_fc2.weight))
    return torch.cat(outs)


def grouped_forward(experts: SequentialMLP, x: torch.Tensor, offs: torch.Tensor, probs: torch.Tensor,
                    stacks: tuple | None = None):
    """GroupedExpertBank's computation (model/experts.py) on the same weights."""
    from rexmoe_train.model.experts import _grouped_linear

    fc1 = [e.linear_fc1.weight for e in experts.local_experts]
    fc2 = [e.linear_fc2.weight for e in experts.local_experts]
    stack1, stack2 = stacks or (None, None)
    a, b = torch.chunk(_grouped_linear(x, fc1, offs, stack1), 2, dim=-1)
    return _grouped_linear(F.silu(a) * b * probs.unsqueeze(-1), fc2, offs, stack2)


def time_fwd_bwd(impls: dict, x: torch.Tensor, iters: int, warmup: int = 2) -> dict[str, list[float]]:
    """Round-robin: one fwd+bwd of each implementation per round, so load on a shared machine hits
    all alike."""
    times = {name: [] for name in impls}
    for i in range(warmup + iters):
        for name, fn in impls.items():
            x.grad = None
            start = time.perf_counter()
            fn().sum().backward()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def run(experts_list: list[int], rows: int, hidden: int, ffn: int, iters: int, seed: int = 0) -> dict:
    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g, requires_grad=True)
    probs = torch.rand(rows, generator=g)
    results = []
    for num in experts_list:
        if rows % num:
            raise SystemExit(f"error: --rows ({rows}) must be divisible by every --experts value ({num})")
        experts = build_experts(num, hidden, ffn)
        counts = [rows // num] * num
        per_expert = torch.tensor(counts)
        offs = per_expert.cumsum(0).to(torch.int32)
        with torch.no_grad():
            stacks = (torch.stack([e.linear_fc1.weight for e in experts.local_experts]),
                      torch.stack([e.linear_fc2.weight for e in experts.local_experts]))
        impls = {"megatron": lambda: experts(x, per_expert, probs)[0],
                 "plain": lambda: plain_forward(experts, x, counts, probs),
                 "grouped": lambda: grouped_forward(experts, x, offs, probs),
                 "grouped_prestacked": lambda: grouped_forward(experts, x, offs, probs, stacks)}
        with torch.no_grad():  # all compute the same thing: guards the comparison itself
            ref = impls["megatron"]()
            max_diff = max((ref - impls[k]()).abs().max().item() for k in impls if k != "megatron")
        for name, ms in time_fwd_bwd(impls, x, iters).items():
            results.append({"experts": num, "rows_per_expert": rows // num, "impl": name,
                            "median_ms": statistics.median(ms), "min_ms": min(ms), "max_abs_diff": max_diff})
    return {"config": {"rows": rows, "hidden": hidden, "ffn": ffn, "iters": iters,
                       "threads": torch.get_num_threads(), "torch": torch.__version__},
            "results": results}


def table(report: dict) -> str:
    base = {r["impl"]: r for r in report["results"] if r["experts"] == report["results"][0]["experts"]}
    lines = ["| experts | rows/expert | impl | median ms | min ms | min vs first count |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        ratio = r["min_ms"] / base[r["impl"]]["min_ms"]
        lines.append(f"| {r['experts']} | {r['rows_per_expert']} | {r['impl']} | {r['median_ms']:.1f} | "
                     f"{r['min_ms']:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32],
                   help="local expert counts to compare (default: 8 32, i.e. r=1 vs r=4 at ep=2, N=16)")
    p.add_argument("--rows", type=int, default=2048, help="token rows (top-k copies) per call")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    report = run(args.experts, args.rows, args.hidden, args.ffn, args.iters)
    print(json.dumps(report))
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
