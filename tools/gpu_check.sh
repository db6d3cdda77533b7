#!/usr/bin/env bash
# One prepared GPU check for a machine with one H100/H200 and no network (docs/gpu.md):
#   tools/gpu_check.sh OUTDIR [WHEELS]
# installs the wheels in WHEELS (tools/gpu_wheels.sh builds the folder) for whatever the machine
# lacks, never over its torch, Transformer Engine or megatron-core; runs the gpu tests, the demo
# on CUDA, the 1B throughput sweep against the Hugging Face peer and the MoVQGAN encode
# benchmark within 9 minutes; writes OUTDIR/summary.json and one log per step.
# Without a CUDA device: one line on stderr, a summary saying so, exit status 1.
set -euo pipefail
if [[ $# -lt 1 ]]; then  # the rest is checked by argparse (exit status 2 as well)
    echo "usage: tools/gpu_check.sh OUTDIR [WHEELS] [--budget-s SECONDS]" >&2
    exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec "$python" -m megatron_t2i.experiments.bench.gpu_check "$@"
