"""Start a real `vram-llm serve` subprocess for tests, and leave nothing behind.

Every wait polls for a state until a deadline. ``stop()`` sends SIGTERM, checks the exit
code, that no worker process survived (psutil) and that the runtime dir is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
FAKE_WORKER = REPO / "tests" / "fake_worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds.

    Other exceptions from the predicate mean "not yet" (the thing polled may not exist
    yet), except AssertionError: that is a verdict (e.g. the process being waited for has
    exited) and ends the wait at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            v = predicate()
            if v:
                return v
        except AssertionError:
            raise
        except Exception as e:  # the thing polled may not exist yet
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(s: Supervisor) -> Samples:
    """/metrics parsed: (sample name, sorted labels) -> value (with ``s.api_key`` if set)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(urllib.request.Request(s.base + "/metrics", headers=s._headers()), timeout=10) as r:
        text = r.read().decode()
    return {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for (n, lbl), v in samples.items() if n == name and labels.items() <= dict(lbl).items())


# Series with a sample for every model that has a worker up and answered a request.
PER_MODEL_SERIES = (
    "vram_llm_worker_state", "vram_llm_requests_in_flight", "vram_llm_requests_waiting",
    "vram_llm_requests_served_total", "vram_llm_worker_failure_streak", "vram_llm_worker_crash_loop",
    "vram_llm_worker_next_attempt_seconds", "vram_llm_prompt_cache_hits_total",
    "vram_llm_prompt_cache_tokens_reused_total", "vram_llm_ram_cache_entries", "vram_llm_ram_cache_bytes",
    "vram_llm_ram_cache_hits_total", "vram_llm_ram_cache_tokens_saved_total", "vram_llm_kv_cache_tokens",
    "vram_llm_queue_depth",
    "vram_llm_slots_busy", "vram_llm_worker_resident_memory_bytes", "vram_llm_prompt_tokens_total",
    "vram_llm_completion_tokens_total", "vram_llm_request_duration_seconds_count",
    "vram_llm_queue_wait_seconds_count", "vram_llm_http_requests_total",
)
PER_GPU_SERIES = ("vram_llm_gpu_memory_used_bytes", "vram_llm_gpu_memory_free_bytes")


def models_by_series(samples: Samples) -> dict[str, set[str]]:
    """Sample name -> the ``model`` labels it has; a vram_llm_ sample without one (other than
    the per-GPU series) fails the test."""
    out: dict[str, set[str]] = {}
    for name, lbl in samples:
        if not name.startswith("vram_llm_") or name in PER_GPU_SERIES:
            continue
        labels = dict(lbl)
        assert "model" in labels, f"{name}{labels} has no model label"
        out.setdefault(name, set()).add(labels["model"])
    return out

@contextlib.contextmanager
def notify_listener(path: str) -> Iterator[list[str]]:
    """A NOTIFY_SOCKET at ``path``: yields the list of datagrams received so far. Read
    continuously, as systemd does: a Unix datagram queue holds only a few messages, and a
    sender finding it full drops the message (the watchdog pings would fill it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    msgs: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                msgs.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        yield msgs
    finally:
        done.set()
        t.join(5)
        sock.close()


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


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for sec, kv in sections.items():
        lines.append(f"[{sec}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in kv.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def key_file(tmp: Path, inference: str, admin: str) -> Path:
    """An api_keys_file with one inference key ("app") and one admin key ("ops")."""
    path = tmp / "keys"
    path.write_text(f"app:{inference}\nops:{admin} admin\n")
    return path


@contextlib.contextmanager
def ready_supervisor(s: Supervisor, ready_timeout_s: float = 60.0) -> Iterator[Supervisor]:
    """``s`` once ready; afterwards it must stop cleanly (exit 0, nothing left), else it is killed."""
    try:
        s.wait_ready(ready_timeout_s)
        yield s
        assert s.stop() == 0
    finally:
        s.kill_hard()


class Supervisor:
    """One `vram-llm serve` process."""

    def __init__(
        self,
        tmp: Path,
        sections: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        fake_worker: bool = False,
        preexec: Callable[[], None] | None = None,
        extra_toml: str = "",
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.runtime = tmp / "run"
        self.runtime.mkdir(exist_ok=True)
        secs: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (sections or {}).items()}
        secs.setdefault("server", {}).update({"host": "127.0.0.1", "port": self.port, "runtime_dir": str(self.runtime)})
        # Each supervisor keeps its prompt cache's disk tier in its own directory (unless the
        # test names one): no test restores another test's conversations.
        secs["server"].setdefault("cache_dir", str(tmp / "prompt-cache"))
        if fake_worker:
            secs.setdefault("worker", {}).setdefault("command", [sys.executable, str(FAKE_WORKER)])
        self.config_path = write_config(tmp / "config.toml", secs)
        if extra_toml:  # e.g. [[models]] tables, which write_config does not write
            self.config_path.write_text(self.config_path.read_text() + "\n" + extra_toml)
        self.log_path = tmp / "supervisor.log"
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "serve", "--config", str(self.config_path), *(args or [])],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(REPO),
            preexec_fn=preexec,  # e.g. join a cgroup before the supervisor starts its worker
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.worker_pids: set[int] = set()
        self.api_key: str | None = None  # sent by get/post/status when keys are configured

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # ---- HTTP ----------------------------------------------------------------
    def get(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        try:
            req = urllib.request.Request(self.base + path, headers=self._headers())
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def post(self, path: str, body: dict[str, Any], timeout: float = 60.0) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **self._headers()}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def status(self) -> dict[str, Any]:
        code, st = self.get("/status")
        assert code == 200, st
        w = st.get("worker")
        if w:
            self.worker_pids.add(int(w["pid"]))
        return st  # type: ignore[no-any-return]

    def wait_state(self, state: str, timeout: float = 60.0, pred: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.log()}")
            st = self.status()
            if st["state"] == state and (pred is None or pred(st)):
                return st
            return None

        try:
            return poll(check, timeout, f"state {state}")  # type: ignore[no-any-return]
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- supervisor log ---\n{self.log()[-6000:]}") from None

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait_state("ready", timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    # ---- shutdown --------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> int:
        with_children = set(self.worker_pids)
        try:
            with_children.update(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"supervisor did not exit within {timeout}s of SIGTERM:\n{self.log()[-4000:]}")
        finally:
            self._log.close()
        # No worker may outlive the supervisor.
        def all_gone() -> bool:
            return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in with_children)

        poll(all_gone, 10.0, f"worker processes {sorted(with_children)} to be gone")
        leftovers = [p for p in self.runtime.iterdir()]
        assert not leftovers, f"runtime dir not cleaned: {leftovers}"
        return code

    def kill_hard(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for p in self.worker_pids:
            try:
                os.killpg(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not self._log.closed:
            self._log.close()
