#!/usr/bin/env python3
"""GPU truth check (issue 7): is vram-llm's plan right on a real NVIDIA GPU?

Run from a checkout on a GPU host (see bench/gpu/README.md for the carried payload):

    python3 bench/gpu_check.py --out DIR

1. Writes three GGUF models with zero weights (bench/gpu/models.py): a clone of the default
   SmolLM2-135M-Instruct (same metadata and tensors), a 1.7 GB llama model (32 layers,
   GQA) and a "ladder" model whose KV cache dominates.
2. For the first two, at two context sizes each: prints `vram-llm plan` (real NVML
   inventory), starts `vram-llm serve`, waits for /health, reads the worker's GPU memory
   per process through NVML and its llama.cpp buffer-size lines, and prints predicted vs
   measured MiB with the error in %.
3. OOM ladder: serves the ladder model with a simulated inventory that claims the real
   card (same UUID) has ~400 GB free, and a context whose KV cache cannot fit; the
   supervisor's out-of-memory ladder must end in a running worker.
4. UUID check: the GPU the worker uses (NVML per-process list, and the worker's own
   CUDA_VISIBLE_DEVICES) is the one the plan chose.
5. Writes results.json, results.md and the supervisor logs to DIR; stops everything.

Without a GPU it prints one line and exits 0. ``--dry-run-cpu`` runs every step except
NVML on this machine's CPU (simulated inventory, CPU llama.cpp) to prove the script.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import http.client
import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "gpu"))
sys.path.insert(0, str(REPO))

T0 = time.monotonic()
MIB = 1024 * 1024
PY = sys.executable


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def nvml_library_loads() -> str | None:
    """None if libnvidia-ml.so.1 loads, else why not (checked before importing anything
    that needs the project's dependencies, so a box without a GPU gets one line)."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        return f"libnvidia-ml.so.1 not loadable: {e}"
    return None


# --- environment for the child processes ------------------------------------------------------


def cuda_lib_dirs() -> list[str]:
    """Folders holding the CUDA 13 runtime libraries the llama.cpp CUDA build links
    (libcublas.so.13, libcudart.so.13) when the loader does not already know them."""
    wanted = ["libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13"]
    try:
        known = subprocess.run(["ldconfig", "-p"], check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        known = ""
    missing = [w for w in wanted if w not in known]
    roots: list[str] = []
    for sp in [*site.getsitepackages(), *sys.path]:
        if sp and os.path.isdir(os.path.join(sp, "nvidia")):
            roots.append(os.path.join(sp, "nvidia", "**"))
    roots += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/local/cuda-*/lib64",
              "/usr/local/cuda-*/targets/x86_64-linux/lib", "/opt/*/.venv/lib/python3*/site-packages/nvidia/**"]
    dirs: list[str] = []
    for w in missing:
        for r in roots:
            hits = sorted(glob.glob(os.path.join(r, w), recursive=True))
            if hits:
                d = os.path.dirname(hits[0])
                if d not in dirs:
                    dirs.append(d)
                break
    return dirs


def wide_lib_dirs() -> list[str]:
    """Last resort when llama_cpp cannot load: any folder under /usr, /opt or /usr/local/nvidia
    holding a CUDA library the build links (a slow search, done only after a failure)."""
    dirs: list[str] = []
    roots = [r for r in ("/usr/local/nvidia", "/usr/local", "/opt", "/usr/lib") if os.path.isdir(r)]
    for w in ("libcublas.so.13", "libcudart.so.13", "libcuda.so.1"):
        try:
            found = subprocess.run(["find", *roots, "-maxdepth", "9", "-name", w, "-print", "-quit"],
                                   check=False, capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.SubprocessError):
            found = []
        if found and os.path.dirname(found[0]) not in dirs:
            dirs.append(os.path.dirname(found[0]))
    return dirs


def child_env(extra_lib_dirs: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    pp = [str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pp))
    if extra_lib_dirs:
        ld = [*extra_lib_dirs, *[p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(ld))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def preflight(env: dict[str, str]) -> dict[str, Any]:
    """Can the worker's python import llama_cpp, and does it offload to the GPU?"""
    code = (
        "import json, llama_cpp; "
        "print(json.dumps({'version': llama_cpp.__version__, "
        "'gpu_offload': bool(llama_cpp.llama_supports_gpu_offload()), 'file': llama_cpp.__file__}))"
    )
    try:
        r = subprocess.run([PY, "-c", code], env=env, check=False, capture_output=True, text=True, timeout=120, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "importing llama_cpp took over 120 s"}
    if r.returncode != 0:
        out: dict[str, Any] = {"ok": False, "error": r.stderr.strip().splitlines()[-5:]}
        libs = glob.glob(os.path.join(os.path.dirname(_find_spec_dir("llama_cpp", env) or "/nonexistent"), "lib", "*.so*"))
        for lib in libs:
            ldd = subprocess.run(["ldd", lib], check=False, capture_output=True, text=True, env=env).stdout
            out.setdefault("ldd_not_found", []).extend(
                f"{os.path.basename(lib)}: {ln.strip()}" for ln in ldd.splitlines() if "not found" in ln
            )
        return out
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info["ok"] = True
    return info


def _find_spec_dir(name: str, env: dict[str, str]) -> str | None:
    r = subprocess.run(
        [PY, "-c", f"import importlib.util as u; s=u.find_spec({name!r}); print(s.origin if s else '')"],
        env=env, check=False, capture_output=True, text=True, timeout=30,
    )
    return r.stdout.strip() or None


# --- small HTTP helpers -----------------------------------------------------------------------


def http_json(port: int, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{port}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")[:500]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("worker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def worker_health(runtime_base: Path) -> dict[str, Any] | None:
    """The worker's own /health (AppliedParams: its CUDA_VISIBLE_DEVICES), over its socket."""
    socks = sorted(glob.glob(str(runtime_base / "vram-llm-*" / "worker-*.sock")), key=os.path.getmtime)
    if not socks:
        return None
    conn = _UnixHTTPConnection(socks[-1], 5.0)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        out: dict[str, Any] = json.loads(r.read())
        return out
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(pred: Callable[[], Any], timeout_s: float, poll_s: float = 0.5) -> Any:
    """Poll ``pred`` until it returns something truthy or the deadline passes (None)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


# --- NVML (through the project's adapter) -----------------------------------------------------


def gpu_inventory() -> Any:
    from supervisor.nvml import read_inventory

    return read_inventory()


def worker_gpu_mib(pid: int) -> dict[str, int]:
    """MiB per GPU UUID used by the worker and its children ({} without NVML)."""
    import psutil

    from supervisor.nvml import process_gpu_memory

    pids = [pid]
    try:
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        pass
    return process_gpu_memory(pids)


# --- llama.cpp buffer lines -------------------------------------------------------------------

_BUF_RE = re.compile(r"(?P<dev>[A-Za-z][\w-]*)\s+(?P<kind>model|KV|compute|output|RS)\s+buffer size\s*=\s*(?P<mib>[\d.]+) MiB")


def buffer_lines(log_path: Path, worker_pid: int | None) -> dict[str, Any]:
    """llama.cpp's '<dev> <kind> buffer size = X MiB' lines of one worker (from the supervisor log)."""
    lines: list[str] = []
    per_dev: dict[str, dict[str, float]] = {}
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return {"lines": [], "per_device": {}}
    tag = f"worker[{worker_pid}]" if worker_pid else ""
    for ln in text.splitlines():
        if tag and tag not in ln:
            continue
        m = _BUF_RE.search(ln)
        if m:
            lines.append(ln[ln.find("llama.cpp:"):] if "llama.cpp:" in ln else ln)
            d = per_dev.setdefault(m["dev"], {})
            d[m["kind"]] = d.get(m["kind"], 0.0) + float(m["mib"])
    return {"lines": lines, "per_device": per_dev}


def gpu_buffer_mib(per_dev: dict[str, dict[str, float]]) -> dict[str, float]:
    """Sum of the CUDA device buffers by kind (CUDA_Host and CPU buffers are host RAM)."""
    out: dict[str, float] = {}
    for dev, kinds in per_dev.items():
        if dev.startswith("CUDA") and not dev.startswith("CUDA_Host"):
            for k, v in kinds.items():
                out[k] = round(out.get(k, 0.0) + v, 2)
    return out


# --- one supervisor run -----------------------------------------------------------------------


class Serve:
    """`vram-llm serve` in its own process group, its log in a file; stop() always reaps."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, runtime_base: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.runtime_base = runtime_base
        self.log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process; closed in stop()
        cmd = [PY, "-m", "supervisor", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        say("$ " + " ".join(cmd[1:]))
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.worker_pids: set[int] = set()

    def status(self) -> dict[str, Any] | None:
        code, body = http_json(self.port, "/status", timeout=10)
        if code == 200 and isinstance(body, dict):
            w = body.get("worker") or {}
            if w.get("pid"):
                self.worker_pids.add(int(w["pid"]))
            return body
        return None

    def wait_ready(self, timeout_s: float, fail_on_restart: bool = False) -> tuple[str, dict[str, Any] | None]:
        """'ready', 'failed', 'restarted', 'exited' or 'timeout', and the last /status seen.

        ``fail_on_restart``: a worker failure ends the wait at once (a measurement run
        should never need a restart; waiting out the backoff wastes device time)."""
        last: dict[str, Any] | None = None

        def check() -> str | None:
            nonlocal last
            if self.proc.poll() is not None:
                return "exited"
            st = self.status()
            if st is not None:
                last = st
                if st.get("state") == "ready":
                    return "ready"
                if st.get("state") == "failed":
                    return "failed"
                if fail_on_restart and st.get("restarts"):
                    return "restarted"
            return None

        return wait_for(check, timeout_s, 0.5) or "timeout", last

    def stop(self, timeout_s: float = 40.0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out["exit_code"] = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                out["killed"] = True
                _killpg(self.proc.pid)
                out["exit_code"] = self.proc.wait(10)
        else:
            out["exit_code"] = self.proc.returncode
        _killpg(self.proc.pid)  # anything left in the supervisor's group
        alive = [p for p in self.worker_pids if not _gone_within(p, 10.0)]
        for p in alive:
            _killpg(p)
        out["workers_left_running"] = alive
        out["runtime_dirs_left"] = [os.path.basename(p) for p in glob.glob(str(self.runtime_base / "vram-llm-*"))]
        self.log.close()
        return out


def _alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _gone_within(pid: int, timeout_s: float) -> bool:
    return wait_for(lambda: not _alive(pid), timeout_s, 0.2) is not None


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- the check --------------------------------------------------------------------------------


class Check:
    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.args = args
        self.env = env
        self.out = Path(args.out)
        self.work = Path(args.workdir)
        self.runtime_base = Path(tempfile.mkdtemp(prefix="gc-"))  # short: Unix socket paths
        self.results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cases": []}
        self.dry = bool(args.dry_run_cpu)
        self.sim_file: Path | None = None

    def merge_log(self, label: str, log_path: Path) -> None:
        """One file for every run's supervisor log: the device returns at most 8 files."""
        with open(self.out / "serve-logs.txt", "ab") as f:
            f.write(f"\n===== {label} =====\n".encode())
            try:
                f.write(log_path.read_bytes())
            except OSError:
                pass
        log_path.unlink(missing_ok=True)

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def config(self, name: str, n_batch: int | None = None, worker_command: list[str] | None = None) -> Path:
        p = self.work / f"{name}.toml"
        lines = ["[server]", f'runtime_dir = "{self.runtime_base}"', "", "[restart]", "oom_settle_timeout_s = 10.0"]
        if n_batch is not None:
            lines += ["", "[model]", f"n_batch = {n_batch}"]
        if worker_command is not None:
            lines += ["", "[worker]", "command = " + json.dumps(worker_command)]
        p.write_text("\n".join(lines) + "\n")
        return p

    def plan(self, model: Path, ctx: int, cfg: Path, sim: Path | None) -> tuple[dict[str, Any] | None, str]:
        base = [PY, "-m", "supervisor", "plan", "--model", str(model), "--ctx-size", str(ctx), "--config", str(cfg)]
        if sim is not None:
            base += ["--simulate-gpus", str(sim)]
        text = subprocess.run(base, cwd=REPO, env=self.env, check=False, capture_output=True, text=True, timeout=60)
        js = subprocess.run([*base, "--json"], cwd=REPO, env=self.env, check=False, capture_output=True, text=True, timeout=60)
        try:
            return json.loads(js.stdout), text.stdout + text.stderr
        except ValueError:
            return None, text.stdout + text.stderr + js.stderr

    # -- predicted vs measured for one (model, ctx) --

    def measure(self, label: str, model: Path, ctx: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"case": label, "model": model.name, "ctx": ctx, "kind": "measure"}
        self.results["cases"].append(rec)
        cfg = self.config(label)
        say(f"=== {label}: plan")
        plan, text = self.plan(model, ctx, cfg, self.sim_file)
        print(text.rstrip(), flush=True)
        rec["plan"] = plan
        if plan is None:
            rec["error"] = "vram-llm plan failed"
            return rec
        before = {g.uuid: g.used_mib for g in gpu_inventory().gpus} if not self.dry else {}
        args = ["--model", str(model), "--ctx-size", str(ctx), "--config", str(cfg)]
        if self.sim_file is not None:
            args += ["--simulate-gpus", str(self.sim_file)]
        log_path = self.work / f"serve-{label}.log"
        srv = Serve(args, self.env, log_path, self.runtime_base)
        try:
            state, st = srv.wait_ready(self.args.ready_timeout, fail_on_restart=True)
            rec["state"] = state
            say(f"{label}: supervisor state {state}")
            if state != "ready" or st is None:
                rec["error"] = f"worker not ready ({state})"
                rec["status"] = st
                tail = (st or {}).get("stderr_tail") or []
                say(f"{label}: NOT READY; last exit {(st or {}).get('last_exit')}; worker output tail:")
                for ln in tail[-15:]:
                    print("    " + ln, flush=True)
                return rec
            wpid = int(st["worker"]["pid"])
            rec["worker_pid"] = wpid
            wh = worker_health(self.runtime_base)
            rec["worker_params"] = (wh or {}).get("params")
            rec["measured_ready_mib"] = worker_gpu_mib(wpid)
            t = time.monotonic()
            code, body = http_json(srv.port, "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}, timeout=60)
            rec["request"] = {"status": code, "seconds": round(time.monotonic() - t, 2),
                              "usage": body.get("usage") if isinstance(body, dict) else None}
            if code != 200:
                rec["request"]["body"] = body
            rec["measured_mib"] = worker_gpu_mib(wpid)
            after = {g.uuid: g.used_mib for g in gpu_inventory().gpus} if not self.dry else {}
            rec["device_used_delta_mib"] = {u: after[u] - before.get(u, 0) for u in after}
            bl = buffer_lines(log_path, wpid)
            rec["llama_buffers"] = bl
            rec["llama_gpu_buffers_mib"] = gpu_buffer_mib(bl["per_device"])
            rec["compare"] = compare(plan, rec["measured_mib"], rec["llama_gpu_buffers_mib"])
            rec["uuid_check"] = uuid_check(plan, rec["measured_mib"], rec["worker_params"], self.dry)
            for c in rec["compare"]:
                say(f"{label}: GPU {c['index']} predicted {c['predicted_mib']} MiB, measured {c['measured_mib']} MiB"
                    f" ({fmt_pct(c['error_pct'])}); estimate {c['estimate']}; llama.cpp {c['llama_gpu_buffers_mib']}")
            say(f"{label}: UUID check {rec['uuid_check']['ok']}: {rec['uuid_check']['detail']}")
        finally:
            rec["stop"] = srv.stop()
            say(f"{label}: stopped {rec['stop']}")
            self.merge_log(label, log_path)
            self.save()
        return rec

    # -- the OOM ladder --

    def ladder(self, model: Path, n_layer: int, kv_bytes_per_token_layer: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"case": "oom-ladder", "model": model.name, "kind": "ladder"}
        self.results["cases"].append(rec)
        if self.dry:
            ctx = 4096
            sim = self.sim_file
        else:
            g = gpu_inventory().gpus[0]
            # KV of 3/4 of the layers = 88% of the card: the full plan (all layers) cannot
            # load; the ladder's "3/4 of the layers on GPU" step can.
            gpu_layers = n_layer * 3 // 4
            ctx = int(0.88 * g.total_mib * MIB / (gpu_layers * kv_bytes_per_token_layer)) // 256 * 256
            sim = self.work / "sim-ladder.json"
            sim.write_text(json.dumps([{
                "index": g.index, "uuid": g.uuid, "name": f"{g.name} (claimed 400000 MiB free)",
                "total_mib": 409600, "free_mib": 400000, "pci_bus_id": g.pci_bus_id,
            }]))
            rec["real_gpu"] = {"uuid": g.uuid, "total_mib": g.total_mib, "free_mib": g.free_mib}
            rec["kv_full_mib"] = ctx * n_layer * kv_bytes_per_token_layer // MIB
        rec["ctx"] = ctx
        env = self.env
        fake = REPO / "tests" / "fake_worker.py"
        if self.dry and fake.exists():
            # No GPU to run out of: the project's fake worker plays llama.cpp's CUDA OOM
            # whenever more than 30 layers are asked for, so the ladder code here still runs.
            cfg = self.config("oom-ladder", n_batch=64, worker_command=[PY, str(fake)])
            env = {**env, "FAKE_WORKER_OOM_ABOVE_LAYERS": str(n_layer * 3 // 4)}
            rec["fake_worker"] = True
        else:
            cfg = self.config("oom-ladder", n_batch=64)
        say(f"=== oom-ladder: ctx {ctx}, KV of all {n_layer} layers {rec.get('kv_full_mib')} MiB")
        plan, text = self.plan(model, ctx, cfg, sim)
        print(text.rstrip(), flush=True)
        rec["first_plan"] = plan
        assert sim is not None
        log_path = self.work / "serve-oom-ladder.log"
        srv = Serve(["--model", str(model), "--ctx-size", str(ctx), "--config", str(cfg), "--simulate-gpus", str(sim)],
                    env, log_path, self.runtime_base)
        try:
            state, st = srv.wait_ready(self.args.ladder_timeout)
            rec["state"] = state
            st = srv.status() or st
            if st is not None:
                rec["restart_history"] = st.get("restart_history")
                rec["oom_adjustment"] = st.get("oom_adjustment")
                rec["final_plan"] = st.get("plan")
                rec["last_exit"] = st.get("last_exit")
                if state != "ready":
                    rec["stderr_tail"] = st.get("stderr_tail")
            say(f"oom-ladder: state {state}; {len(rec.get('restart_history') or [])} restarts; "
                f"adjustment: {rec.get('oom_adjustment')}")
            for r in rec.get("restart_history") or []:
                say(f"  restart: {r.get('kind')}: {r.get('reason')}")
            fp = rec.get("final_plan") or {}
            rec["final"] = {k: fp.get(k) for k in ("n_gpu_layers", "offloaded_layers", "n_ctx", "cpu_only", "env")}
            say(f"oom-ladder: final plan {rec['final']}")
            if state == "ready" and st is not None:
                wpid = int(st["worker"]["pid"])
                code, _ = http_json(srv.port, "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=60)
                rec["request_status"] = code
                rec["measured_mib"] = worker_gpu_mib(wpid)
                rec["worker_params"] = (worker_health(self.runtime_base) or {}).get("params")
                bl = buffer_lines(log_path, wpid)
                rec["llama_gpu_buffers_mib"] = gpu_buffer_mib(bl["per_device"])
                rec["llama_buffer_lines"] = bl["lines"]
                if fp:
                    rec["uuid_check"] = uuid_check(fp, rec["measured_mib"], rec["worker_params"], self.dry)
                say(f"oom-ladder: worker {wpid} uses {rec['measured_mib']} MiB; llama.cpp {rec['llama_gpu_buffers_mib']}")
            oom_steps = [r for r in rec.get("restart_history") or [] if r.get("kind") == "oom"]
            rec["ok"] = state == "ready" and (bool(oom_steps) or self.dry)
        finally:
            rec["stop"] = srv.stop()
            say(f"oom-ladder: stopped {rec['stop']}")
            self.merge_log("oom-ladder", log_path)
            self.save()
        return rec


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f}%"


def chosen_gpus(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in plan.get("gpus", []) if g.get("cuda_index") is not None and not g.get("excluded_reason")
            and (g.get("layers") or g.get("has_output"))]


def compare(plan: dict[str, Any], measured: dict[str, int], buffers: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for g in chosen_gpus(plan):
        e = g["estimate"]
        pred = e.get("total_mib", g.get("planned_mib"))
        meas = measured.get(g["uuid"])
        err = None if not meas else (pred - meas) / meas * 100.0
        llama_total = round(sum(buffers.values()), 1) if buffers else None
        out.append({
            "index": g["index"], "uuid": g["uuid"], "predicted_mib": pred, "measured_mib": meas,
            "error_pct": None if err is None else round(err, 2),
            "within_10pct": None if err is None else abs(err) <= 10.0,
            "estimate": {k: e[k] for k in ("weights_mib", "kv_mib", "compute_mib", "fixed_mib")},
            "llama_gpu_buffers_mib": buffers,
            # What the process holds beyond llama.cpp's buffers: CUDA context, cuBLAS, pools.
            "overhead_mib": None if (meas is None or llama_total is None) else round(meas - llama_total, 1),
        })
    return out


def uuid_check(plan: dict[str, Any], measured: dict[str, int], params: dict[str, Any] | None,
               dry: bool) -> dict[str, Any]:
    want = [g["uuid"] for g in chosen_gpus(plan)]
    env_cvd = (plan.get("env") or {}).get("CUDA_VISIBLE_DEVICES")
    worker_cvd = (params or {}).get("cuda_visible_devices")
    used = sorted(u for u, mib in measured.items() if mib)
    problems = []
    if env_cvd != ",".join(want):
        problems.append(f"plan env CUDA_VISIBLE_DEVICES={env_cvd!r} is not the chosen GPUs {want}")
    if worker_cvd != env_cvd:
        problems.append(f"worker sees CUDA_VISIBLE_DEVICES={worker_cvd!r}, plan says {env_cvd!r}")
    if not dry and sorted(want) != used:
        problems.append(f"NVML shows the worker on {used}, plan chose {want}")
    detail = "; ".join(problems) or f"worker on {used or want} = plan's choice, CUDA_VISIBLE_DEVICES={env_cvd}"
    return {"ok": not problems, "chosen": want, "plan_env": env_cvd, "worker_env": worker_cvd,
            "nvml_worker_gpus": used, "detail": detail}


def table(results: dict[str, Any]) -> str:
    rows = [["case", "gpu", "predicted", "measured", "error", "estimate w+kv+comp+ctx", "llama.cpp model/KV/compute",
             "overhead", "uuid"]]
    for c in results["cases"]:
        if c["kind"] == "measure":
            for x in c.get("compare") or [{}]:
                e = x.get("estimate") or {}
                b = x.get("llama_gpu_buffers_mib") or {}
                rows.append([
                    c["case"], str(x.get("index", "-")), str(x.get("predicted_mib", "-")),
                    str(x.get("measured_mib", "-")), fmt_pct(x.get("error_pct")),
                    "+".join(str(e.get(k, "?")) for k in ("weights_mib", "kv_mib", "compute_mib", "fixed_mib")),
                    "/".join(str(b.get(k, 0)) for k in ("model", "KV", "compute")),
                    str(x.get("overhead_mib", "-")),
                    "ok" if (c.get("uuid_check") or {}).get("ok") else (c.get("error") or "FAIL"),
                ])
        else:
            f = c.get("final") or {}
            n_oom = len([r for r in c.get("restart_history") or [] if r.get("kind") == "oom"])
            verdict = "ready" if c.get("ok") else (
                "ready, no OOM provoked" if c.get("state") == "ready" else f"NOT READY ({c.get('state')})")
            rows.append([
                c["case"], "-", f"ctx {c.get('ctx')}", ",".join(str(v) for v in (c.get("measured_mib") or {}).values()) or "-",
                verdict, f"{n_oom} OOM restarts",
                f"final: {f.get('offloaded_layers')} layers, ctx {f.get('n_ctx')}", "",
                "ok" if (c.get("uuid_check") or {}).get("ok") else "-",
            ])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(r[i].ljust(w[i]) for i in range(len(r))) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(lines)


def make_models(work: Path, meta_path: Path, dry: bool) -> dict[str, tuple[Path, Any]]:
    import models as m
    from gguf import GGMLQuantizationType

    meta = m.load_meta(meta_path)
    big = (m.LlamaShape("gpu-check big 1.7B", 32, 2048, 5632, 32, 4, 32768) if not dry
           else m.LlamaShape("gpu-check big (dry run)", 4, 512, 1408, 8, 4, 32768))
    # KV-heavy: 4 KV heads x 256 dims over 40 layers (160 KiB per token), few query heads,
    # so the KV cache (which follows the layers) and not the compute buffer decides the fit.
    ladder = m.LlamaShape("gpu-check ladder", 40, 1024, 1024, 4, 4, 1 << 20, GGMLQuantizationType.Q8_0, tied=True)
    jobs = {
        "smollm2": (work / "smollm2-clone.gguf", None),
        "big": (work / "big.gguf", big),
        "ladder": (work / "ladder.gguf", ladder),
    }
    with ProcessPoolExecutor(3) as ex:
        futs = {
            k: (ex.submit(m.smollm2_clone, meta, p) if shape is None else ex.submit(m.llama_model, meta, shape, p))
            for k, (p, shape) in jobs.items()
        }
        for k, f in futs.items():
            say(f"model {k}: {jobs[k][0]} {f.result() / MIB:.0f} MiB")
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu-check"), help="results folder")
    ap.add_argument("--workdir", default=None, help="where the models go (default: a temp folder under bench/results)")
    ap.add_argument("--meta", default=str(REPO / ".gpu" / "smollm2-meta.json.xz"),
                    help="the default model's metadata dump (bench/gpu/extract_meta.py)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="no GPU: simulated inventory, CPU llama.cpp, small models; proves the script")
    ap.add_argument("--ready-timeout", type=float, default=150.0)
    ap.add_argument("--ladder-timeout", type=float, default=240.0)
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="stop starting new cases after about this many seconds in all")
    ap.add_argument("--skip-ladder", action="store_true")
    ap.add_argument("--keep-models", action="store_true", help="keep the workdir (models, configs)")
    args = ap.parse_args()

    if not args.dry_run_cpu:
        why = nvml_library_loads()
        if why is None:
            try:
                inv = gpu_inventory()
            except ImportError as e:
                print(f"gpu_check: cannot import the supervisor ({e}); see bench/gpu/README.md")
                return 2
            why = None if inv.gpus else (inv.note or "NVML reports no GPU")
        if why is not None:
            print(f"gpu_check: no NVIDIA GPU here ({why}); nothing to check")
            return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-", dir=REPO / "bench" / "results"))
    work.mkdir(parents=True, exist_ok=True)
    args.workdir = str(work)
    env = child_env(cuda_lib_dirs())
    chk = Check(args, env)
    res = chk.results
    rc = 0
    try:
        res["lib_dirs_added"] = env.get("LD_LIBRARY_PATH", "")
        pf = preflight(env)
        if not pf.get("ok") and not args.dry_run_cpu:
            say(f"llama_cpp does not load: {pf}; searching wider for the CUDA libraries")
            wider = wide_lib_dirs()
            say(f"found: {wider}")
            env = child_env([*cuda_lib_dirs(), *wider])
            chk.env = env
            res["lib_dirs_added"] = env.get("LD_LIBRARY_PATH", "")
            pf = preflight(env)
        res["llama_cpp"] = pf
        say(f"llama_cpp: {pf}")
        if not pf.get("ok") or (not args.dry_run_cpu and not pf.get("gpu_offload")):
            say("llama_cpp cannot offload to the GPU: stopping here")
            chk.save()
            return 1
        if args.dry_run_cpu:
            chk.sim_file = work / "sim-dry.json"
            chk.sim_file.write_text(json.dumps([{
                "index": 0, "uuid": "GPU-00000000-0000-0000-0000-00000000d2e1", "name": "simulated (dry run)",
                "total_mib": 24564, "free_mib": 24000,
            }]))
            res["gpus"] = "simulated (dry run)"
        else:
            inv = gpu_inventory()
            res["gpus"] = [g.__dict__ for g in inv.gpus]
            for g in inv.gpus:
                say(f"GPU {g.index}: {g.name} {g.uuid} total {g.total_mib} MiB, free {g.free_mib} MiB")
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                     check=False, capture_output=True, text=True, timeout=20).stdout.strip()
                res["nvidia_smi"] = smi
            except (OSError, subprocess.SubprocessError):
                pass
        models = make_models(work, Path(args.meta), args.dry_run_cpu)
        smol, big, ladder = models["smollm2"][0], models["big"][0], models["ladder"][0]
        big_ctx = (4096, 32768) if not args.dry_run_cpu else (4096, 8192)
        cases = [("smollm2-2048", smol, 2048), ("smollm2-16384", smol, 16384),
                 (f"big-{big_ctx[0]}", big, big_ctx[0]), (f"big-{big_ctx[1]}", big, big_ctx[1])]
        for label, model, ctx in cases:
            # Keep time for the ladder: a run cut off by the device's limit returns less.
            if time.monotonic() - T0 > args.budget_s - 150:
                say(f"{label}: skipped (time budget of {args.budget_s:.0f}s)")
                res["cases"].append({"case": label, "kind": "measure", "error": "skipped: time budget"})
                continue
            chk.measure(label, model, ctx)
        args.ladder_timeout = max(30.0, min(args.ladder_timeout, args.budget_s - (time.monotonic() - T0) - 20))
        if not args.skip_ladder:
            # KV bytes per token per layer: K and V, 4 heads x 256 dims, f16.
            chk.ladder(ladder, 40, 2 * 4 * 256 * 2)
    except KeyboardInterrupt:
        rc = 130
    finally:
        res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        res["seconds"] = round(time.monotonic() - T0, 1)
        chk.save()
        tbl = table(res)
        (out / "results.md").write_text(f"# gpu_check {res['started']}\n\n{tbl}\n")
        print(tbl, flush=True)
        if not args.keep_models:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(chk.runtime_base, ignore_errors=True)
    bad = [c for c in res["cases"] if c.get("error") or (c["kind"] == "ladder" and not c.get("ok"))
           or (c.get("uuid_check") and not c["uuid_check"]["ok"])
           or any(x.get("within_10pct") is False for x in c.get("compare") or [])]
    say(f"done: {len(res['cases'])} cases, {len(bad)} not ok; results in {out}")
    return rc or (1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main())
