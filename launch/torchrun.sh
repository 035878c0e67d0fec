#!/usr/bin/env bash
# Single-node launcher: one trainer process per GPU (or per CPU slot on a CPU box).
#
#   launch/torchrun.sh NPROC [hydra overrides...]
#   launch/torchrun.sh 8 model=rexmoe_2.3b run.dir=runs/2p3b
#
# Env: OMP_NUM_THREADS, MASTER_PORT (both optional, see below); PYTHON picks the
# interpreter (default: the checkout's .venv, else python3); PET_MAX_RESTARTS (torchrun's own
# variable) sets how often a failed run is restarted from its newest checkpoint (default 3, 0: off).
set -euo pipefail

usage="usage: $0 NPROC [hydra overrides...]  (NPROC: processes on this node, a positive integer)"
if [[ $# -lt 1 ]]; then
    echo "$usage" >&2
    exit 2
fi
case "$1" in
    -h | --help) echo "$usage"; exit 0 ;;
esac
if ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "$usage" >&2
    exit 2
fi
nproc_per_node=$1
shift

# WHY: every rank runs its own intra-op thread pool; left alone each one sizes itself to
# all cores, so N ranks oversubscribe the CPU N-fold (torchrun would force 1, which starves
# the CPU/gloo path and data loading). Split the cores this process may use evenly. The
# trainer makes the final choice (rexmoe_train/threads.py: also a cgroup CPU quota, and
# run.num_threads); REXMOE_LAUNCHER_OMP_NUM_THREADS tells it this value is ours, not the user's.
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    cores=$(nproc)  # honours the CPU affinity mask (taskset, cgroup cpusets)
    threads=$((cores / nproc_per_node))
    OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
    REXMOE_LAUNCHER_OMP_NUM_THREADS=$OMP_NUM_THREADS
    export OMP_NUM_THREADS REXMOE_LAUNCHER_OMP_NUM_THREADS
fi

# Port choice. --standalone makes torchrun bind a free port itself (race-free) and export it
# to the workers as MASTER_PORT, so two jobs on one node never collide on the default 29500;
# it would silently ignore a MASTER_PORT from the environment, though. When the caller pins
# MASTER_PORT (firewalled node, a port reserved by the scheduler), honour it with the static
# single-node rendezvous instead, which hands exactly that port to the workers.
if [[ -n ${MASTER_PORT:-} ]]; then
    rendezvous=(--nnodes 1 --node-rank 0 --master-addr "${MASTER_ADDR:-127.0.0.1}"
        --master-port "$MASTER_PORT")
else
    rendezvous=(--standalone)
fi

# WHY the interpreter dance: torchrun starts the workers with its own interpreter, so an
# explicit PYTHON (a venv) must run the launcher module too, not whatever torchrun is on PATH.
# Without PYTHON, the checkout's own .venv (what the README creates) is used when it exists, so
# the launcher works without activating anything.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} && -x $repo/.venv/bin/python ]]; then
    PYTHON=$repo/.venv/bin/python
fi
if [[ -n ${PYTHON:-} ]]; then
    python=("$PYTHON")
else
    python=(python3)
fi
# torchrun (same options, elastic agent) with one summary line per failure, no restart for what a
# restart cannot fix, and no process of the run outliving it: rexmoe_train/cli/launch.py.
launcher=("${python[@]}" -m rexmoe_train.cli.launch)

# Restarts: on by default and bounded. A dead, hung or failing rank restarts the whole group, which
# resumes from the newest complete checkpoint (checkpoint.save_interval sets how much is redone).
max_restarts=${PET_MAX_RESTARTS:-3}
if ! [[ $max_restarts =~ ^[0-9]+$ ]]; then
    echo "$0: PET_MAX_RESTARTS=$max_restarts: must be an integer >= 0" >&2
    exit 2
fi

# Validate the config (and the layout for this many processes) once, before starting N of them:
# a bad value is one line and exit 2, not N copies of it followed by torchrun's ChildFailedError.
"${python[@]}" -m rexmoe_train.cli.train --check --world-size "$nproc_per_node" "$@" || exit $?

exec "${launcher[@]}" "${rendezvous[@]}" --nproc-per-node "$nproc_per_node" \
    --max-restarts "$max_restarts" -m rexmoe_train.cli.train "$@"
