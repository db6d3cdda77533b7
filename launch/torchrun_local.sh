#!/usr/bin/env bash
# Train on this machine with NPROC processes started by torchrun (one per GPU, or gloo on CPU).
#   NPROC=4 launch/torchrun_local.sh --config configs/demo.yaml
# torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; megatron_t2i.distributed reads them.
set -euo pipefail
exec torchrun --standalone --nproc_per_node "${NPROC:-2}" -m megatron_t2i.train "$@"
