"""Every process the benchmark starts, and the guarantee that none outlives it.

Rules of this module:
- Each process starts in its own session (process group). ``Procs.close()`` sends SIGTERM
  to every group, waits until a deadline, then SIGKILLs what is left and reaps it.
- Processes the children start themselves (the supervisor's workers) are tracked by pid
  as they are seen; after shutdown, any that still runs is an orphan: it is counted
  (the chaos table reports it) and then killed, so the bench never leaves one behind.
- Everything listens on 127.0.0.1 or a Unix socket in the bench's temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 20.0


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The options of a bench that runs vram-llm beside llama-server on the same model."""
    p.add_argument("--model", help="GGUF model (default: the embedded SmolLM2-135M)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), metavar="PATH")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--ctx-size", type=int, default=4096)


def run_and_report(
    name: str, a: argparse.Namespace, run: Callable[[str], dict[str, Any]], render: Callable[[dict[str, Any]], str],
) -> int:
    """The end of a comparison bench's main: ``run(model)`` on ``a.model`` (default: the
    embedded model), its table printed, the JSON written to ``a.json_out``; 1 on a failure.
    A SIGTERM (a timeout, a wrapper's Ctrl-C) unwinds through Procs: no server left behind."""
    from supervisor.default_model import default_model_path

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    model = str(Path(a.model).resolve()) if a.model else str(default_model_path())
    try:
        res = run(model)
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"{name}: failed: {e}", file=sys.stderr)
        return 1
    print(render(res))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2))
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Call predicate until it returns something truthy; raise after timeout seconds.

    An OSError from the predicate means "not yet" (nothing listening yet); any other
    exception (the process being waited for has exited) ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            v = predicate()
            if v:
                return v
        except OSError as e:  # the thing polled may not exist yet
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last!r})")
        time.sleep(interval)


def http_get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"null")
        except ValueError:
            return e.code, None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] | None


