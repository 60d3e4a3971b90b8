"""An rpc-server for another host's devices: llama.cpp's own server loop, started from Python.

    python -m worker.engine.rpc_server --host 192.168.1.20 --port 50052 [--device gpu]

It calls ``ggml_backend_rpc_start_server`` of the llama-cpp-python this repository builds (the
same llama.cpp, so the same RPC protocol version as the worker; no C++ build of its own),
exactly as llama.cpp's tools/rpc/rpc-server does. On a GPU host, bootstrap with
CMAKE_ARGS="-DGGML_CUDA=on" (scripts/bootstrap.sh adds -DGGML_RPC=ON) and pass --device gpu.

The RPC protocol has NO authentication and no encryption: anyone who reaches the port can
allocate memory and run graphs on the device. Bind it to loopback or a private network only;
it binds 127.0.0.1 unless told otherwise, and warns like llama.cpp's rpc-server when not.
"""

from __future__ import annotations

import argparse
import os
import sys

from worker.engine.rpc import RpcUnavailable, serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.engine.rpc_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50052, help="port (default 50052)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="which device to serve (default cpu)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="CPU threads")
    p.add_argument("--cache-dir", default=None, help="llama.cpp's local tensor cache (default: none)")
    args = p.parse_args(argv)
    if args.host != "127.0.0.1":
        sys.stderr.write(
            f"WARNING: binding {args.host}: llama.cpp's RPC protocol has no authentication; "
            "never expose this port to an open network\n"
        )
    try:
        serve(f"{args.host}:{args.port}", args.threads, args.device, args.cache_dir)
    except RpcUnavailable as e:
        sys.stderr.write(f"rpc_server: {e}\n")
        return 2
    sys.stderr.write("rpc_server: the server could not start (see above)\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
