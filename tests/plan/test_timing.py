"""The step-time model against hand computations: roofline per op, links from the layout, the bubble."""

from __future__ import annotations

import os

import pytest

from rexmoe_train.plan.hardware import get_gpu
from rexmoe_train.plan.records import CollectiveRecord, OpRecord, RankTrace
from rexmoe_train.plan.timing import (
    HOPPER,
    Layout,
    collective_time_s,
    estimate_step_time,
    model_flops_per_step,
    op_class,
    op_time_s,
    wire_bytes,
)
from tests.helpers import script_module, tiny_config

H100 = get_gpu("h100-sxm")
BF16 = "torch.bfloat16"


def test_op_classes_from_traced_names():
    assert op_class("aten.mm.default") == op_class("aten::addmm") == op_class("bmm") == "gemm"
    assert op_class("aten._grouped_mm.default") == "gemm"
    assert op_class("aten._scaled_dot_product_flash_attention.default") == "attention"
    assert op_class("aten._flash_attention_backward") == "attention"
    assert op_class("aten.add.Tensor") == op_class("aten._softmax.default") == "memory"


def test_roofline_per_op_by_hand():
    gemm = OpRecord("aten.mm.default", flops=2 * 4096 ** 3, bytes_moved=3 * 4096 ** 2 * 2, dtype=BF16)
    # compute-bound: 137.4 GFLOP at 0.8 x 989.4 TFLOP/s, plus the 4 us per kernel
    assert op_time_s(gemm, H100, "bf16", HOPPER) == pytest.approx(2 * 4096 ** 3 / (989.4e12 * 0.8) + 4e-6)
    # fp8 run: bf16 GEMMs at the fp8 rate (twice as fast)
    assert op_time_s(gemm, H100, "fp8", HOPPER) == pytest.approx(2 * 4096 ** 3 / (1978.9e12 * 0.8) + 4e-6)
    # memory-bound: 1 GB over 0.9 x 3.35 TB/s
    add = OpRecord("aten.add.Tensor", flops=0, bytes_moved=10 ** 9, dtype=BF16)
    assert op_time_s(add, H100, "bf16", HOPPER) == pytest.approx(1e9 / (3.35e12 * 0.9) + 4e-6)
    # an fp32 GEMM (the router) runs at the plain fp32 rate, fp8 or not
    router = OpRecord("aten.mm.default", flops=10 ** 12, bytes_moved=0, dtype="torch.float32")
    assert op_time_s(router, H100, "fp8", HOPPER) == pytest.approx(1e12 / (66.9e12 * 0.8) + 4e-6)
    # a skinny GEMM is memory-bound: 2*8*4096*4096 FLOPs but 4096*4096*2 bytes of weight
    skinny = OpRecord("mm", flops=2 * 8 * 4096 * 4096, bytes_moved=4096 * 4096 * 2, dtype=BF16)
    assert op_time_s(skinny, H100, "bf16", HOPPER) == pytest.approx(4096 * 4096 * 2 / (3.35e12 * 0.9) + 4e-6)
    assert op_time_s(OpRecord("aten.view", 0, 0, BF16), H100, "bf16", HOPPER) == 0.0
    # fused causal attention: torch's counter gives the full square, the kernel does half, at 0.55
    attn = OpRecord("_scaled_dot_product_flash_attention.default", 10 ** 12, 0, "bfloat16")
    assert op_time_s(attn, H100, "fp8", HOPPER) == pytest.approx(0.5e12 / (989.4e12 * 0.55) + 4e-6)


def test_wire_bytes_of_the_standard_algorithms():
    assert wire_bytes("all_reduce", 1000, 4) == 1500  # 2 (n-1)/n S
    assert wire_bytes("reduce_scatter", 1000, 4) == wire_bytes("all_gather", 1000, 4) == 750
    assert wire_bytes("all_to_all", 800, 8) == 700
    assert wire_bytes("send_recv", 123, 2) == 123
    assert wire_bytes("all_reduce", 1000, 1) == 0
    with pytest.raises(ValueError, match="allowed: all_reduce"):
        wire_bytes("broadcast", 1, 2)


def test_which_groups_fit_one_node():
    # 64 ranks, tp 1, pp 4, ep 8: dp 16 (stride 1: 8 per node), edp 2 (stride 8), pp (stride 16)
    lay = Layout(world_size=64, pp=4, ep=8)
    assert (lay.dp, lay.edp) == (16, 2)
    assert lay.members_per_node("ep", 8, 8) == 8
    assert lay.members_per_node("dp", 16, 8) == 8
    assert lay.members_per_node("edp", 2, 8) == 1
    assert lay.members_per_node("pp", 4, 8) == 1
    # tp 4: dp ranks are 4 apart, two of them per node
    assert Layout(world_size=16, tp=4).members_per_node("dp", 4, 8) == 2
    # tp 2, pp 4 over 64 ranks: model-parallel group = 2 ranks of each stage (16 apart)
    lay = Layout(world_size=64, tp=2, pp=4, ep=8)
    assert lay.group_members("mp") == [0, 1, 16, 17, 32, 33, 48, 49]
    assert lay.members_per_node("mp", 8, 8) == 2
    assert lay.group_members("embd") == [0, 48] and lay.members_per_node("embd", 2, 8) == 1
    assert lay.members_per_node("tp_ep", 8, 8) == 8
    assert lay.members_per_node("unknown", 4, 8) == 4  # taken as contiguous
    with pytest.raises(ValueError, match="world_size=12"):
        Layout(world_size=12, ep=8)


