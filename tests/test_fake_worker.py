"""The fake worker itself, started directly as a subprocess: its misbehaviours must be real
before supervisor tests can rely on them. Every wait polls until a deadline."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from supervisor.launch import default_spec
from worker.protocol import ExitCode, encoder, is_oom_line

FAKE = Path(__file__).resolve().parent / "fake_worker.py"
DEADLINE_S = 15.0
T = TypeVar("T")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(path: str, method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(path, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, url, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_for(what: str, probe: Callable[[], T | None], deadline_s: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + deadline_s
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(0.02)


class Fake:
    def __init__(self, tmp: Path, env: dict[str, str], **spec_fields: Any) -> None:
        self.sock = str(tmp / "w.sock")
        spec = default_spec("/models/tiny-model.gguf", self.sock, **spec_fields)
        spec_path = tmp / "spec.json"
        spec_path.write_bytes(encoder.encode(spec))
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_WORKER_")}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--spec", str(spec_path)],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def health(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]] | None:
        try:
            status, body = request(self.sock, "GET", "/health", timeout=timeout)
        except OSError:
            return None  # not listening yet
        return status, json.loads(body)

    def wait_ready(self) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            h = self.health()
            return h[1] if h is not None and h[0] == 200 else None

        return wait_for("health 200", probe)

    def wait_exit(self) -> int:
        return self.proc.wait(timeout=DEADLINE_S)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE_S)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Fake]]:
    started: list[Fake] = []

    def _start(env: dict[str, str] | None = None, **spec_fields: Any) -> Fake:
        fake = Fake(tmp_path, {"FAKE_WORKER_LOAD_S": "0.2", **(env or {})}, **spec_fields)
        started.append(fake)
        return fake

    yield _start
    for fake in started:
        fake.kill()


def test_serves_the_api_then_exits_cleanly_on_sigterm(start: Callable[..., Fake], tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"CUDA_VISIBLE_DEVICES": "1,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "FAKE_WORKER_STATE_DIR": str(state)}
    fake = start(env, n_gpu_layers=12, tensor_split=[0.25, 0.75], n_ctx=2048, model_alias="tiny")
    health = fake.wait_ready()
    assert health["status"] == "ok" and health["pid"] == fake.proc.pid
    assert "seconds_since_token" not in health  # idle
    params = health["params"]
    assert params["n_gpu_layers"] == 12 and params["tensor_split"] == [0.25, 0.75] and params["n_ctx"] == 2048
    assert params["cuda_visible_devices"] == "1,0" and params["cuda_device_order"] == "PCI_BUS_ID"

    status, body = request(fake.sock, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    status, body = request(fake.sock, "POST", "/v1/chat/completions", chat)
    reply = json.loads(body)
    assert status == 200
    assert reply["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    assert reply["choices"][0]["finish_reason"] == "length"

    status, body = request(fake.sock, "POST", "/v1/completions", {"prompt": "x", "stream": True, "max_tokens": 4})
    # The usage trailer (an SSE comment for the supervisor, worker/protocol.py) comes just before [DONE].
    assert body.decode().split("\n\n")[-3].startswith(": vram-llm-usage ")
    events = [line[len("data: ") :] for line in body.decode().split("\n\n") if line and not line.startswith(":")]
    assert status == 200 and events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == "tok0 tok1 tok2 tok3"

    status, body = request(fake.sock, "POST", "/v1/chat/completions", {**chat, "stream": True})
    events = [line[len("data: ") :] for line in body.decode().split("\n\n") if line and not line.startswith(":")]
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant"}
    assert "".join(d.get("content", "") for d in deltas) == "tok0 tok1 tok2"

    served = fake.health()
    assert served is not None and served[1]["requests_served"] == 3

    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait_exit() == ExitCode.OK
    assert not Path(fake.sock).exists()
    (record,) = [json.loads(line) for line in (state / "starts.jsonl").read_text().splitlines()]
    assert record["pid"] == fake.proc.pid and record["start"] == 0
    assert record["spec"]["n_gpu_layers"] == 12
    assert record["env"] == {"CUDA_VISIBLE_DEVICES": "1,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_stalled_load_reports_loading_with_progress(start: Callable[..., Fake]) -> None:
    fake = start({"FAKE_WORKER_STALL_LOAD_AT": "0.5"})

    def stalled() -> dict[str, Any] | None:
        h = fake.health()
        return h[1] if h is not None and h[0] == 503 and h[1]["progress"] > 0.4 else None

    health = wait_for("load progress to reach the stall point", stalled)
    assert health["status"] == "loading" and health["progress"] < 0.5
    status, _ = request(fake.sock, "POST", "/v1/completions", {"prompt": "x"})
    assert status == 503
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait_exit() == ExitCode.OK


@pytest.mark.parametrize(("layers", "oom"), [(-1, True), (33, True), (10, False)])
def test_oom_above_layers(start: Callable[..., Fake], layers: int, oom: bool) -> None:
    fake = start({"FAKE_WORKER_OOM_ABOVE_LAYERS": "10"}, n_gpu_layers=layers)
    if oom:
        assert fake.wait_exit() == ExitCode.OOM
        assert any(is_oom_line(line) for line in fake.stderr().splitlines())
    else:
        assert fake.wait_ready()["params"]["n_gpu_layers"] == layers


def test_exit_code_at_load(start: Callable[..., Fake]) -> None:
    fake = start({"FAKE_WORKER_EXIT_CODE": str(int(ExitCode.BAD_MODEL))})
    assert fake.wait_exit() == ExitCode.BAD_MODEL


def test_crash_times_then_behaves(start: Callable[..., Fake], tmp_path: Path) -> None:
    env = {"FAKE_WORKER_CRASH_TIMES": "2", "FAKE_WORKER_STATE_DIR": str(tmp_path / "state")}
    assert start(env).wait_exit() == 1
    assert start(env).wait_exit() == 1
    third = start(env)
    third.wait_ready()
    starts = (tmp_path / "state" / "starts.jsonl").read_text().splitlines()
    assert [json.loads(s)["start"] for s in starts] == [0, 1, 2]


def test_healthy_file_ends_the_crashes(start: Callable[..., Fake], tmp_path: Path) -> None:
    flag = tmp_path / "healthy"
    env = {"FAKE_WORKER_HEALTHY_FILE": str(flag)}
    assert start(env).wait_exit() == 1
    assert start(env).wait_exit() == 1
    flag.touch()
    start(env).wait_ready()


def test_bad_spec_exits_3(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"model_path": "/m.gguf", "socket_path": "/tmp/x.sock", "surprise": 1}')
    proc = subprocess.run(
        [sys.executable, str(FAKE), "--spec", str(spec)], capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert proc.returncode == ExitCode.BAD_SPEC
    assert "surprise" in proc.stderr


def _sigterm_ignored(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    raise AssertionError("no SigIgn line")


def test_ignore_sigterm(start: Callable[..., Fake]) -> None:
    fake = start({"FAKE_WORKER_IGNORE_SIGTERM": "1"})
    fake.wait_ready()
    # The kernel's own record says SIGTERM is ignored: no waiting for "nothing happened".
    assert _sigterm_ignored(fake.proc.pid)
    fake.proc.send_signal(signal.SIGTERM)
    h = fake.health()
    assert h is not None and h[0] == 200
    fake.proc.kill()
    assert fake.wait_exit() == -signal.SIGKILL


def test_hang_after_ready(start: Callable[..., Fake]) -> None:
    fake = start({"FAKE_WORKER_HANG_AFTER_READY_S": "0.3"})
    fake.wait_ready()

    def timed_out() -> bool:
        try:
            request(fake.sock, "GET", "/health", timeout=0.5)
        except TimeoutError:
            return True
        return False

    wait_for("health to stop answering", timed_out)
    assert fake.proc.poll() is None  # alive but unresponsive: only a kill helps


def test_stalled_generation_keeps_health_answering(start: Callable[..., Fake]) -> None:
    fake = start({"FAKE_WORKER_STALL_GENERATION": "1"})
    fake.wait_ready()
    # The stalled request blocks for ever; run it in a thread whose socket dies with the worker.
    errors: list[BaseException] = []

    def stuck() -> None:
        try:
            request(fake.sock, "POST", "/v1/chat/completions", {"messages": [], "stream": True}, timeout=DEADLINE_S)
        except BaseException as exc:  # noqa: BLE001 - expected when the worker stops
            errors.append(exc)

    thread = threading.Thread(target=stuck, daemon=True)
    thread.start()

    def stalled() -> dict[str, Any] | None:
        h = fake.health()
        body = h[1] if h is not None else {}
        return body if body.get("active") == 1 and body.get("seconds_since_token", 0) > 0.3 else None

    first = wait_for("seconds_since_token to pass 0.3s", stalled)

    def grew() -> dict[str, Any] | None:
        body = stalled()
        return body if body is not None and body["seconds_since_token"] > first["seconds_since_token"] else None

    later = wait_for("seconds_since_token to keep growing", grew)
    assert later.get("requests_served", 0) == 0  # omitted when 0 (Health omits defaults)
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait_exit() == ExitCode.OK
    thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive()
