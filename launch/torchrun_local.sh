#!/usr/bin/env bash
# Train on this machine with NPROC processes started by torchrun (one per GPU, or gloo on CPU).
#   NPROC=4 launch/torchrun_local.sh --config configs/demo.yaml [section.key=value ...]
# torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; megatron_t2i.distributed reads them.
# Python: $PYTHON, else .venv/bin/python, else python3. Exit status: 0 done, 75 when every rank
# stopped on SIGTERM/SIGUSR1 after saving (run again to resume; megatron_t2i.torchrun passes it
# on where plain torchrun reports 1), else 1 (a rank failed).
set -euo pipefail
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}
exec "$py" -m megatron_t2i.torchrun --standalone --nproc_per_node "${NPROC:-2}" \
    -m megatron_t2i.train "$@"
