#!/usr/bin/env bash
# The EfficientNet-Lite0 grid on the ImageNet sample (issue 13) at the
# reference's budget; 100 held-out images pick the pass. Resumable: rerun it;
# finished cells are kept in benchmarks/results/efficientnet_lite0.json, and a
# killed search continues from its last unit (checkpoints in
# runs/accuracy/efficientnet_lite0/). Seed 0 of every search first, then seeds 1 and 2.
# Usage: nohup benchmarks/grids/efficientnet_lite0.sh > lite0_grid.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
for seeds in "0" "0 1 2"; do
  nice -n 10 "$PY" benchmarks/accuracy.py --config configs/efficientnet_lite0.py \
    --plan efficientnet --name efficientnet_lite0 --passes 10 --generations 3 --children 1 \
    --holdout 100 --seeds $seeds --resume
done