def test_collective_times_by_link():
    lay = Layout(world_size=64, pp=4, ep=8)
    nvl, net = 450e9 * 0.8, 50e9 * 0.85
    # expert all-to-all inside a node: NVLink
    a2a = CollectiveRecord("expert_all_to_all", "ep", 8, 7 * 10 ** 8, 7 * 10 ** 8)
    t, link = collective_time_s(a2a, lay, H100, HOPPER)
    assert link == "nvlink" and t == pytest.approx(7e8 / nvl + 10e-6)
    # expert-dp reduce-scatter, one member per node: all of it over the NIC
    rs = CollectiveRecord("dp_reduce_scatter", "edp", 2, 10 ** 9, 10 ** 9)
    t, link = collective_time_s(rs, lay, H100, HOPPER)
    assert link == "network" and t == pytest.approx(1e9 / net + 25e-6)
    # dp reduce-scatter with 8 members per node: 8 rings share 8 NICs, NVLink is the limit then
    rs = CollectiveRecord("dp_reduce_scatter", "dp", 16, 10 ** 9, 10 ** 9)
    t, _ = collective_time_s(rs, lay, H100, HOPPER)
    assert t == pytest.approx(1e9 * max(1 / (8 * net), 1 / nvl) + 25e-6)
    # all-to-all over 16 ranks, 8 per node: 8/15 of the bytes leave the node
    wide = Layout(world_size=16, ep=16)
    a2a = CollectiveRecord("expert_all_to_all", "ep", 16, 15 * 10 ** 8, 15 * 10 ** 8)
    t, link = collective_time_s(a2a, wide, H100, HOPPER)
    assert link == "network" and t == pytest.approx(max(8e8 / net, 7e8 / nvl) + 25e-6)


def _trace(ranks, gemm_flops, a2a_bytes, dp_bytes):
    ops = [OpRecord("mm", gemm_flops, 0, BF16)]
    colls = [CollectiveRecord("expert_all_to_all", "ep", 8, a2a_bytes, a2a_bytes),
             CollectiveRecord("dp_reduce_scatter", "edp", 2, dp_bytes, dp_bytes)]
    return RankTrace(ranks=ranks, ops=ops, collectives=colls)


def test_step_time_bubble_exposure_and_mfu_by_hand():
    lay = Layout(world_size=32, pp=2, ep=8, num_micro_batches=4)  # edp = 2, on two nodes
    traces = [_trace(list(range(16)), 10 ** 15, 10 ** 9, 4 * 10 ** 9),
              _trace(list(range(16, 32)), 8 * 10 ** 14, 10 ** 9, 4 * 10 ** 9)]
    nvl, net = 450e9 * 0.8, 50e9 * 0.85
    compute0 = 1e15 / (989.4e12 * 0.8) + 4e-6
    a2a = 1e9 / nvl + 10e-6
    dp = 4e9 / net + 25e-6
    in_layer = compute0 + a2a  # stage 0 is the slower one
    step = in_layer * (1 + (2 - 1) / 4) + dp  # 1F1B bubble (pp-1)/m; dp exposed (no overlap)
    est = estimate_step_time(traces, lay, H100, "bf16", model_flops=1e16)
    assert est["step_time_s"] == pytest.approx(step)
    assert est["compute_s"] == pytest.approx(compute0)
    assert est["bubble_s"] == pytest.approx(in_layer / 4)
    assert est["exposed_comm_s"] == pytest.approx(a2a + dp)
    assert est["comm_by_link_s"]["network"] == pytest.approx(dp)
    assert est["mfu"] == pytest.approx(1e16 / (step * 989.4e12 * 32))
    assert est["estimate"] is True and "bubble" in est["assumptions"]["pipeline"]
    # overlapped dp: hidden under one micro-batch of compute (compute0 / 4), the rest exposed
    overlapped = estimate_step_time(traces, Layout(world_size=32, pp=2, ep=8, num_micro_batches=4,
                                                   overlap_dp=True), H100, "bf16", model_flops=1e16)
    assert overlapped["step_time_s"] == pytest.approx(in_layer * 1.25 + max(0.0, dp - compute0 / 4))
    # interleaving shrinks the bubble by vpp
    inter = estimate_step_time(traces, Layout(world_size=32, pp=2, ep=8, num_micro_batches=4, vpp=2),
                               H100, "bf16", model_flops=1e16)
    assert inter["bubble_s"] == pytest.approx(in_layer / 8)


