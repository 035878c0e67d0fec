"""Elastic world size: a restart with fewer (or more) data-parallel ranks resumes at the same sample
with the same global batch, the distributed optimizer included (megatron's dp_reshardable format
reshards over DP); what cannot continue is refused in one line. The two-"node" SLURM scenario runs the
real launch/slurm.sbatch under stub sbatch / srun / scontrol commands (tests/resilience/test_elastic.py
::test_slurm_job_loses_a_node_and_continues_with_dp2). Figures: docs/reliability.md."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rexmoe_train.checkpoint import compatibility
from rexmoe_train.checkpoint.errors import CheckpointError
from tests.helpers import finish_session, tiny_config
from tests.training.test_checkpoint import REPO, TINY, losses

# TINY with one sample per micro-batch: the global batch of 4 runs on DP 1, 2 or 4
ELASTIC = [*TINY, "train.micro_batch_size=1", "train.log_interval=1"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
           and not k.startswith(("TORCHELASTIC_", "GROUP_", "ROLE_", "PET_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun(nproc: int, *overrides: str, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "-m", "rexmoe_train.cli.train", *ELASTIC, *overrides],
        cwd=REPO, env=_env(), stdout=open(f"{log}.out", "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _rel_err(got: dict, ref: dict) -> float:
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    return max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)


# --------------------------------------------------------------------------------------------------
# the rules (torch-free)
# --------------------------------------------------------------------------------------------------
def _meta(step: int, gbs: int, world: int, dp: int) -> dict:
    return {"step": step, "consumed_samples": step * gbs, "parallel": {"world_size": world, "data_parallel_size": dp}}


def test_data_position_allows_dp_changes_and_refuses_another_global_batch():
    cfg = tiny_config()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, 4
    compatibility.check_data_position(cfg, Path("ck"), _meta(6, 4, 4, 4))  # same sample: fine
    line = compatibility.data_parallel_change(cfg, _meta(6, 4, 4, 4), 2)
    assert line == ("data-parallel size 4 -> 2 (world 4 -> 2): global batch 4 unchanged, 1 -> 2 micro-batches "
                    "per rank and step, continuing after sample 24; optimizer state per parameter")
    assert compatibility.data_parallel_change(cfg, _meta(6, 4, 2, 2), 2) is None
    with pytest.raises(CheckpointError) as err:
        compatibility.check_data_position(cfg, Path("ck"), _meta(6, 8, 4, 4))
    assert "\n" not in str(err.value)
    assert "saved after sample 48 (step 6 x global batch 8)" in str(err.value)
    assert "resume with train.global_batch_size=8" in str(err.value)


def test_a_world_that_cannot_carry_the_global_batch_is_one_line():
    """An elastic restart onto 3 ranks: the global batch of 4 does not split over DP 3."""
    proc = subprocess.run([sys.executable, "-m", "rexmoe_train.cli.train", "--check", "--world-size", "3",
                           *ELASTIC], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "train.global_batch_size" in lines[0] and "(1 * 3)" in lines[0]


# --------------------------------------------------------------------------------------------------
# DP 2 -> 1 and DP 1 -> 2 with the distributed optimizer (async saves, digests from both ranks)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_distributed_optimizer_resumes_on_fewer_and_more_ranks(tmp_path):
    """Reference: DP 2, 4 steps, saved every step. Shrink: DP 1 (4 micro-batches) resumes from the
    reference's step-2 checkpoint to 4. Grow: DP 1 for 2 steps, then DP 2 resumes to 4. Every step's
    loss within 1e-6 (relative) of the reference; the Adam moments are resharded
    (checkpoint.load_optimizer=true, the default)."""
    common = ["train.train_iters=4", "parallel.use_distributed_optimizer=true", "checkpoint.save_interval=1",
              "checkpoint.keep_last_n=null"]
    logs = tmp_path / "logs"
    first = {"ref": _torchrun(2, *common, f"run.dir={tmp_path / 'ref'}", log=logs / "ref"),
             "grow": _torchrun(1, *common, "train.train_iters=2", f"run.dir={tmp_path / 'grow'}", log=logs / "grow")}
    for name, proc in first.items():
        assert finish_session(proc) == 0, (logs / f"{name}.out").read_text()[-3000:]
    second = {"shrink": _torchrun(1, *common, f"checkpoint.load={tmp_path / 'ref' / 'checkpoints' / 'iter_0000002'}",
                                  f"run.dir={tmp_path / 'shrink'}", log=logs / "shrink2"),
              "grow": _torchrun(2, *common, f"run.dir={tmp_path / 'grow'}", log=logs / "grow2")}
    for name, proc in second.items():
        assert finish_session(proc) == 0, (logs / f"{name}2.out").read_text()[-3000:]
    ref = losses(tmp_path / "ref")
    notes = {"shrink": "data-parallel size 2 -> 1 (world 2 -> 1): global batch 4 unchanged, 2 -> 4 micro-batches",
             "grow": "data-parallel size 1 -> 2 (world 1 -> 2): global batch 4 unchanged, 4 -> 2 micro-batches"}
    for name in ("shrink", "grow"):
        out = (logs / f"{name}2.out").read_text()
        assert "resumed from" in out and "at step 2" in out and notes[name] in out, out[-3000:]
        assert "distributed optimizer state resharded over DP" in out
        got = losses(tmp_path / name)
        if name == "shrink":  # a fresh run dir: steps 3-4 only; 1-2 are the reference's own
            got = {**{s: v for s, v in ref.items() if s <= 2}, **got}
        err = _rel_err(got, ref)
        print(f"[elastic] {name}: max rel err of lm_loss over steps 1-4 vs DP 2 reference: {err:.2e}")
        assert err <= 1e-6, (name, err)


# --------------------------------------------------------------------------------------------------
# two "nodes" under the real launch/slurm.sbatch; one dies, the job goes on with half the ranks
# --------------------------------------------------------------------------------------------------
STUB_SBATCH = r"""#!/bin/bash
# test stub of sbatch: runs the batch script here, in the foreground, as an allocation of --nodes nodes
nodes=2
while [[ ${1:-} == -* ]]; do
    case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
    shift
