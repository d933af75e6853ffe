#!/usr/bin/env bash
# Runs a WeCKD chain on one host with one or more GPUs (one process drives all local GPUs).
#
# Usage:  bash launch/single_host_gpus.sh configs/default.py runs/r1 [--config.key=value ...]
#         CUDA_VISIBLE_DEVICES=0,1 bash launch/single_host_gpus.sh ...   # a subset of the GPUs
#
# Needs a CUDA build of JAX: pip install -U "jax[cuda12]". train.batch_size is global and must
# divide by the number of GPUs.
set -euo pipefail
config=${1:?usage: $0 CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: $0 CONFIG WORKDIR [overrides...]}
shift 2
python -c 'import jax; print("devices:", jax.devices())'
exec python -m weckd_jax.launch --config "$config" --workdir "$workdir" "$@"
