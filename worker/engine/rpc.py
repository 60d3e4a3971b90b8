"""llama.cpp's RPC backend through ctypes: the devices a split model uses, and an rpc-server.

llama-cpp-python 0.3.36 binds neither ``ggml_backend_rpc_add_server`` nor the device API, and
removed its ``rpc_servers`` parameter, so the few functions needed are bound here over the
wheel's own libraries (libggml-rpc.so exists when it was built with -DGGML_RPC=ON, as
scripts/bootstrap.sh does; ggml's device API is in libggml.so and its dependencies).

- ``model_devices``: the NULL-terminated ``ggml_backend_dev_t`` array for
  ``llama_model_params.devices``, as llama.cpp's common code builds it from ``--rpc``: each
  remote device (``ggml_backend_rpc_add_server``), then every local GPU device in the order
  the worker's CUDA sees them. The plan's tensor_split has one entry per device of that list.
- ``serve``: ``ggml_backend_rpc_start_server`` on a device of this host (what llama.cpp's
  rpc-server program does): ``python -m worker.engine.rpc_server``.

A connection to a server that breaks mid-service is not an error llama.cpp returns: its RPC
client aborts the process ("Remote RPC server crashed or returned malformed response"), so
the worker dies like any crash and the supervisor re-plans without the host.
"""

from __future__ import annotations

import ctypes
import pathlib
from typing import Any

import llama_cpp

_DEV_TYPE_CPU = 0  # enum ggml_backend_dev_type (ggml-backend.h)
_DEV_TYPE_GPU = 1
_DEV_TYPE_IGPU = 2


class RpcUnavailable(Exception):
    """This llama-cpp-python was built without the RPC backend (or lacks a symbol)."""


def _lib_dir() -> pathlib.Path:
    return pathlib.Path(llama_cpp.__file__).parent / "lib"


_libs: tuple[Any, Any] | None = None


def _load() -> tuple[Any, Any]:
    """(libggml-rpc, libggml) with the signatures used here; RpcUnavailable if absent."""
    global _libs
    if _libs is not None:
        return _libs
    import llama_cpp.llama_cpp  # noqa: F401  (loads libllama and its ggml first, once)

    rpc_path = _lib_dir() / "libggml-rpc.so"
    if not rpc_path.exists():
        raise RpcUnavailable(
            f"llama-cpp-python {llama_cpp.__version__} was built without the RPC backend "
            f"(no {rpc_path.name}); rebuild it with CMAKE_ARGS including -DGGML_RPC=ON (scripts/bootstrap.sh)"
        )
    try:
        rpc = ctypes.CDLL(str(rpc_path), mode=ctypes.RTLD_GLOBAL)
        ggml = ctypes.CDLL(str(_lib_dir() / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        for lib, name, res, args in (
            (rpc, "ggml_backend_rpc_add_server", vp, [cp]),
            (rpc, "ggml_backend_rpc_start_server", None, [cp, cp, sz, sz, ctypes.POINTER(vp)]),
            (ggml, "ggml_backend_reg_dev_count", sz, [vp]),
            (ggml, "ggml_backend_reg_dev_get", vp, [vp, sz]),
            (ggml, "ggml_backend_dev_count", sz, []),
            (ggml, "ggml_backend_dev_get", vp, [sz]),
            (ggml, "ggml_backend_dev_type", ctypes.c_int, [vp]),
            (ggml, "ggml_backend_dev_backend_reg", vp, [vp]),
            (ggml, "ggml_backend_reg_name", cp, [vp]),
            (ggml, "ggml_backend_dev_by_type", vp, [ctypes.c_int]),
            (ggml, "ggml_backend_dev_name", cp, [vp]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except (OSError, AttributeError) as e:
        raise RpcUnavailable(f"llama.cpp's RPC backend cannot be used: {e}") from None
    _libs = (rpc, ggml)
    return _libs


def supported() -> str | None:
    """None when the RPC backend can be used, else why not (for tests and the worker's errors)."""
    try:
        _load()
    except RpcUnavailable as e:
        return str(e)
    return None


def _local_gpus(ggml: Any) -> list[int]:
    """The local GPU devices as llama.cpp's default selection takes them (not RPC, not CPU)."""
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if ggml.ggml_backend_dev_type(dev) not in (_DEV_TYPE_GPU, _DEV_TYPE_IGPU):
            continue
        if ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev)) == b"RPC":
            continue
        out.append(dev)
    return out


def model_devices(rpc_devices: list[str]) -> tuple[Any, list[str]]:
    """(the NULL-terminated device array, its device names) for ``rpc_devices``
    ("host:port/device", the plan's order) followed by the local GPUs. Connects to each server:
    one that does not answer makes llama.cpp abort the process (the plan probed it just before)."""
    rpc, ggml = _load()
    devs: list[int] = []
    for item in rpc_devices:
        endpoint, _, index = item.rpartition("/")
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg or int(index) >= ggml.ggml_backend_reg_dev_count(reg):
            raise RpcUnavailable(f"rpc-server {endpoint} has no device {index}")
        devs.append(ggml.ggml_backend_reg_dev_get(reg, int(index)))
    devs += _local_gpus(ggml)
    arr = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
    names = [(ggml.ggml_backend_dev_name(d) or b"?").decode() for d in devs]
    return arr, names


def serve(endpoint: str, n_threads: int, device: str = "cpu", cache_dir: str | None = None) -> None:
    """Serve this host's ``device`` ("cpu" or "gpu": the first local GPU) on ``endpoint``
    (host:port) until the process is killed; returns only when the server cannot start."""
    rpc, ggml = _load()
    dev = ggml.ggml_backend_dev_by_type(_DEV_TYPE_CPU if device == "cpu" else _DEV_TYPE_GPU)
    if not dev:
        raise RpcUnavailable(f"no {device} device on this host")
    devs = (ctypes.c_void_p * 1)(dev)
    rpc.ggml_backend_rpc_start_server(
        endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devs
    )
