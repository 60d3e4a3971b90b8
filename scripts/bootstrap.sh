#!/usr/bin/env bash
# Sets up .venv with everything vram-llm needs, idempotently.
#
# llama-cpp-python is built from source with GGML_NATIVE=OFF: the dev/CI CPUs
# advertise AMX but the VM does not enable it, so a native build dies with
# SIGSEGV (ldtilecfg) on the first decode. pip's wheel cache ignores CMAKE_ARGS,
# so we never let pip pick a wheel on its own: we build into a directory keyed
# by (version, CMAKE_ARGS) with --no-cache-dir and install from there with
# --no-index. A cached native wheel therefore cannot sneak back in.
#
# GPU hosts: export CMAKE_ARGS="-DGGML_CUDA=on" (see README) before running this;
# the key changes, so a CUDA wheel is built next to the CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
LLAMA_VERSION=0.3.36
CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"}
# llama.cpp's RPC backend (other hosts' devices, README "A model bigger than one box") is always
# built, CUDA builds included: one more small library, nothing at run time unless a plan uses
# a remote device. CMAKE_ARGS that name GGML_RPC themselves decide.
case " $CMAKE_ARGS " in *GGML_RPC=*) ;; *) CMAKE_ARGS="$CMAKE_ARGS -DGGML_RPC=ON" ;; esac
key=$(printf '%s|%s' "$LLAMA_VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-16)
WHEELDIR=${VRAM_LLM_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/vram-llm/wheels}/llama-cpp-python-$LLAMA_VERSION-$key

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

if ! ls "$WHEELDIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "bootstrap: building llama-cpp-python $LLAMA_VERSION with CMAKE_ARGS='$CMAKE_ARGS' (a few minutes)" >&2
  mkdir -p "$WHEELDIR.tmp"
  CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$VENV/bin/python" -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
    -w "$WHEELDIR.tmp" "llama-cpp-python==$LLAMA_VERSION"
  rm -rf "$WHEELDIR" && mv "$WHEELDIR.tmp" "$WHEELDIR"
  printf '%s\n' "$CMAKE_ARGS" > "$WHEELDIR/CMAKE_ARGS"
fi

stamp="$VENV/.vram-llm-$key-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --no-cache-dir --force-reinstall --no-deps --no-index \
    --find-links "$WHEELDIR" "llama-cpp-python==$LLAMA_VERSION"
  # The remaining dependencies (pure Python or manylinux wheels) come from the index;
  # llama-cpp-python is already satisfied so pip does not touch it.
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  rm -f "$VENV"/.vram-llm-* && touch "$stamp"
fi
