"""RankTrace: traffic summed by kind, the JSON summary."""

from __future__ import annotations

import json

from rexmoe_train.plan.records import CollectiveRecord, OpRecord, RankTrace, to_dict


def test_traffic_by_kind_sums_each_kind():
    trace = RankTrace(ranks=[0, 1], collectives=[
        CollectiveRecord("expert_all_to_all", "ep", 8, 100, 90),
        CollectiveRecord("expert_all_to_all", "ep", 8, 10, 20),
        CollectiveRecord("dp_all_reduce", "dp", 2, 7, 7)])
    assert trace.traffic_by_kind() == {"expert_all_to_all": {"sent": 110, "received": 110},
                                       "dp_all_reduce": {"sent": 7, "received": 7}}


def test_summary_is_json_and_counts_flops():
    trace = RankTrace(ranks=[3], ops=[OpRecord("mm", 10, 4, "float32"), OpRecord("add", 0, 12, "float32")],
                      peak_bytes=5, by_category={"activations": 5}, meta={"wall_s": 1.0})
    summary = json.loads(json.dumps(trace.summary()))
    assert summary["flops"] == 10 and summary["peak_bytes"] == 5 and summary["meta"]["wall_s"] == 1.0
    assert to_dict(trace.ops[0]) == {"name": "mm", "flops": 10, "bytes_moved": 4, "dtype": "float32"}
