#!/usr/bin/env bash
# Build the wheel folder tools/gpu_check.sh installs on a GPU machine without network
# (Python 3.12, x86_64 Linux; docs/gpu.md):
#   tools/gpu_wheels.sh [DIR] [PACKAGE ...]        # default DIR: .whl (git-ignored)
# Default packages: what the project needs beyond the GPU machine's image (megatron-core at the
# project's pin; diffusers for MoVQGAN, at the version this checkout's venv runs; diffusers
# declares importlib-metadata but imports it only on Python < 3.8). torch, Transformer Engine
# and CUDA libraries are never fetched: the machine's own builds stay. Binary wheels only, no dependencies resolved
# (--no-deps): name each missing dependency. Fails if the folder exceeds 64 MiB.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-$repo/.whl}
shift || true
python=${PYTHON:-$repo/.venv/bin/python}
limit_mib=64

version_of() {  # the version this venv runs, or empty
    "$python" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

if [[ $# -gt 0 ]]; then
    specs=("$@")
else
    core=$(grep -o '"megatron-core[^"]*"' "$repo/pyproject.toml" | tr -d '"')
    specs=("$core")
    for name in diffusers; do
        v=$(version_of "$name")
        specs+=("$name${v:+==$v}")
    done
fi
for spec in "${specs[@]}"; do
    case "$spec" in
        torch|torch[=\<\>~!]*|transformer[-_]engine*|nvidia-*)
            echo "error: $spec: the GPU machine's own build is used, never a wheel" >&2
            exit 2 ;;
    esac
done
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dir" "${specs[@]}"
size_kib=$(du -sk "$dir" | cut -f1)
ls -1 "$dir"
echo "$dir: $((size_kib / 1024)) MiB"
if (( size_kib > limit_mib * 1024 )); then
    echo "error: $dir is over $limit_mib MiB: it would not travel to the GPU machine" >&2
    exit 1
fi
