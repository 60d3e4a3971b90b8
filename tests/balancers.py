"""Two vram-llm instances behind a real balancer (issue 26): the pieces the balancer tests share.

``Pool`` starts two supervisors on loopback (the fake worker: the balancer does not care
which model answers, and a fake answer takes milliseconds on a busy box), ``Clients`` runs
looping clients through the balancer and keeps every outcome. A balancer the test cannot
have is a skip that says why, never a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.supervisor_harness import Supervisor, free_port, poll

# The settings the README's "Several boxes" recipe gives each instance: /health turns 503
# at once on SIGTERM; new requests are still served for drain_s (longer than the balancer's
# health-check interval x failures), then answered 503, which the balancer retries elsewhere.
INSTANCE = {
    "worker": {"health_interval_s": 0.2, "health_timeout_s": 2.0, "stop_timeout_s": 5.0},
    "shutdown": {"grace_s": 60.0, "drain_s": 2.0},
}
FAKE_ENV = {"FAKE_WORKER_TOKEN_INTERVAL_S": "0.02", "FAKE_WORKER_LOAD_S": "0.3"}


def installed_or_skip(binary: str, debian_package: str) -> str:
    """The path of ``binary``; if missing, installs ``debian_package`` with apt-get when this
    is root or sudo needs no password (as .ci/run does), else skips saying why."""
    found = shutil.which(binary)
    if found:
        return found
    if os.environ.get("VRAM_LLM_NO_INSTALL"):
        pytest.skip(f"{binary} is not installed and VRAM_LLM_NO_INSTALL is set (apt-get install {debian_package})")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        pytest.skip(f"{binary} is not installed and this user cannot install it (apt-get install {debian_package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run([*prefix, "apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        done = subprocess.run([*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", debian_package],
                              env=env, capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"{binary} is not installed and apt-get failed: {e}")
    found = shutil.which(binary)
    if not found:
        pytest.skip(f"{binary} could not be installed (apt-get install {debian_package}: exit {done.returncode}: "
                    f"{done.stderr.decode(errors='replace')[-300:]})")
    return found


class Pool:
    """Two vram-llm instances, "a" and "b"."""

    def __init__(self, tmp: Path, sections: dict[str, dict[str, Any]] | None = None) -> None:
        self.members: dict[str, Supervisor] = {}
        for name in ("a", "b"):
            d = tmp / name
            d.mkdir()
            self.members[name] = Supervisor(d, {**INSTANCE, **(sections or {})}, fake_worker=True, env=FAKE_ENV)
        for s in self.members.values():
            s.wait_ready(60)

    def served(self) -> dict[str, int]:
        """Requests each instance's worker answered (its supervisor's count)."""
        return {n: int(s.status()["requests"]["served"]) for n, s in self.members.items() if s.proc.poll() is None}

    def close(self) -> None:
        for s in self.members.values():
            try:
                if s.proc.poll() is None:
                    s.stop(60)
            finally:
                s.kill_hard()


def chat_once(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None, model: str = "x") -> tuple[int, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            ok = r.status == 200 and json.loads(text)["choices"][0]["message"]["content"].count("tok") == 5
            return (r.status if ok else -1), text[:300]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]
    except (OSError, ValueError, KeyError) as e:
        return -1, repr(e)


class Clients:
    """``n`` clients, each sending one chat after another through ``url`` until ``stop``."""

    def __init__(self, url: str, n: int = 4, headers: dict[str, str] | None = None, model: str = "x") -> None:
        self.url = url
        self.headers = headers
        self.model = model
        self.results: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            got = chat_once(self.url, headers=self.headers, model=self.model)
            with self._lock:
                self.results.append(got)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
            assert not t.is_alive(), "a client is still waiting for an answer after 120 s"

    def failed(self) -> list[tuple[int, str]]:
        with self._lock:
            return [r for r in self.results if r[0] != 200]

    def codes(self) -> Counter[int]:
        with self._lock:
            return Counter(c for c, _ in self.results)


def wait_more(clients: Clients, n: int, timeout: float, what: str) -> None:
    """Until ``n`` more requests have been answered (well or not)."""
    target = clients.count() + n
    poll(lambda: clients.count() >= target, timeout, what)


def stopped_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """TERM, a deadline, KILL; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)



@contextlib.contextmanager
def behind_balancer(
    tmp: Path, name: str, start: Callable[[Pool, int, IO[bytes]], subprocess.Popen[bytes]],
    headers: dict[str, str] | None = None, model: str = "x", timeout: float = 60.0,
) -> Iterator[tuple[Pool, str]]:
    """Two instances and the balancer ``start`` runs on a free port (its output in
    tmp/NAME.log), once it serves a request; everything stopped after."""
    pool = Pool(tmp)
    proc: subprocess.Popen[bytes] | None = None
    log_path = tmp / f"{name}.log"
    log = open(log_path, "wb")
    try:
        port = free_port()
        proc = start(pool, port, log)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def serving() -> bool:
            assert proc is not None and proc.poll() is None, f"{name} exited:\n{log_path.read_text()[-3000:]}"
            return chat_once(url, timeout=30, headers=headers, model=model)[0] == 200

        poll(serving, timeout, f"{name} to serve a request", interval=0.2)
        yield pool, url
    finally:
        if proc is not None:
            stopped_process(proc)
        log.close()
        pool.close()


def _failures(clients: Clients) -> str:
    return f"{len(clients.failed())} of {clients.count()} failed: {clients.failed()[:5]}"


def sigterm_one_under_load(pool: Pool, url: str, headers: dict[str, str] | None = None, model: str = "x",
                           timeout: float = 60.0) -> Clients:
    """4 looping clients; once both instances served, SIGTERM to "a": it must exit 0, and
    "b" serve what follows. Returns the clients (stopped) for the caller's verdict."""
    a = pool.members["a"]
    with Clients(url, 4, headers=headers, model=model) as clients:
        poll(lambda: min(pool.served().values()) >= 10, timeout, "both instances to serve requests")
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(90) == 0
        served_b = pool.served()["b"]
        wait_more(clients, 20, timeout, "20 more answers after instance a is gone")
        assert pool.served()["b"] >= served_b + 10  # b took over
    assert clients.failed() == [], _failures(clients)
    assert pool.members["b"].get("/health")[0] == 200
    return clients


def kill_one_worker_under_load(pool: Pool, url: str, headers: dict[str, str] | None = None, model: str = "x",
                               timeout: float = 60.0) -> Clients:
    """4 looping clients; kill -9 of instance "b"'s worker: its supervisor restarts it,
    "a" serves meanwhile, and no request fails."""
    a, b = pool.members["a"], pool.members["b"]
    with Clients(url, 4, headers=headers, model=model) as clients:
        poll(lambda: min(pool.served().values()) >= 10, timeout, "both instances to serve requests")
        st = b.status()
        b.worker_pids.add(st["worker"]["pid"])
        served_a = pool.served()["a"]
        os.kill(st["worker"]["pid"], signal.SIGKILL)
        b.wait_state("ready", 60, lambda s: s["worker"]["generation"] > st["worker"]["generation"])
        wait_more(clients, 20, timeout, "20 more answers once b is back")
        assert pool.served()["a"] > served_a  # a served meanwhile
    assert clients.failed() == [], _failures(clients)
    assert a.status()["restarts"] == 0 and b.status()["restarts"] == 1
    return clients
