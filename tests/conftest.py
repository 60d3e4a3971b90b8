"""Shared test fixtures: real worker subprocesses, Unix-socket HTTP clients, bounded waits.

Rules:
- Every wait polls a state until a named deadline (``wait_until``); nothing sleeps and
  then asserts.
- Every process a fixture starts is stopped (SIGTERM to its group, deadline, SIGKILL)
  and reaped; every temp dir and socket is removed.
- The real model is loaded once per session (``worker``); tests that need a worker of
  their own (bad model, exit codes) use ``WorkerProcess`` directly.
- Loadable random-weight models (tests/gguf_factory.py ``write_loadable``) are written once
  per session and shape (``loadable_model``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.supervisor_harness import poll

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home() -> Iterator[None]:
    """Every supervisor a test starts keeps its prompt cache's disk tier (server.cache_dir
    defaults to $XDG_CACHE_HOME/vram-llm/...) in a temp dir removed at the end, never in
    the user's ~/.cache."""
    d = short_tmpdir("vram-llm-cache-")
    old = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "CACHE_DIRECTORY")}
    os.environ["XDG_CACHE_HOME"] = str(d)
    os.environ.pop("CACHE_DIRECTORY", None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(d, ignore_errors=True)


# One polling helper for every test: the supervisor tests' ``poll`` (it also tolerates a
# predicate that raises while the thing polled does not exist yet).
wait_until = poll


def short_tmpdir(prefix: str = "vram-llm-test-") -> Path:
    """A private temp dir under /tmp (Unix socket paths must stay under ~100 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def uds_client(socket_path: str | os.PathLike[str], timeout: float = 60.0) -> httpx.Client:
    """An httpx client that speaks HTTP over the worker's Unix socket."""
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket_path)),
        base_url="http://worker",
        timeout=timeout,
    )


def default_model() -> Path:
    from supervisor.default_model import default_model_path

    return default_model_path()


class WorkerProcess:
    """A real ``python -m worker`` subprocess in its own process group.

    Its stderr goes to a file in ``workdir`` (a pipe nobody reads could fill and block it).
    """

    def __init__(self, workdir: Path, spec: dict[str, Any] | str | bytes, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.spec_path = workdir / "spec.json"
        if isinstance(spec, dict):
            self.spec_path.write_text(json.dumps(spec))
            self.socket_path: str | None = spec.get("socket_path")
        else:
            self.spec_path.write_bytes(spec.encode() if isinstance(spec, str) else spec)
            self.socket_path = None
        self.stderr_path = workdir / "worker.stderr"
        self._stderr = open(self.stderr_path, "wb")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--spec", str(self.spec_path)],
            cwd=str(REPO),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=full_env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def client(self, timeout: float = 60.0) -> httpx.Client:
        assert self.socket_path is not None
        return uds_client(self.socket_path, timeout)

    def health(self) -> httpx.Response | None:
        """One /health probe, None while the socket is not answering yet."""
        if self.socket_path is None or not os.path.exists(self.socket_path):
            return None
        try:
            with self.client(timeout=5.0) as c:
                return c.get("/health")
        except httpx.TransportError:
            return None

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode} before ready:\n{self.stderr()[-4000:]}"
                )
            r = self.health()
            return r.json() if r is not None and r.status_code == 200 else None

        return wait_until(ready, timeout, "the worker to report ready on /health")

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running after {timeout}s:\n{self.stderr()[-4000:]}"
            ) from None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the group, wait until the deadline, then SIGKILL; always reap."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._stderr.close()
        return self.proc.returncode


def worker_spec(workdir: Path, **overrides: Any) -> dict[str, Any]:
    """A launch spec (as JSON data) with the config schema's defaults, small for tests."""
    from supervisor.launch import default_spec

    spec = msgspec.structs.asdict(default_spec(
        str(default_model()), str(workdir / "worker.sock"), n_ctx=1024, n_threads=2, max_body_bytes=1024 * 1024,
        cache_dir=str(workdir / "prompt-cache"),  # each worker's own: no test restores another's states
    ))
    spec.update(overrides)
    return spec


def own_worker(**overrides: Any) -> Iterator[WorkerProcess]:
    """A worker of its own on the real model (for a module-scoped fixture to yield from):
    ``overrides`` on top of ``worker_spec``, a callable value gets the workdir (a file the
    spec names); stopped and its workdir removed at the end."""
    workdir = short_tmpdir()
    spec = worker_spec(workdir, **{k: v(workdir) if callable(v) else v for k, v in overrides.items()})
    proc = WorkerProcess(workdir, spec)
    try:
        proc.wait_ready(timeout=180)
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    d = short_tmpdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def worker() -> Iterator[WorkerProcess]:
    """The real worker on the real default model, loaded once for the whole session."""
    workdir = short_tmpdir()
    proc = WorkerProcess(workdir, worker_spec(workdir, model_alias="smollm2-test"))
    try:
        proc.wait_ready(timeout=180)
        yield proc
    finally:
        proc.stop()
        leftover = proc.socket_path is not None and os.path.exists(proc.socket_path)
        shutil.rmtree(workdir, ignore_errors=True)
        assert not leftover, "the worker left its socket file behind"


LoadableModel = Callable[..., Path]


@pytest.fixture(scope="session")
def loadable_model(tmp_path_factory: pytest.TempPathFactory) -> LoadableModel:
    """``loadable_model(n_layers=2, n_embd=64, ...)``: the path of a real llama GGUF with
    SmolLM2's tokenizer and random weights, written on first use of those arguments."""
    from tests.gguf_factory import write_loadable

    written: dict[tuple[tuple[str, Any], ...], Path] = {}

    def get(**shape: Any) -> Path:
        key = tuple(sorted(shape.items()))
        if key not in written:
            stem = "-".join(f"{k}{v}" for k, v in key) or "default"
            written[key] = write_loadable(tmp_path_factory.mktemp("loadable") / f"{stem}.gguf", **shape)
        return written[key]

    return get


@pytest.fixture
def client(worker: WorkerProcess) -> Iterator[httpx.Client]:
    with worker.client() as c:
        yield c


@pytest.fixture
def ensure_idle(worker: WorkerProcess) -> Callable[[], None]:
    """Wait until the shared worker runs no generation (a previous test may have left one)."""

    def wait() -> None:
        def idle() -> bool:
            r = worker.health()
            if r is None:
                return False
            body = r.json()
            return body.get("active", 0) == 0 and body.get("queued", 0) == 0

        wait_until(idle, 60, "the worker to become idle")

    return wait


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    """Decode an OpenAI SSE stream: yields each ``data:`` JSON object, then "[DONE]"."""
    for line in lines:
        if not line.startswith("data: "):
            # The worker's usage trailer is an SSE comment (worker/protocol.py), which SSE
            # clients skip; the supervisor cuts it out before a client sees the stream.
            assert line == "" or line.startswith(": vram-llm-usage "), f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            yield data
            return
        yield json.loads(data)


def stream_json(client: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    """POST ``body`` as raw JSON with stream on; the SSE chunks, checked to end in [DONE]."""
    with client.stream("POST", path, content=json.dumps({**body, "stream": True}).encode(),
                       headers={"Content-Type": "application/json"}) as r:
        assert r.status_code == 200, r.read()
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return events[:-1]
