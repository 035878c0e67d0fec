"""tests/devicecheck/nccl_semantics.py: collectives that return before they complete (NCCL), and the
straggler report under them (resilience/straggler.py).

One launch of 2 processes (torchrun, gloo) under the harness (``python -m
tests.devicecheck.test_nccl_semantics OUT_DIR``), rank 1 slowed in compute. It checks the model's
promises (the call returns at once, the result is there at the next sync, events time the device), then
runs the same steps with collectives synchronous (gloo) and queued (NCCL), each timed by the host clock
(the report's CPU behaviour, and all it had before) and by the device clock. Under NCCL the host clock
names nobody (the harness hides what NCCL hides); the device clock must name rank 1 in both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLOW_RANK, SLEEP_S, LAYERS, STEPS_PER_INTERVAL, INTERVALS = 1, 0.08, 3, 2, 3


def _promises(rank: int) -> dict:
    """What the model promises, measured on rank 0 while rank 1 arrives 0.4 s late."""
    import torch
    import torch.distributed as dist

    from tests.devicecheck import nccl_semantics as ns

    out = {}
    a = torch.full((4,), float(rank + 1), device="cuda")
    start_event = torch.cuda.Event(enable_timing=True)
    end_event = torch.cuda.Event(enable_timing=True)
    if rank == SLOW_RANK:
        time.sleep(0.4)
    start = time.perf_counter()
    start_event.record()
    dist.all_reduce(a)
    end_event.record()
    out["call_s"] = time.perf_counter() - start
    try:
        start_event.elapsed_time(end_event)
        out["elapsed_before_sync"] = "read"
    except RuntimeError:
        out["elapsed_before_sync"] = "refused"
    out["values"] = a.tolist()  # the sync point: the wait lands here
    out["to_sync_s"] = time.perf_counter() - start
    out["event_ms"] = start_event.elapsed_time(end_event)
    b = torch.ones(2, device="cuda")
    work = dist.all_reduce(b, async_op=True)
    work.wait()
    out["async_op_values"] = b.tolist()
    c = torch.ones(3, device="cuda")
    dist.all_reduce(c)
    out["next_op_reads_the_result"] = (c * 2).sum().item()  # an op on the buffer waits for it
    out["stats"] = dict(ns.STATS)
    return out


def _steps(rank: int, world: int, reports: list) -> list[list[dict]]:
    """INTERVALS logged intervals of STEPS_PER_INTERVAL steps; each step: LAYERS x (compute, all_reduce),
    the slow rank sleeping in every compute, then the loss read back. Returns each interval's fields per
    report."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    w = torch.randn(32, 32, device="cuda") / 32
    fields = []
    for _ in range(INTERVALS):
        for _ in range(STEPS_PER_INTERVAL):
            start = time.perf_counter()
            for report in reports:
                report.step_started()
            x = torch.randn(32, 32, device="cuda")
            for _ in range(LAYERS):
                x = torch.tanh(x @ w)
                if rank == SLOW_RANK:
                    time.sleep(SLEEP_S)  # slow compute: on a GPU, slow kernels or a slow host alike
                dist.all_reduce(x)
                x = x / world
            x.sum().item()
            for report in reports:
                report.step_ended(time.perf_counter() - start)
        fields.append([report.gather() for report in reports])
    return fields


def main(out_dir: str) -> int:
    from tests.devicecheck import nccl_semantics as ns

    ns.install()
    from rexmoe_train.parallel.state import init_distributed
    from rexmoe_train.resilience.straggler import StragglerReport

    rank, world = init_distributed()
    results: dict = {"promises": _promises(rank)}
    default = StragglerReport(rank, world, 0.25, 0.05, INTERVALS)
    results["default_on_device"] = default.on_device
    for semantics in ("gloo", "nccl"):
        ns.set_async(semantics == "nccl")
        # the host report first: the device one leaves the shared clock recording events
        reports = [StragglerReport(rank, world, 0.25, 0.05, INTERVALS, on_device=False),
                   StragglerReport(rank, world, 0.25, 0.05, INTERVALS, on_device=True)]
        fields = _steps(rank, world, reports)
        results[semantics] = {clock: [f[i] for f in fields] for i, clock in enumerate(("host", "device"))}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    return 0


@pytest.mark.slow  # 2 processes importing megatron, ~25 s on 2 busy cores
def test_collectives_return_before_they_complete_and_the_device_clock_names_the_slow_rank(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.devicecheck.test_nccl_semantics", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    fast = ranks[0]["promises"]
    assert fast["call_s"] < 0.1, fast  # the call returned although rank 1 was 0.4 s late
    assert fast["elapsed_before_sync"] == "refused"  # as CUDA: the end event was not passed yet
    assert fast["values"] == [3.0] * 4 and fast["to_sync_s"] > 0.3, fast  # the wait is at the sync
    assert fast["event_ms"] > 300, fast  # the device events saw the wait
    assert fast["async_op_values"] == [2.0, 2.0] and fast["next_op_reads_the_result"] == 12.0
    assert all(r["default_on_device"] for r in ranks)  # the harness's device is an accelerator

    for rank in ranks:
        for semantics, clocks in (("gloo", ("host", "device")), ("nccl", ("device",))):
            for clock in clocks:
                last = rank[semantics][clock][-1]
                assert last["straggler"] == [SLOW_RANK], (semantics, clock, rank[semantics][clock])
        # under NCCL the host clock measures nothing: the slow rank is never named
        assert all(f["straggler"] == [] for f in rank["nccl"]["host"]), rank["nccl"]["host"]
        busy = rank["nccl"]["device"][-1]
        assert busy["busy_s_max_rank"] == SLOW_RANK and busy["busy_s_max"] > LAYERS * SLEEP_S * 0.9, busy


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
