#!/usr/bin/env bash
# Download exactly the wheels of bench/gpu_wheels.txt for the GPU image (CPython 3.12, manylinux
# x86-64) into gpu_wheels/ (git-ignored), with no dependencies resolved: the list is the whole set.
#
#   bench/gpu_wheels.sh [DEST]        # DEST defaults to <repo>/gpu_wheels
#
# Runs on any machine with pip and network access (the GPU machine has none: carry the folder with
# the checkout). antlr4-python3-runtime 4.9.3 (pinned by hydra/omegaconf) exists on PyPI only as an
# sdist; it is pure Python, so it is built here into a py3-none-any wheel. The carried total must stay
# under 64 MiB; the script fails if it does not.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIST="$REPO/bench/gpu_wheels.txt"
DEST="${1:-$REPO/gpu_wheels}"
PY="${PYTHON:-python3}"
LIMIT=$((64 * 1024 * 1024))

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
mapfile -t REQS < <(grep -vE '^\s*(#|$)' "$LIST" | awk '{print $1}')
binary=()
for req in "${REQS[@]}"; do
  case "$req" in
    antlr4-python3-runtime*) "$PY" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$DEST" "$req" ;;
    *) binary+=("$req") ;;
  esac
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$DEST" "${binary[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#REQS[@]}" ]; then
  echo "gpu_wheels: expected ${#REQS[@]} wheels, got $count in $DEST" >&2
  exit 1
fi
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
echo "gpu_wheels: $count wheels, $total bytes ($(awk "BEGIN{printf \"%.1f\", $total/1048576}") MiB) in $DEST"
if [ "$total" -ge "$LIMIT" ]; then
  echo "gpu_wheels: over the 64 MiB carry limit" >&2
  exit 1
fi
