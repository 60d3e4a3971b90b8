"""Worker lifecycle: exit codes, signals, parent death, disconnects, concurrency, health."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, WorkerProcess, sse_events, wait_until, worker_spec
from worker.protocol import ExitCode

# Bans SmolLM2's end tokens (<|endoftext|> = 0, <|im_end|> = 2) so a generation runs to
# max_tokens: a long generation the tests can interrupt.
NO_EOS = {"0": -100, "2": -100}
LONG = {"prompt": "1, 2, 3, 4,", "max_tokens": 900, "temperature": 0, "logit_bias": NO_EOS}


def _exit_code(workdir: Path, spec: dict[str, Any] | str | bytes) -> tuple[int, str]:
    proc = WorkerProcess(workdir, spec)
    try:
        code = proc.wait_exit(timeout=60)
    finally:
        proc.stop()
    return code, proc.stderr()


# --- exit codes -------------------------------------------------------------------------


def test_missing_model_file_is_bad_model(tmpdir_short: Path) -> None:
    spec = worker_spec(tmpdir_short, model_path=str(tmpdir_short / "nope.gguf"))
    code, err = _exit_code(tmpdir_short, spec)
    assert code == ExitCode.BAD_MODEL
    assert "model file not found" in err
    assert "Traceback" not in err
    assert not os.path.exists(spec["socket_path"])


@pytest.mark.parametrize(
    "content", [b"hello, I am not a model", b"", b"GGUF\xff\xff\xff\xff"], ids=["text", "empty", "bad-version"]
)
def test_non_gguf_file_is_bad_model(tmpdir_short: Path, content: bytes) -> None:
    model = tmpdir_short / "model.gguf"
    model.write_bytes(content)
    code, err = _exit_code(tmpdir_short, worker_spec(tmpdir_short, model_path=str(model)))
    assert code == ExitCode.BAD_MODEL, err
    assert "Traceback" not in err


def test_directory_as_model_is_bad_model(tmpdir_short: Path) -> None:
    code, _ = _exit_code(tmpdir_short, worker_spec(tmpdir_short, model_path=str(tmpdir_short)))
    assert code == ExitCode.BAD_MODEL


def test_gguf_llama_cpp_cannot_load_is_failure(tmpdir_short: Path) -> None:
    # A well-formed GGUF header with no tensors and no metadata: llama.cpp itself rejects it.
    model = tmpdir_short / "empty.gguf"
    model.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    spec = worker_spec(tmpdir_short, model_path=str(model))
    code, err = _exit_code(tmpdir_short, spec)
    assert code == ExitCode.FAILURE, err
    assert "llama.cpp could not load" in err
    assert "llama.cpp: " in err  # llama.cpp's own lines, prefixed
    assert not os.path.exists(spec["socket_path"])


@pytest.mark.parametrize("template,when", [
    ("no-such-builtin", "at load: only llama.cpp knows its built-in names"),
    ("/nonexistent/template.jinja", "before loading: a path that is not there"),
])
def test_unknown_chat_template_is_bad_spec(tmpdir_short: Path, template: str, when: str) -> None:
    spec = worker_spec(tmpdir_short, chat_template=template)
    code, err = _exit_code(tmpdir_short, spec)
    assert code == ExitCode.BAD_SPEC, (when, err)
    assert "chat_template" in err and "Traceback" not in err
    assert not os.path.exists(spec["socket_path"])


def _spec(**fields: Any) -> bytes:
    """A complete launch spec with ``fields`` changed (None: left out), as the worker reads it."""
    spec = {**worker_spec(Path("/tmp")), "model_path": "m.gguf", "socket_path": "/tmp/x.sock", **fields}
    return json.dumps({k: v for k, v in spec.items() if v is not None}).encode()


@pytest.mark.parametrize(
    "spec",
    [
        b"{not json",
        b"[]",
        _spec(model_path=None),
        _spec(bogus=1),
        _spec(n_ctx="big"),
        _spec(n_batch=0),
        _spec(split_mode="diag"),
        _spec(socket_path="/tmp/" + "x" * 200),
        _spec(parallel=None),  # a setting's default is the config schema's: the worker never guesses one
    ],
    ids=["malformed", "array", "missing-field", "unknown-field", "wrong-type", "n-batch-zero",
         "bad-split", "socket-path-too-long", "missing-setting"],
)
def test_bad_spec_is_bad_spec(tmpdir_short: Path, spec: bytes) -> None:
    code, err = _exit_code(tmpdir_short, spec)
    assert code == ExitCode.BAD_SPEC, err
    assert "invalid launch spec" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [[], ["--spec", "/nonexistent/spec.json"], ["--bogus"]])
def test_missing_spec_argument_or_file_is_bad_spec(args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "worker", *args], cwd=REPO, capture_output=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == ExitCode.BAD_SPEC, r.stderr


# --- signals and parent death (own worker, real model) -------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "non-streamed"])
def test_sigterm_during_generation_exits_ok_and_cleans_up(tmpdir_short: Path, stream: bool) -> None:
    """The cut generation is answered with an error, never as a finished answer (issue 13)."""
    spec = worker_spec(tmpdir_short)
    proc = WorkerProcess(tmpdir_short, spec)
    try:
        proc.wait_ready(timeout=120)
        stream_done = threading.Event()
        answer: list[tuple[int, bytes]] = []
        errors: list[httpx.HTTPError] = []

        def long_request() -> None:
            try:
                with proc.client() as c:
                    with c.stream("POST", "/v1/completions", json={**LONG, "stream": stream}) as r:
                        answer.append((r.status_code, r.read()))
            except httpx.HTTPError as e:
                errors.append(e)
            finally:
                stream_done.set()

        t = threading.Thread(target=long_request, daemon=True)
        t.start()
        wait_until(lambda: (h := proc.health()) is not None and h.json().get("active") == 1,
                   30, "the generation to start")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait_exit(timeout=30) == ExitCode.OK
        assert not os.path.exists(spec["socket_path"])
        wait_until(stream_done.is_set, 30, "the client stream to end")
        t.join(timeout=5)
        assert answer, f"the cut request got no answer at all: {errors!r}\n{proc.stderr()[-3000:]}"
        status, raw = answer[0]
        if stream:
            assert status == 200
            events = [line[6:] for line in raw.splitlines() if line.startswith(b"data: ")]
            assert events[-1] != b"[DONE]"
            assert json.loads(events[-1])["error"]["code"] == "generation_cut"
            assert not any(json.loads(e).get("choices", [{}])[0].get("finish_reason") for e in events[:-1])
        else:
            assert status == 503
            assert json.loads(raw)["error"]["code"] == "generation_cut"
    finally:
        proc.stop()


def test_health_answers_from_the_start_and_sigterm_while_starting_exits_ok(tmpdir_short: Path) -> None:
    """The socket answers before the model is ready; SIGTERM then (loading or not) is a clean stop."""
    # The socket's directory does not exist yet: the worker creates it, private.
    spec = worker_spec(tmpdir_short, socket_path=str(tmpdir_short / "run" / "worker.sock"))
    proc = WorkerProcess(tmpdir_short, spec)
    try:
        first = wait_until(proc.health, 60, "the first /health answer")
        assert stat.S_IMODE(os.stat(tmpdir_short / "run").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(spec["socket_path"]).st_mode) == 0o600
        body = first.json()
        assert body["pid"] == proc.pid
        if first.status_code == 503:  # caught it loading
            assert body["status"] == "loading" and 0.0 <= body.get("progress", 0.0) <= 1.0
            with proc.client() as c:
                models = c.get("/v1/models")
            # The load may have finished in between: then the model list is served.
            if models.status_code != 200:
                assert models.status_code == 503 and models.json()["error"]["code"] == "model_loading"
        else:
            assert first.status_code == 200 and body["status"] == "ok"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait_exit(timeout=30) == ExitCode.OK
        assert not os.path.exists(spec["socket_path"])
    finally:
        proc.stop()


def test_llama_log_lines_are_prefixed_filtered_and_checked_for_oom() -> None:
    import io

    from worker.engine import LlamaLog

    out = io.StringIO()
    log = LlamaLog(out)
    info, debug, error, cont = 2, 1, 4, 5
    log._on_log(info, b"load_tensors: loading", None)  # type: ignore[arg-type]
    log._on_log(cont, b" done\n", None)  # type: ignore[arg-type]
    log._on_log(debug, b"create_tensor: blk.0\n", None)  # type: ignore[arg-type]
    log._on_log(error, b"ggml_backend_cuda_buffer_type_alloc_buffer: allocating 512.00 MiB on device 0: "
                b"cudaMalloc failed: out of memory\n", None)  # type: ignore[arg-type]
    log._on_log(info, b"no newline yet", None)  # type: ignore[arg-type]
    log.flush()
    lines = out.getvalue().splitlines()
    assert lines[0] == "llama.cpp: load_tensors: loading done"
    assert not any("create_tensor" in line for line in lines)  # DEBUG lines stay out
    assert lines[-1] == "llama.cpp: no newline yet"
    assert len(log.oom_lines) == 1 and "cudaMalloc failed" in log.oom_lines[0]


def test_worker_dies_with_its_parent(tmpdir_short: Path) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the worker's parent, the worker stops on its own."""
    spec_path = tmpdir_short / "spec.json"
    spec_path.write_text(json.dumps(worker_spec(tmpdir_short)))
    launcher = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'worker', '--spec', {str(spec_path)!r}],"
        " stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher], cwd=REPO, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    worker_pid = 0
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        wait_until(lambda: os.path.exists(tmpdir_short / "worker.sock"), 60, "the worker's socket")
        parent.kill()
        parent.wait(timeout=10)

        def gone() -> bool:
            try:
                status = Path(f"/proc/{worker_pid}/status").read_text()
            except FileNotFoundError:
                return True
            return "State:\tZ" in status  # exited, waiting for init to reap it

        wait_until(gone, 30, "the orphaned worker to exit")
        wait_until(lambda: not os.path.exists(tmpdir_short / "worker.sock"), 10,
                   "the socket file to be removed")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        if worker_pid and Path(f"/proc/{worker_pid}").exists():
            try:
                os.kill(worker_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- disconnects, concurrency, health during generation (shared worker) -------------------


def _health(worker: WorkerProcess) -> dict[str, Any]:
    r = worker.health()
    assert r is not None and r.status_code == 200
    return r.json()


def _idle(worker: WorkerProcess) -> bool:
    h = _health(worker)
    return h.get("active", 0) == 0 and h.get("queued", 0) == 0


@pytest.mark.model
def test_dropped_stream_stops_generation(worker: WorkerProcess, ensure_idle: Any) -> None:
    ensure_idle()
    served = _health(worker).get("requests_served", 0)
    with worker.client() as c, c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        events = sse_events(r.iter_lines())
        for _ in range(3):
            next(events)
        # The chunks above were flushed while the generation is still running.
        assert _health(worker).get("active") == 1
    # Leaving the block closed the connection mid-stream.
    wait_until(lambda: _idle(worker), 10, "the dropped generation to stop")
    assert _health(worker)["requests_served"] == served + 1
    with worker.client(timeout=15) as c:
        r2 = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert r2.status_code == 200


@pytest.mark.model
def test_dropped_non_streaming_request_stops_generation(worker: WorkerProcess, ensure_idle: Any) -> None:
    ensure_idle()
    with worker.client() as c:
        started = threading.Event()

        def watch() -> None:
            wait_until(lambda: _health(worker).get("active") == 1, 30, "the generation to start")
            started.set()

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        with pytest.raises(httpx.ReadTimeout):
            # The client gives up (and closes the connection) once the generation runs.
            c.post("/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=1.0))
        t.join(timeout=35)
        assert started.is_set()
    wait_until(lambda: _idle(worker), 10, "the abandoned generation to stop")
    with worker.client(timeout=15) as c:
        r2 = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r2.status_code == 200


@pytest.mark.model
def test_parallel_1_runs_requests_one_at_a_time_in_order_and_health_answers(tmpdir_short: Path) -> None:
    # parallel 1 keeps the one-request-at-a-time behaviour (the default, 4, runs both
    # at once: see test_requests_run_concurrently_and_health_answers).
    worker = WorkerProcess(tmpdir_short, worker_spec(tmpdir_short, parallel=1))
    try:
        worker.wait_ready(timeout=120)
        _one_at_a_time_in_order(worker)
    finally:
        worker.stop()


def _long_then_short(
    worker: WorkerProcess,
) -> tuple[list[str], dict[str, httpx.Response], threading.Thread, threading.Thread]:
    """A 120-token request, and once it runs a 4-token one; returns finish order, answers, threads."""
    finished: list[str] = []
    results: dict[str, httpx.Response] = {}

    def post(name: str, body: dict[str, Any]) -> None:
        with worker.client() as c:
            results[name] = c.post("/v1/completions", json=body)
        finished.append(name)

    first = threading.Thread(target=post, args=("first", {**LONG, "max_tokens": 120}), daemon=True)
    first.start()
    h = wait_until(lambda: (x := _health(worker)).get("active") == 1 and x, 30, "the first generation")
    # Health answers while a generation runs, with liveness data for the supervisor.
    assert h["seconds_since_token"] is not None and h["seconds_since_token"] >= 0
    second = threading.Thread(
        target=post, args=("second", {"prompt": "1, 2,", "max_tokens": 4, "temperature": 0}), daemon=True
    )
    second.start()
    return finished, results, first, second


def _check_answers_and_idle(worker: WorkerProcess, results: dict[str, httpx.Response]) -> None:
    assert results["first"].status_code == 200 and results["second"].status_code == 200
    assert results["first"].json()["usage"]["completion_tokens"] == 120
    assert results["second"].json()["usage"]["completion_tokens"] == 4
    idle = _health(worker)
    assert idle.get("active", 0) == 0 and idle.get("seconds_since_token") is None


def _one_at_a_time_in_order(worker: WorkerProcess) -> None:
    finished, results, first, second = _long_then_short(worker)
    wait_until(lambda: _health(worker).get("queued") == 1, 30, "the second request to queue")
    first.join(timeout=120)
    second.join(timeout=60)
    assert finished == ["first", "second"]
    _check_answers_and_idle(worker, results)


@pytest.mark.model
def test_requests_run_concurrently_and_health_answers(worker: WorkerProcess, ensure_idle: Any) -> None:
    ensure_idle()
    finished, results, first, second = _long_then_short(worker)
    second.join(timeout=60)
    # The short request got a slot of its own and finished while the long one still ran.
    assert finished == ["second"]
    first.join(timeout=120)
    assert finished == ["second", "first"]
    _check_answers_and_idle(worker, results)


@pytest.mark.model
def test_two_concurrent_identical_requests_both_correct(worker: WorkerProcess, ensure_idle: Any) -> None:
    ensure_idle()
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8, "temperature": 0}
    out: list[httpx.Response] = []

    def post() -> None:
        with worker.client() as c:
            out.append(c.post("/v1/chat/completions", json=body))

    threads = [threading.Thread(target=post, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(out) == 2 and all(r.status_code == 200 for r in out)
    a, b = (r.json()["choices"][0]["message"]["content"] for r in out)
    assert a == b and a
