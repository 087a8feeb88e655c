#!/usr/bin/env bash
# An Evol-Q search on a Cloud TPU VM pod slice: the same command on every
# worker (gcloud ... --worker=all), the population sharded over all TPU chips
# (JAX's distributed runtime detects the pod: nothing to set).
#
#   TPU=my-v4-32 ZONE=us-central2-b bash scripts/tpu_pod_search.sh CONFIG WORKDIR [--set ...]
#   DRY_RUN=1 TPU=my-v4-32 ZONE=us-central2-b bash scripts/tpu_pod_search.sh CONFIG WORKDIR
#
# The checkout must be at ~/evolq_jax on every worker (installed with
# pip install -e . and jax[tpu]); WORKDIR should be on a shared disk or
# a gcsfuse mount. Process 0 writes WORKDIR, process i WORKDIR.process<i>.
set -euo pipefail
if [ $# -lt 2 ] || [ -z "${TPU:-}" ] || [ -z "${ZONE:-}" ]; then
  echo "usage: TPU=NAME ZONE=ZONE bash scripts/tpu_pod_search.sh CONFIG WORKDIR [evolq search options]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
remote="cd ~/evolq_jax && evolq search --distributed --config $(printf %q "$config") --workdir $(printf %q "$workdir")"
for arg in "$@"; do remote+=" $(printf %q "$arg")"; done
cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$remote")
if [ -n "${DRY_RUN:-}" ]; then
  echo "on every worker of $TPU: $remote"
  echo "launch: ${cmd[*]}"
  exit 0
fi
"${cmd[@]}"
