#!/usr/bin/env bash
# The GPU check kit: one command that proves the GPU path on a bare CUDA machine in under 8 minutes,
# the essentials in the first 5.
#
#   bench/gpu_wheels.sh                  # beforehand, on a machine with network: fills gpu_wheels/
#   bench/gpu_check.sh [--budget 480] [--only SECTION,...] [--dry-list]
#
# Results: $OUT (else ./gpu_check_out) gets only gpu_check.json, gpu_check.md and logs.tar.gz; runs,
# checkpoints, logs and the install log go to a work folder under /tmp ($GPU_CHECK_WORK, else new).
# Without a CUDA device it exits 2 with one line, before installing anything. Otherwise it installs
# the carried wheels whose packages the machine lacks (bench/gpu_wheels.txt: requirement, import
# name) into a target dir put first on PYTHONPATH, then hands over to bench/gpu_check.py, which runs
# the sections (see its docstring). PYTHON picks the interpreter (default python3).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-$PWD/gpu_check_out}"
WHEELS="${GPU_WHEELS:-$REPO/gpu_wheels}"
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/rexmoe_gpu_site}"

dry=0
for arg in "$@"; do [ "$arg" = "--dry-list" ] && dry=1; done

if [ "$dry" -eq 0 ]; then
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" >/dev/null 2>&1
  rc=$?
  if [ "$rc" -eq 3 ]; then
    echo "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing run" >&2
    exit 2
  elif [ "$rc" -ne 0 ]; then
    echo "gpu_check: $PY cannot import torch, so no CUDA device can be used; nothing run" >&2
    exit 2
  fi
  WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/rexmoe_gpu_check.XXXXXX)}"
  mkdir -p "$WORK" "$SITE"
  # Install only what is missing: a second copy of a package the image already has would shadow it.
  missing=()
  while read -r req mod; do
    [ -z "$req" ] && continue
    case "$req" in \#*) continue ;; esac
    if ! PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
        "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" >/dev/null 2>&1; then
      missing+=("$req")
    fi
  done < "$REPO/bench/gpu_wheels.txt"
  if [ "${#missing[@]}" -eq 0 ]; then
    echo "nothing to install: every listed package imports" > "$WORK/install.txt"
  elif [ ! -d "$WHEELS" ]; then
    echo "NOT installed (no $WHEELS; run bench/gpu_wheels.sh and carry it): ${missing[*]}" > "$WORK/install.txt"
  elif "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$SITE" \
      "${missing[@]}" > "$WORK/pip_install.log" 2>&1; then
    echo "installed into $SITE: ${missing[*]}" > "$WORK/install.txt"
  else
    echo "pip install FAILED (see pip_install.log): ${missing[*]}" > "$WORK/install.txt"
  fi
  echo "[install] $(cat "$WORK/install.txt")"
  set -- --work "$WORK" "$@"
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$REPO"
exec "$PY" "$REPO/bench/gpu_check.py" --out "$OUTDIR" "$@"