@dataclass
class Procs:
    """The processes of one bench run. Use as a context manager."""

    tmp: Path
    started: list[Started] = field(default_factory=list)
    seen_children: set[int] = field(default_factory=set)
    children_of: dict[str, set[int]] = field(default_factory=dict)  # by Started.name
    orphans: list[str] = field(default_factory=list)

    def __enter__(self) -> Procs:  # noqa: PYI034 (typing.Self is 3.11+)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
    ) -> Started:
        log_path = self.tmp / f"{name}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 (open while the process runs; closed in stop())
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(
            argv,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log_file,
            stderr=log_file,
            env=full_env,
            cwd=str(REPO),
            start_new_session=True,  # own process group: close() kills the whole group
        )
        s = Started(name, proc, log_path, log_file)
        self.started.append(s)
        return s

    def note_children(self) -> None:
        """Remember every descendant now alive (workers a supervisor started)."""
        for s in self.started:
            try:
                pids = {c.pid for c in psutil.Process(s.proc.pid).children(recursive=True)}
            except psutil.Error:
                continue
            self.seen_children.update(pids)
            self.children_of.setdefault(s.name, set()).update(pids)

    def stop(self, s: Started, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the group, wait, SIGKILL; return the exit code (None if it was killed)."""
        proc = s.proc
        code: int | None = None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.orphans.append(f"{s.name} pid {proc.pid} ignored SIGTERM for {timeout:.0f}s")
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        else:
            code = proc.returncode
        # The group may still hold children after its leader exited.
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdin:
            with _suppress():
                proc.stdin.close()
        if proc.stdout:
            with _suppress():
                proc.stdout.close()
        if s.log_file is not None and not s.log_file.closed:
            s.log_file.close()
        return code

    def close(self) -> None:
        """Stop everything, newest first; count and kill any descendant left behind."""
        self.note_children()
        for s in reversed(self.started):
            self.stop(s)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(_alive(p) for p in self.seen_children):
            time.sleep(0.05)
        for pid in sorted(self.seen_children):
            if _alive(pid):
                self.orphans.append(f"pid {pid} outlived its parent")
                with _suppress():
                    os.killpg(pid, signal.SIGKILL)
                with _suppress():
                    os.kill(pid, signal.SIGKILL)
        self.seen_children.clear()

    def log_tail(self, s: Started, n: int = 30) -> str:
        if s.log_file is not None and not s.log_file.closed:
            s.log_file.flush()
        try:
            return "\n".join(s.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, *_: object) -> bool:
        return et is not None and issubclass(et, (ProcessLookupError, PermissionError, OSError))


# --- the things the bench starts ------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


@dataclass
class Supervisor:
    started: Started
    base: str
    runtime: Path

    @property
    def pid(self) -> int:
        return self.started.proc.pid

    def status(self) -> dict[str, Any]:
        code, st = http_get_json(self.base + "/status")
        if code != 200:
            raise RuntimeError(f"/status answered {code}")
        return st  # type: ignore[no-any-return]

    def worker_pid(self) -> int | None:
        w = self.status().get("worker")
        return int(w["pid"]) if w else None


def start_supervisor(
    procs: Procs, model: str, threads: int, n_ctx: int, log_level: str = "WARNING",
    model_settings: dict[str, Any] | None = None,
) -> Supervisor:
    """``model_settings``: more [model] keys (reranking, parallel, ...)."""
    port = free_port()
    runtime = procs.tmp / "run"
    runtime.mkdir(exist_ok=True)
    sections: dict[str, dict[str, Any]] = {
        "model": {"path": model, "threads": threads, "ctx_size": n_ctx, **(model_settings or {})},
        "server": {"host": "127.0.0.1", "port": port, "runtime_dir": str(runtime)},
        # Restart immediately and never give up: the restart-cost and chaos phases kill the
        # worker dozens of times on purpose; the default back-off (1 s, doubling, give up
        # after 5) is a product choice measured separately from the restart itself.
        "restart": {"backoff_initial_s": 0.01, "backoff_max_s": 0.01, "max_failures": 100000},
        "admission": {"queue_size": 256, "wait_timeout_s": 60.0},
    }
    lines: list[str] = []
    for sec, kv in sections.items():
        lines.append(f"[{sec}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in kv.items())
    cfg = procs.tmp / "supervisor.toml"
    cfg.write_text("\n".join(lines) + "\n")
    s = procs.start("supervisor", [sys.executable, "-m", "supervisor", "serve", "--config", str(cfg), "--log-level", log_level])
    sup = Supervisor(s, f"http://127.0.0.1:{port}", runtime)
    wait_http_ok(procs, s, sup.base + "/health", 300.0)
    procs.note_children()
    return sup


def wait_http_ok(procs: Procs, s: Started, url: str, timeout: float) -> None:
    def ready() -> bool:
        if s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} exited with code {s.proc.returncode}:\n{procs.log_tail(s)}")
        return http_get_json(url, 2.0)[0] == 200

    try:
        poll(ready, timeout, f"{s.name} at {url}", 0.05)
    except RuntimeError:
        raise
    except TimeoutError as e:
        raise RuntimeError(f"{e}\n{procs.log_tail(s)}") from None


def start_worker(procs: Procs, model: str, threads: int, n_ctx: int, n_gpu_layers: int) -> tuple[Started, str]:
    """The bare worker on its own Unix socket: the 'direct' column."""
    from supervisor.launch import default_spec
    from worker.protocol import encoder

    sock = str(procs.tmp / "direct.sock")
    spec = default_spec(model, sock, n_threads=threads, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
    spec_path = procs.tmp / "direct.spec.json"
    spec_path.write_bytes(encoder.encode(spec))
    s = procs.start("worker-direct", [sys.executable, "-m", "worker", "--spec", str(spec_path)])

    def ready() -> bool:
        if s.proc.poll() is not None:
            raise RuntimeError(f"direct worker exited with code {s.proc.returncode}:\n{procs.log_tail(s)}")
        if not os.path.exists(sock):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(2.0)
            c.connect(sock)
            c.sendall(b"GET /health HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
            return c.recv(64).startswith(b"HTTP/1.1 200")

    poll(ready, 300.0, "the direct worker", 0.05)
    return s, sock


class InProc:
    """The llama_cpp.Llama column, in a child process (bench/inproc.py)."""

    def __init__(self, procs: Procs, model: str, threads: int, n_ctx: int, n_gpu_layers: int) -> None:
        self.procs = procs
        self.s = procs.start(
            "inproc",
            [sys.executable, "-m", "bench.inproc", "--model", model, "--threads", str(threads),
             "--n-ctx", str(n_ctx), "--n-gpu-layers", str(n_gpu_layers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self.s.proc
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write((json.dumps(req) + "\n").encode())
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"in-process runner exited ({p.poll()}):\n{self.procs.log_tail(self.s)}")
        return json.loads(line)  # type: ignore[no-any-return]


def start_llama_server(
    procs: Procs, binary: str, model: str, threads: int, n_ctx: int, n_gpu_layers: int, extra: tuple[str, ...] = (),
) -> tuple[Started, str]:
    """``extra``: more options (--reranking, --slot-save-path DIR/, ...)."""
    port = free_port()
    s = procs.start(
        "llama-server",
        [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx),
         "-t", str(threads), "-tb", str(threads), "-np", "1", "-ngl", str(n_gpu_layers),
         # Flash attention "auto" on both sides: llama-server's default and the worker's.
         "-fa", "auto", *extra],
    )
    base = f"http://127.0.0.1:{port}"
    wait_http_ok(procs, s, base + "/health", 300.0)
    return s, base


def start_nginx(procs: Procs, sock: str) -> tuple[Started, str] | None:
    """nginx proxying 127.0.0.1:PORT to the direct worker's socket; None if not installed."""
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if binary is None:
        return None
    port = free_port()
    prefix = procs.tmp / "nginx"
    prefix.mkdir(exist_ok=True)
    # Running as root, nginx's worker would switch to 'nobody' and lose access to the
    # worker's 0600 socket; keep it as root (it only listens on 127.0.0.1).
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"{k}_temp_path {prefix}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""{user}daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {temp}
  upstream worker {{ server unix:{sock}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://worker;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""
    )
    s = procs.start("nginx", [binary, "-p", str(prefix), "-c", str(conf)])
    base = f"http://127.0.0.1:{port}"
    wait_http_ok(procs, s, base + "/v1/models", 30.0)
    return s, base

