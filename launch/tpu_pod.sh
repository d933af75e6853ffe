#!/usr/bin/env bash
# Runs a WeCKD chain on every worker of a Cloud TPU VM pod slice.
#
# Usage (from your workstation; the repository must be at ~/weckd_jax on every worker):
#   TPU=my-pod ZONE=us-central2-b bash launch/tpu_pod.sh configs/default.py /mnt/shared/runs/r1 [--config.key=value ...]
#
# Every worker runs the same command; with --multihost JAX finds the pod's workers (from the TPU
# VM's metadata server) and joins their processes, each worker reads only its share of every
# batch, and worker 0 writes the reports.
# The workdir must be a folder every worker mounts at the same path (e.g. a Filestore NFS share):
# orbax writes the checkpoints collectively. A URL (gs://...) is refused: mount the bucket first.
set -euo pipefail
config=${1:?usage: $0 CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: $0 CONFIG WORKDIR [overrides...]}
shift 2
# Quoted for the workers' shell, so a path or override with spaces or quotes arrives as given.
args=$(printf ' %q' --config "$config" --workdir "$workdir" "$@")
gcloud compute tpus tpu-vm ssh "${TPU:?set TPU}" --zone "${ZONE:?set ZONE}" --worker=all --command "
  cd ~/weckd_jax &&
  pip install -q -e . 'jax[tpu]' &&
  python -m weckd_jax.launch --multihost$args
"
