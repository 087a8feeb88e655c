#!/usr/bin/env bash
# An Evol-Q search over several GPU nodes with SLURM: one process per GPU, the
# population sharded over all of them (JAX's distributed runtime finds the
# coordinator, process count and index in SLURM's variables).
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_search.sh CONFIG WORKDIR [--set KEY=VALUE ...]
#   DRY_RUN=1 bash scripts/slurm_search.sh CONFIG WORKDIR   # print each process's command
#
# Every process runs the same search (same images, same seed); process 0 writes
# WORKDIR, process i WORKDIR.process<i>. --resume works as on one machine.
#SBATCH --job-name=evolq-search
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --time=12:00:00
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: sbatch scripts/slurm_search.sh CONFIG WORKDIR [evolq search options]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cmd=(evolq search --distributed --config "$config" --workdir "$workdir" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  nodes=${SLURM_JOB_NUM_NODES:-2} per_node=${SLURM_NTASKS_PER_NODE:-8}
  for ((i = 0; i < nodes * per_node; i++)); do
    echo "process $i (node $((i / per_node)), GPU $((i % per_node))): srun -> ${cmd[*]}"
  done
  exit 0
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
srun --kill-on-bad-exit=1 "${cmd[@]}"
