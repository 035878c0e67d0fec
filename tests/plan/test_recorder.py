"""StepRecorder: each collective's kind, group and wire bytes, and each op's FLOPs and bytes, from a
real dispatch under torch's fake process group (a subprocess: it owns the default group)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from rexmoe_train.plan.recorder import _kind, _wire_bytes

SCRIPT = textwrap.dedent("""
    import json, torch, torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from rexmoe_train.plan.recorder import StepRecorder
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    ep = dist.new_group([0, 1, 2, 3])
    dp = dist.new_group([0, 1])
    labels = {ep.group_name: ("ep", 4), dp.group_name: ("dp", 2)}
    rec = StepRecorder(labels)
    with FakeTensorMode(), rec:
        x = torch.empty(10, 8)  # rows of 32 bytes
        dist.all_to_all_single(torch.empty(7, 8), x, [1, 2, 3, 1], [4, 3, 2, 1], group=ep)
        rec.phase = "step"
        dist.all_reduce(torch.empty(100), group=dp)
        dist.reduce_scatter_tensor(torch.empty(50), torch.empty(100), group=dp)
        torch.mm(torch.empty(4, 5), torch.empty(5, 6))
    out = {"mb": [c.__dict__ for c in rec.collectives["microbatch"]],
           "step": [c.__dict__ for c in rec.collectives["step"]],
           "ops": [o.__dict__ for o in rec.ops["step"] if o.name.startswith("mm")]}
    print(json.dumps(out))
""")


def test_recorded_collectives_and_ops():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    [a2a] = out["mb"]
    # group rank 1 keeps input split 3 rows and receives output split 2 rows from itself
    assert a2a == {"kind": "expert_all_to_all", "group": "ep", "group_size": 4,
                   "bytes_sent": (10 - 3) * 32, "bytes_received": (7 - 2) * 32}
    allreduce, reduce_scatter = out["step"]
    assert allreduce["kind"] == "dp_all_reduce" and allreduce["bytes_sent"] == 400  # 2 (n-1)/n * 400
    assert reduce_scatter["kind"] == "dp_reduce_scatter" and reduce_scatter["bytes_sent"] == 200
    [mm] = out["ops"]
    assert mm["flops"] == 2 * 4 * 5 * 6 and mm["bytes_moved"] == 4 * (20 + 30 + 24)


def test_kinds_follow_group_and_op():
    assert _kind("alltoall_base", "ep") == "expert_all_to_all"
    assert _kind("_allgather_base", "tp_ep") == "expert_all_gather"
    assert _kind("send", "pp") == "pp_send_recv" and _kind("recv", "pp") == "pp_send_recv"
    assert _kind("reduce_scatter_tensor_coalesced", "edp") == "dp_reduce_scatter"
    assert _kind("allgather_into_tensor_coalesced", "dp") == "dp_all_gather"
    assert _kind("allreduce", "tp") == "tp"
    assert _kind("allreduce", "world") == "other"


def test_ring_bytes():
    t = torch.empty(1000, dtype=torch.uint8)
    assert _wire_bytes("allreduce", [[t]], 4, 0) == (1500, 1500)
    assert _wire_bytes("send", [[t]], 2, 0) == (1000, 0)
    assert _wire_bytes("recv", [[t]], 2, 1) == (0, 1000)
