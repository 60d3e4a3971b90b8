"""Worker entry point: ``python -m worker --spec PATH`` (PATH holds a JSON LaunchSpec).

The one place in the worker process that configures logging, picks the event loop and
installs signal handlers. Every way of ending maps to a ``protocol.ExitCode``:
- spec missing / unreadable / invalid          -> BAD_SPEC   (do not restart)
- model file missing / unreadable / not GGUF   -> BAD_MODEL  (do not restart), checked
  here before llama.cpp is even imported
- out-of-memory lines logged by llama.cpp while loading -> OOM (re-plan smaller)
- SIGTERM / SIGINT (or the parent dying)       -> OK
- anything else                                -> FAILURE
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys

import msgspec

from worker.protocol import ExitCode, LaunchSpec, spec_decoder

log = logging.getLogger("worker")

_PR_SET_PDEATHSIG = 1
_MAX_UNIX_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would exit(2), which is not in our exit-code contract.
        raise _ArgError(message)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the supervisor dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except OSError as e:
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: %s", e)


def load_spec(path: str) -> LaunchSpec:
    """Read and validate the launch spec; ValueError with one clear line otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read launch spec {path}: {e.strerror or e}") from None
    try:
        spec = spec_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ValueError(f"invalid launch spec {path}: {e}") from None
    problems = []
    if spec.n_ctx < 0:
        problems.append("n_ctx must be >= 0")
    if spec.n_batch < 1:
        problems.append("n_batch must be >= 1")
    if spec.n_threads is not None and spec.n_threads < 1:
        problems.append("n_threads must be >= 1")
    if not 1 <= spec.parallel <= max(spec.n_batch, 1):
        problems.append("parallel must be between 1 and n_batch (one token per slot per step)")
    if spec.prefill_chunk < 1:
        problems.append("prefill_chunk must be >= 1")
    if spec.token_gap_ms < 1:
        problems.append("token_gap_ms must be >= 1")
    if spec.draft_max < 0:
        problems.append("draft_max must be >= 0")
    if spec.cache_ram_mib < 0:
        problems.append("cache_ram_mib must be >= 0")
    if spec.n_gpu_layers < -1:
        problems.append("n_gpu_layers must be >= -1")
    if spec.tensor_split is not None and any(x < 0 for x in spec.tensor_split):
        problems.append("tensor_split values must be >= 0")
    if spec.max_body_bytes < 1024:
        problems.append("max_body_bytes must be >= 1024")
    if not spec.socket_path:
        problems.append("socket_path must not be empty")
    elif len(os.fsencode(spec.socket_path)) > _MAX_UNIX_PATH:
        problems.append(f"socket_path is longer than the {_MAX_UNIX_PATH} bytes a Unix socket allows")
    if spec.chat_template and os.sep in spec.chat_template and not os.path.isfile(spec.chat_template):
        # A name without a separator is one of llama.cpp's built-in templates (checked at load).
        problems.append(f"chat_template file not found: {spec.chat_template}")
    if problems:
        raise ValueError(f"invalid launch spec {path}: " + "; ".join(problems))
    return spec


def check_model_file(path: str) -> str | None:
    """None if path looks like a GGUF file, else why not (one line)."""
    try:
        with open(path, "rb") as f:
            header = f.read(8)
    except FileNotFoundError:
        return f"model file not found: {path}"
    except IsADirectoryError:
        return f"model path is a directory, not a GGUF file: {path}"
    except OSError as e:
        return f"cannot read model file {path}: {e.strerror or e}"
    magic = header[:4]
    version = int.from_bytes(header[4:8], "little") if len(header) == 8 else None
    if magic != GGUF_MAGIC:
        return f"not a GGUF model file (bad magic {magic!r}): {path}"
    if version not in GGUF_VERSIONS:
        return f"unsupported GGUF version {version} (llama.cpp reads 2 and 3): {path}"
    return None


async def _run(spec: LaunchSpec) -> ExitCode:
    # Imported here: llama_cpp is slow to import and not needed to reject a bad spec/model.
    from worker.engine import Engine, LlamaLog
    from worker.server import serve

    llama_log = LlamaLog()
    llama_log.install()
    engine = Engine(spec, llama_log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(spec, engine, stop)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"worker[{os.getpid()}] %(levelname)s %(message)s",
    )
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        return ExitCode.OK  # the parent died before we could ask to follow it
    parser = _Parser(prog="python -m worker", description="vram-llm model worker")
    parser.add_argument("--spec", required=True, help="path of a JSON LaunchSpec")
    try:
        args = parser.parse_args(argv)
        spec = load_spec(args.spec)
    except (_ArgError, ValueError) as e:
        log.error("%s", e)
        return ExitCode.BAD_SPEC
    problem = check_model_file(spec.model_path)
    if problem is not None:
        log.error("%s", problem)
        return ExitCode.BAD_MODEL
    try:
        try:
            import uvloop
        except ImportError:
            return asyncio.run(_run(spec))
        return uvloop.run(_run(spec))
    except Exception as e:
        log.error("worker failed: %s: %s", type(e).__name__, e)
        return ExitCode.FAILURE


if __name__ == "__main__":
    code = int(main())
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a load thread stuck in llama.cpp must not hold the process open, and
    # freeing the model in finalizers at exit is work the OS does anyway.
    os._exit(code)
