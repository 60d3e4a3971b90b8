#!/usr/bin/env bash
# Build a CUDA llama-cpp-python wheel on a GPU host (or any host with nvcc + cuBLAS).
#
# Usage: bench/gpu/build_cuda_wheel.sh SDIST OUTDIR [CUDA_ARCHS]
#   SDIST       llama-cpp-python sdist (.tar.gz); `pip download --no-binary :all:
#               --no-deps llama-cpp-python==0.3.36` fetches it on a machine with internet.
#   OUTDIR      where the wheel goes
#   CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES (default 90 = Hopper; 89 Ada, 86 Ampere, 80 A100)
#
# No network needed: the build uses the host's scikit-build-core, cmake and ninja
# (--no-build-isolation). Flash-attention kernels and NCCL are left out to keep the
# build to a few minutes on 16 cores; llama.cpp then runs without flash attention.
set -euo pipefail
sdist=$1 out=$2 archs=${3:-90}
PY=${PYTHON:-python3}
export PATH=/usr/local/cuda/bin:$PATH
command -v nvcc >/dev/null || { echo "build_cuda_wheel: nvcc not found" >&2; exit 1; }
mkdir -p "$out"
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$archs -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_RPC=ON"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "build_cuda_wheel: CMAKE_ARGS=$CMAKE_ARGS jobs=$CMAKE_BUILD_PARALLEL_LEVEL nvcc=$(nvcc --version | tail -1)" >&2
"$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$out" "$sdist"
ls -la "$out"