done
script=$1
shift
export SLURM_JOB_ID=4242 SLURM_NNODES=$nodes SLURM_JOB_NODELIST="stub[0-$((nodes - 1))]" SLURM_CPUS_PER_TASK=2
exec bash "$script" "$@"
"""

STUB_SCONTROL = r"""#!/bin/bash
# test stub of scontrol: every node of the allocation is this machine; requeues are logged. The
# hostnames go out in one write, as scontrol's: the caller reads one line (`| head -n1` under
# pipefail), and a second write after head has exited would die of SIGPIPE.
case $1 in
    show) printf '127.0.0.1\n%.0s' $(seq "$SLURM_NNODES") ;;
    requeue) echo "requeue $2" >>"$STUB_STATE/scontrol.log" ;;
esac
"""

STUB_SRUN = r"""#!/bin/bash
# test stub of srun: the step's command once per node, each in its own session (a "node" the test can
# kill), node 0 first: on one machine every agent could host the rendezvous store, a real cluster's
# first node does. Exit status: the highest of the tasks', as srun's.
while [[ ${1:-} == -* ]]; do shift; done  # --option=value forms only
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 setsid "$@" &
    pids+=($!)
    echo $! >"$STUB_STATE/node$i.pid"
    if ((i == 0)); then
        port=$(printf '%04X' "$RDZV_PORT")
        for _ in $(seq 600); do
            grep -qE ":$port [0-9A-F]+:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null && break
            sleep 0.1
        done
    fi
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for i in "${!pids[@]}"; do
    while kill -0 "${pids[$i]}" 2>/dev/null; do wait "${pids[$i]}"; done
    wait "${pids[$i]}"
    r=$?
    echo "$r" >"$STUB_STATE/node$i.rc"
    ((r > rc)) && rc=$r
done
exit "$rc"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stubs(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, text in (("sbatch", STUB_SBATCH), ("scontrol", STUB_SCONTROL), ("srun", STUB_SRUN)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
@pytest.mark.exclusive  # waits with deadlines for checkpoints and rendezvous rounds
def test_slurm_job_loses_a_node_and_continues_with_dp2(tmp_path):
    """launch/slurm.sbatch, 2 nodes x 2 processes (c10d rendezvous on 127.0.0.1, MIN_NODES=1, one
    restart): once step 2's checkpoint is complete, node 1 (its agent and trainers) is SIGKILLed. Node
    0's agent regroups alone; its 2 trainers resume from the newest checkpoint with DP 2 (2 micro-batches
    instead of 1), the same global batch and the next sample, and finish. Every step's loss is within
    1e-6 (relative) of an uninterrupted 4-process run of the same layout."""
    steps = 6
    common = [f"train.train_iters={steps}", "checkpoint.save_interval=2"]
    # the reference runs alongside: the job mostly waits (rendezvous rounds, start-up)
    ref = _torchrun(4, *common, f"run.dir={tmp_path / 'ref'}", log=tmp_path / "ref")

    state, bin_dir, run = tmp_path / "stub", tmp_path / "bin", tmp_path / "job"
    state.mkdir()
    _stubs(bin_dir)
    env = _env(PATH=f"{bin_dir}:{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", STUB_STATE=str(state),
               GPUS_PER_NODE="2", MIN_NODES="1", RDZV_PORT=str(_free_port()), PET_MAX_RESTARTS="1",
               # a round completes 15 s after its first node joins unless all have (torchrun default: 30 s)
               PET_RDZV_CONF="last_call_timeout=15")
    out = open(tmp_path / "job.out", "w")
    job = subprocess.Popen(["sbatch", "launch/slurm.sbatch", *ELASTIC, *common, f"run.dir={run}"], cwd=REPO,
                           env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pointer = run / "checkpoints" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if pointer.exists() and pointer.read_text().strip() not in ("", "0"):
            break
        time.sleep(0.05)
    assert pointer.exists(), (job.poll(), (tmp_path / "job.out").read_text()[-4000:])
    saved_before_kill = int(pointer.read_text())
    assert saved_before_kill < steps, "the job finished before a node could be lost"
    os.killpg(int((state / "node1.pid").read_text()), signal.SIGKILL)  # node 1: its agent and trainers
    rc = finish_session(job, timeout=400)
    assert finish_session(ref) == 0, (tmp_path / "ref.out").read_text()[-3000:]
    text = (tmp_path / "job.out").read_text()
    assert (state / "node0.rc").read_text().strip() == "0", text[-4000:]
    assert rc == 128 + signal.SIGKILL  # srun reports the lost node's task
    assert "nodes 1-2" in text
    resumed = [line for line in text.splitlines() if "[checkpoint] resumed from" in line]
    assert len(resumed) == 1, text[-4000:]
    assert "data-parallel size 4 -> 2 (world 4 -> 2): global batch 4 unchanged, 1 -> 2 micro-batches" \
        in resumed[0], resumed[0]
    assert json.loads((run / "model.json").read_text())["world_size"] == 2
    assert int(pointer.read_text()) == steps
    err = _rel_err(losses(run), losses(tmp_path / "ref"))
    print(f"[elastic] slurm 2x2 -> 1x2 after step {saved_before_kill}: max rel err of lm_loss vs the "
          f"4-process reference over {steps} steps: {err:.2e}")
    assert err <= 1e-6, err
