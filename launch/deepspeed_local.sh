#!/usr/bin/env bash
# Train with DeepSpeed's own launcher and the deepspeed engine (train.engine=deepspeed is added).
#   launch/deepspeed_local.sh --config configs/demo.yaml [section.key=value ...]
#   NPROC=8 launch/deepspeed_local.sh --config ... deepspeed.zero_stage=3   # one node, 8 processes
#   HOSTFILE=hostfile launch/deepspeed_local.sh --config ...                 # the nodes of a hostfile
# A hostfile names one node per line with its number of processes (GPUs); DeepSpeed reaches
# every node but the first over ssh (pdsh), so the same venv and repository path must exist there:
#   node01 slots=8
#   node02 slots=8
# The launcher appends --local_rank=N to each process's arguments; megatron_t2i.train accepts it
# and takes rank, world size and master address from the environment the launcher sets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
port=${MASTER_PORT:-29500}
if [ -n "${HOSTFILE:-}" ]; then
  where=(--hostfile "$HOSTFILE")
else
  where=(--num_nodes 1 --num_gpus "${NPROC:-2}")
fi
exec "$PY" -m deepspeed.launcher.runner "${where[@]}" --master_port "$port" \
  --module megatron_t2i.train "$@" train.engine=deepspeed
