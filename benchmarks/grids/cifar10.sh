#!/usr/bin/env bash
# The CIFAR-10 test bed's accuracy grid (issue 12) at the reference's budget
# (10 passes x 3 cycles x 1 child; 2,000 held-out train images pick the pass).
# Resumable: rerun it after an interruption; every finished cell is kept in
# benchmarks/results/accuracy_cifar10.json. Seed 0 of every method first, so
# that a partial grid already holds every comparison; then seeds 1 and 2.
# Usage: nohup benchmarks/grids/cifar10.sh > cifar10_grid.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
for seeds in "0" "0 1 2"; do
  nice -n 10 "$PY" benchmarks/accuracy.py --config configs/cifar10.py --plan cifar10 \
    --name accuracy_cifar10 --passes 10 --generations 3 --children 1 --holdout 2000 \
    --seeds $seeds --resume
done
