"""--use-fit-params: ask llama.cpp's own ``llama-fit-params`` tool for the layer split.

How the tool works (llama.cpp tools/fit-params/fit-params.cpp): it loads the model's
metadata, measures the devices' free memory through ggml, fits -c / -ngl / -ts to leave
``--fit-target`` MiB free on each device (comma-separated, one per device, or one for all),
and prints ONE line of llama CLI arguments on stdout, e.g.::

    -c 4096 -ngl 33 -ts 20,13

``-ts`` holds per-device layer counts and is printed only for more than one device; an
``-ot "pattern=buffer,..."`` part (tensor overrides, MoE models) may follow and is not
used by us. Exit status 1 means it could not fit. Logs go to stderr.

It sees the devices through CUDA, so it must run with the worker's environment (the
plan's CUDA_VISIBLE_DEVICES), and its per-device answer is then in plan order.
This module runs it with a timeout and parses that line; the planner stays pure and takes
the parsed ``FitParams`` (or the error string) as an input.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from supervisor.planner import FitParams
from worker.protocol import FlashAttn

DEFAULT_TIMEOUT_S = 120.0


def parse_output(stdout: str) -> FitParams:
    """Parse the last non-empty stdout line. ValueError with a reason if it is not one."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("printed nothing on stdout")
    try:
        toks = shlex.split(lines[-1])
    except ValueError as e:
        raise ValueError(f"unparsable output {lines[-1]!r}: {e}") from None
    n_ctx: int | None = None
    ngl: int | None = None
    ts: tuple[float, ...] = ()
    i = 0
    try:
        while i < len(toks):
            flag = toks[i]
            val = toks[i + 1] if i + 1 < len(toks) else None
            if val is None:
                raise ValueError(f"flag {flag} has no value")
            if flag in ("-c", "--ctx-size"):
                n_ctx = int(val)
            elif flag in ("-ngl", "--gpu-layers", "--n-gpu-layers"):
                ngl = int(val)
            elif flag in ("-ts", "--tensor-split"):
                ts = tuple(float(x) for x in val.replace("/", ",").split(","))
            # -ot and anything newer: not used by the plan.
            i += 2
    except ValueError as e:
        raise ValueError(f"unparsable output {lines[-1]!r}: {e}") from None
    if n_ctx is None or ngl is None:
        raise ValueError(f"output {lines[-1]!r} lacks -c or -ngl")
    if n_ctx < 0 or any(x < 0 for x in ts):
        raise ValueError(f"output {lines[-1]!r} has negative values")
    return FitParams(n_ctx=n_ctx, n_gpu_layers=ngl, tensor_split=ts)


def run_fit_params(
    command: str,
    model_path: str,
    reserves_mib: Sequence[int],
    n_ctx: int,
    n_batch: int,
    flash_attn: FlashAttn,
    env: Mapping[str, str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> FitParams | str:
    """Run the tool; the parsed answer, or a one-line reason why there is none.

    ``command`` is shell-quoted (a path or a name on PATH plus fixed arguments);
    ``reserves_mib`` is our reserve per device in plan order, passed as --fit-target;
    ``env`` is added to the current environment (the plan's CUDA variables).
    """
    argv = shlex.split(command)
    if not argv:
        return "gpu.fit_params_command is empty"
    exe = shutil.which(argv[0])
    if exe is None:
        return f"{argv[0]!r} not found (install llama.cpp's tools or set gpu.fit_params_command)"
    target = ",".join(str(r) for r in reserves_mib) or "1024"
    argv = [exe, *argv[1:], "-m", model_path, "-c", str(n_ctx), "-b", str(n_batch), "--fit-target", target]
    argv += ["-fa", flash_attn]
    try:
        proc = subprocess.run(
            argv,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not answer within {timeout_s:g} s"
    except OSError as e:
        return f"cannot run {argv[0]}: {e.strerror}"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return f"{argv[0]} exited with status {proc.returncode}: {tail}"
    try:
        return parse_output(proc.stdout)
    except ValueError as e:
        return f"{argv[0]} {e}"
