#!/usr/bin/env bash
# The runs behind mixed_precision.{json,md} and the reconstruction rows of the CIFAR-10
# and EfficientNet-Lite0 grids, sized for 2 CPU cores (one seed where a seed costs
# tens of minutes). Resumable: rerun it; finished cells are kept.
# Usage: nohup benchmarks/grids/issue_30_31.sh > issue_30_31.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
SMALL="bits.images=128 bits.generations=10 bits.popsize=8 bits.pool=8"
# per-layer widths: EfficientNet-Lite0 at A8, then the CIFAR-10 ViT at A8
"$PY" benchmarks/mixed_precision.py --bed lite0 --budgets 3.5 4.5 6 \
  --methods uniform sensitivity random evolq --seeds 0 1 2 --set $SMALL
"$PY" benchmarks/mixed_precision.py --bed lite0 --budgets 4.5 \
  --methods evolq-seeded --seeds 0 1 2 --set $SMALL
"$PY" benchmarks/mixed_precision.py --bed vit --a-bits 8 --budgets 3.0 4.0 \
  --methods uniform sensitivity evolq --seeds 0 1 --set $SMALL
# the CIFAR-10 ViT at A4, and the default tournament (seeded from the sensitivity fill) at
# 3 seeds at both; then the tournament's scale search at the A4 W3-size widths
"$PY" benchmarks/mixed_precision.py --bed vit --a-bits 4 --budgets 3.0 4.0 \
  --methods uniform sensitivity evolq-seeded --seeds 0 1 2 --set $SMALL
"$PY" benchmarks/mixed_precision.py --bed vit --a-bits 8 --budgets 3.0 4.0 \
  --methods evolq-seeded --seeds 0 1 2 --set $SMALL
"$PY" benchmarks/mixed_precision.py --bed vit --a-bits 4 --budgets 3.0 \
  --methods uniform sensitivity evolq-seeded --seeds 0 1 2 --after evolq --set $SMALL
# reconstruction (with QDrop, the Lite0 rows' 200 steps of 16 images a unit) at the
# sensitivity fill's widths under 4.5 bits, Lite0's best at init
"$PY" benchmarks/mixed_precision.py --bed lite0 --budgets 4.5 --methods sensitivity \
  --seeds 0 --after adaround-qdrop --set $SMALL
# the tournament's scale search (2 passes) at Lite0's uniform and sensitivity widths
"$PY" benchmarks/mixed_precision.py --bed lite0 --budgets 4.5 --methods uniform sensitivity \
  --seeds 0 --after evolq --set $SMALL
# reconstruction on the CIFAR-10 ViT's hard setting (W3A4), at its default 1,000 steps a
# unit, 3 seeds; then the papers' layout (8-bit first and last layers) at seed 0
"$PY" benchmarks/accuracy.py --config configs/cifar10.py --plan cifar10 \
  --name accuracy_cifar10 --passes 10 --generations 3 --children 1 --holdout 2000 \
  --seeds 0 1 2 --settings HARD --only adaround-qdrop adaround --resume
"$PY" benchmarks/accuracy.py --config configs/cifar10.py --plan cifar10 \
  --name accuracy_cifar10 --passes 10 --generations 3 --children 1 --holdout 2000 \
  --seeds 0 --settings HARD --only adaround-qdrop-ends8 --resume
# then W4A4 (3 seeds), and the two stacked in either order on W3A4 (accuracy_plans.STACKED)
"$PY" benchmarks/accuracy.py --config configs/cifar10.py --plan cifar10 \
  --name accuracy_cifar10 --passes 10 --generations 3 --children 1 --holdout 2000 \
  --seeds 0 1 2 --settings W4A4 --only adaround adaround-qdrop --resume
"$PY" benchmarks/accuracy.py --config configs/cifar10.py --plan cifar10 \
  --name accuracy_cifar10 --passes 10 --generations 3 --children 1 --holdout 2000 \
  --seeds 0 --settings HARD W4A4 \
  --only adaround adaround-qdrop adaround-qdrop+evolq evolq+adaround-qdrop --resume
# Adam with its state carried across unit visits (W3A4, the sweep's rate)
"$PY" benchmarks/accuracy.py --config configs/cifar10.py --plan cifar10 \
  --name accuracy_cifar10 --passes 10 --generations 3 --children 1 --holdout 2000 \
  --seeds 0 --settings HARD --only grad-adam-carry --resume
# reconstruction on Lite0 W4A4 and W4A8 at 200 steps of 16 images a unit (a step at
# 112x112 costs ~2 s here: the papers' 20,000 steps do not fit); then their seeds 1-2
L0="--config configs/efficientnet_lite0.py --plan efficientnet --name efficientnet_lite0
  --passes 10 --generations 3 --children 1 --holdout 100
  --set search.recon_iters=200 search.recon_batch=16 --resume"
"$PY" benchmarks/accuracy.py $L0 --seeds 0 --settings W4A4 W4A8 \
  --only adaround-qdrop adaround-qdrop-ends8
"$PY" benchmarks/accuracy.py $L0 --seeds 1 2 --settings W4A4 W4A8 --only adaround-qdrop
# Adam's rate on Lite0 W4A8 (0.02 is grad-adam's row; 0.1, 0.3) and Adam with its state
# carried across visits at 0.3: about 2.3 h a run on these 2 cores
"$PY" benchmarks/accuracy.py --config configs/efficientnet_lite0.py --plan efficientnet \
  --name efficientnet_lite0 --passes 10 --generations 3 --children 1 --holdout 100 --resume \
  --seeds 0 --settings W4A8 --only grad-adam-lr0.1 grad-adam-lr0.3 grad-adam-carry
