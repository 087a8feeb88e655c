#!/usr/bin/env bash
# The speed benchmark on a lent GPU (H100/H200: jax with CUDA, flax, optax, orbax; no
# network, no evosax). Installs nothing: evolq_jax is imported from this checkout and
# evosax is only needed by other strategies. Torch/timm are absent there, so (e) is
# skipped (its CPU number is in speed.md). About 3-5 minutes in all.
#
#   bash benchmarks/gpu_speed.sh        # from the repository root
#   -> benchmarks/results/speed_gpu.{md,json} (and copies under $OUT when set)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # so peak memory reflects what is used
# Pure-Python dependencies the GPU image may lack: carried as wheels, never fetched.
# (prepare on a networked machine: pip download tqdm safetensors -d wheels)
missing=$(python - <<'EOF'
import importlib.util
mods = ["jax", "flax", "optax", "orbax", "tqdm", "safetensors", "numpy"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  if ls wheels/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --find-links wheels ${missing//orbax/orbax-checkpoint}
  else
    echo "missing on this machine: $missing; carry their wheels in ./wheels" >&2; exit 2
  fi
fi
python - <<'EOF'
import jax
print("devices:", jax.devices())
assert jax.devices()[0].platform == "gpu", "no GPU visible to jax"
EOF
# 1,000 calibration images, the paper's population of 15; whole population vmapped
# (chunk 0): on a GPU, vmapping is what (b)/(a) measures.
timeout 540 python benchmarks/speed.py \
  --models deit_tiny_patch16_224 deit_small_patch16_224 \
  --calib-images 1000 --loss-batch 100 --population 15 --seq-candidates 15 \
  --chunk 0 --memory-mb 40000 --no-torch --no-search --name speed_gpu
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/speed_gpu.md benchmarks/results/speed_gpu.json "$OUT"/
fi