def test_pipeline_sends_and_receives_overlap_on_full_duplex_links():
    lay = Layout(world_size=16, pp=2, ep=8, num_micro_batches=2)  # stages 8 apart: the network
    trace = _trace(list(range(16)), 10 ** 15, 0, 0)
    base = estimate_step_time([trace], lay, H100, "bf16")["per_rank"][0]["in_layer_s"]
    trace.collectives += [CollectiveRecord("pp_send_recv", "pp", 2, 10 ** 9, 0),
                          CollectiveRecord("pp_send_recv", "pp", 2, 0, 10 ** 9)]
    est = estimate_step_time([trace], lay, H100, "bf16")
    one_way = 1e9 / (50e9 * 0.85) + 25e-6
    assert est["per_rank"][0]["comm_by_kind_s"]["pp"] == pytest.approx(one_way)
    assert est["per_rank"][0]["in_layer_s"] - base == pytest.approx(one_way)  # vpp 1: exposed
    assert est["comm_by_link_s"]["network"] == pytest.approx(one_way)


def test_other_collectives_are_paid_after_the_schedule():
    lay = Layout(world_size=16, pp=2, ep=8, num_micro_batches=2)
    trace = _trace(list(range(16)), 10 ** 15, 0, 0)
    base = estimate_step_time([trace], lay, H100, "bf16")["step_time_s"]
    trace.collectives.append(CollectiveRecord("other", "mp", 2, 10 ** 8, 10 ** 8))  # stages 8 apart
    with_norm = estimate_step_time([trace], lay, H100, "bf16")
    # the model-parallel group spans both stages (ranks 0 and 8 of 8 per node): the network, once,
    # not stretched by the bubble
    assert with_norm["step_time_s"] - base == pytest.approx(1e8 / (50e9 * 0.85) + 25e-6)


def test_without_model_flops_the_traced_flops_are_used_and_said():
    lay = Layout(world_size=16, ep=8)
    est = estimate_step_time([_trace(list(range(16)), 10 ** 15, 0, 0)], lay, H100, "bf16")
    assert est["model_flops_per_step"] == 16 * 10 ** 15
    assert "hardware" in est["assumptions"]["mfu"]
    with pytest.raises(ValueError, match="no fp8"):
        estimate_step_time([_trace([0], 1, 0, 0)], Layout(world_size=1), get_gpu("cpu"), "fp8")


def test_layout_and_model_flops_from_a_config():
    cfg = tiny_config(r=2)
    cfg.parallel.expert_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 2
    cfg.train.global_batch_size = 16
    lay = Layout.from_experiment(cfg, 8)
    assert (lay.pp, lay.ep, lay.dp, lay.edp, lay.num_micro_batches) == (2, 2, 4, 2, 2)  # 16 / (2 * 4)
    # core/flops.py by hand for the tiny shape: h 64, 4 heads of 16, 2 kv groups, 4 layers, top-2 of
    # experts 64 wide, r = 2 over 8 experts, seq 32, vocab 320 (padded)
    h, seq, vocab = 64, 32, 320
    qkv, out = 2 * h * (4 + 4) * 16, 2 * 64 * h
    core = 2 * 2 * 4 * 16 * (seq + 1) / 2
    per_token = 4 * (qkv + out + core) + 4 * 2 * 64 * 6 * h + 4 * 2 * h * 2 * 8 + 2 * h * vocab
    assert model_flops_per_step(cfg, vocab) == pytest.approx(3 * per_token * 16 * seq)


def test_bench_mixtral_flops_and_ratio_reported():
    """Megatron's count for Mixtral 8x7B by hand; the bench reports a ratio, whatever it is."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "plan_time_check.py")
    with script_module(path, "plan_time_check") as bench:
        h, L, s = 4096, 32, 4096
        per_token = 12 * L * h * h * ((1 + 8 / 32 + s / h) + 14336 / h * 2 * 1.5 + 32000 / (2 * L * h))
        assert bench.megatron_flops_per_step(bench.MIXTRAL) == pytest.approx(per_token * 256 * s)
        traces = bench.mixtral_traces()
        assert len(traces) == 4 and sorted(r for t in traces for r in t.ranks) == list(range(64))
        # forward GEMM FLOPs of one rank's layer and micro-batch: QKV, out, router, experts (8192 rows)
        fwd = 2 * 4096 * h * 6144 + 2 * 4096 * h * h + 2 * 4096 * h * 8 + 2 * 8192 * h * 3 * 14336
        gemm = sum(op.flops for op in traces[1].ops if op.name in ("mm", "_grouped_mm"))
        assert gemm == 3 * fwd * 8 * 16  # fwd + dgrad + wgrad, 8 layers, 16 micro-batches
        result = bench.mixtral_check("h100-sxm", implied=False)
        assert result["ratio_predicted_over_published"] == pytest.approx(
            result["predicted_tflops_per_gpu"] / 468.0, abs=1e-3)
