#!/usr/bin/env bash
# Repack a CUDA llama-cpp-python wheel into a small tarball that can travel to a GPU host.
#
# Usage: bench/gpu/repack_wheel.sh WHEEL OUT.tar.xz
#
# The wheel scikit-build-core makes holds every shared library six times (lib/ and
# llama_cpp/lib/, each as .so, .so.0 and .so.0.x.y: 179 MiB for the sm_90 build). Python only
# needs the llama_cpp package: llama_cpp.py / _ggml.py dlopen lib/libllama.so and
# lib/libggml.so by those names, and the libraries find each other by SONAME (libggml.so.0,
# ...) through RUNPATH=$ORIGIN. So keep one real file per library, named by its SONAME,
# plus the two symlinks that ctypes opens. Install with: tar -xJf OUT.tar.xz -C SITE_DIR.
set -euo pipefail
whl=$(realpath "$1") out=$(realpath -m "$2")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m zipfile -e "$whl" "$tmp/x"
mkdir "$tmp/pkg"
cp -a "$tmp"/x/llama_cpp "$tmp"/x/llama_cpp_python-*.dist-info "$tmp/pkg/"
cd "$tmp/pkg/llama_cpp/lib"
for f in *.so.*.*; do
  so=$(readelf -d "$f" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
  base=${so%%.so*}
  rm -f "$base.so" "$so"
  mv "$f" "$so"
done
ln -s libllama.so.0 libllama.so
ln -s libggml.so.0 libggml.so
ls -la
cd "$tmp/pkg"
find . -name __pycache__ -prune -exec rm -rf {} +
tar -cJf "$out.tmp" --owner=0 --group=0 llama_cpp llama_cpp_python-*.dist-info
mv "$out.tmp" "$out"
ls -la "$out"
