"""A small, misbehaving stand-in for ``python -m worker``, for supervisor tests.

Run as ``python tests/fake_worker.py --spec PATH`` (the real worker's CLI). It reads the same
``worker.protocol.LaunchSpec`` and serves the same HTTP API on ``spec.socket_path``:
GET /health (503 "loading" with progress, then 200 with ``Health`` including ``params``
that echo the spec and this process's CUDA environment), GET /v1/models, and
POST /v1/chat/completions and /v1/completions (non-streaming and SSE), GET /slots (llama-server's
shape, one slot). GET /v1/fake/read
answers {} at once: a read the supervisor proxies without a generation slot (it answers
/v1/models itself), for tests that need many requests at the worker's socket. It never loads a
model: a completion is the tokens "tok0 tok1 ...", one every FAKE_WORKER_TOKEN_INTERVAL_S,
``max_tokens`` of them if the request says so, else FAKE_WORKER_TOKENS. Generations run one
at a time (FAKE_WORKER_SLOTS: that many), the rest are ``queued``.

Behaviour is chosen by environment variables (the supervisor passes its environment to
the worker, so a test sets them on the supervisor process):

  FAKE_WORKER_LOAD_S=0.3            how long the "model load" takes (health says loading)
  FAKE_WORKER_STALL_LOAD_AT=p       load progress stops at p (0..1) forever: a stalled load
  FAKE_WORKER_CRASH_AT_LOAD=1       exit 1 halfway through the load
  FAKE_WORKER_EXIT_CODE=n           exit with n halfway through the load (4 = BAD_MODEL, ...)
  FAKE_WORKER_CRASH_TIMES=k         with FAKE_WORKER_STATE_DIR: fail at load (exit code
                                    FAKE_WORKER_EXIT_CODE, default 1) only on the first k
                                    starts, then behave
  FAKE_WORKER_HEALTHY_FILE=path     fail at load (exit code FAKE_WORKER_EXIT_CODE, default 1)
                                    on every start while path does not exist; once a test
                                    creates it, the next start behaves (a crash loop that ends)
  FAKE_WORKER_OOM_ABOVE_LAYERS=n    if spec.n_gpu_layers is -1 or > n: print llama.cpp's CUDA
                                    out-of-memory lines to stderr halfway through the load and
                                    exit 5 (ExitCode.OOM)
  FAKE_WORKER_FAIL_ONLY=a,b         the load failures above apply only to workers of these
                                    models (their ids, spec.model_alias); the others behave
  FAKE_WORKER_IGNORE_SIGTERM=1      ignore SIGTERM (only SIGKILL stops it)
  FAKE_WORKER_HANG_AFTER_READY_S=x  x seconds after becoming ready, block the event loop for
                                    good: nothing answers any more (SIGTERM included)
  FAKE_WORKER_ALLOCATE_MIB=n        once ready, allocate and touch n MiB (only on the first start
                                    when FAKE_WORKER_STATE_DIR is set): under a small cgroup memory
                                    limit the kernel's OOM killer ends it with SIGKILL
  FAKE_WORKER_STALL_GENERATION=1    generations never produce a token; health keeps answering
                                    with active=1 and seconds_since_token growing
  FAKE_WORKER_TOKEN_INTERVAL_S=0.01 seconds between tokens
  FAKE_WORKER_TOKENS=5              tokens per completion when the request has no max_tokens
  FAKE_WORKER_SLOTS=1               generations at once (its health's parallel); /slots
                                    still lists one slot
  FAKE_WORKER_BACKLOG=n             listen backlog of the socket (aiohttp's default: 128)
  FAKE_WORKER_STATE_DIR=dir         append one JSON line per start to dir/starts.jsonl:
                                    {"start": i, "pid", "spec": {...}, "env": {CUDA_* vars}}
  FAKE_WORKER_MAX_LIFETIME_S=300    safety net: exit 1 after this long whatever happens, so a
                                    broken test cannot leave it running for ever

A completion request that carries an Authorization or X-Api-Key header is refused with 400:
the supervisor must not forward client credentials. Each completion request logs its
X-Request-Id on stderr ("request ID: METHOD PATH"); a streamed answer ends with the usage
trailer of worker.protocol, as the real worker's does.

On SIGTERM/SIGINT (unless ignored or hung) it stops serving, removes its socket and exits 0.
A failure at load exits at once and leaves the socket file behind, as a real crash would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Run as a script (sys.path[0] is tests/): make the repository importable for worker.protocol.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import msgspec  # noqa: E402
from aiohttp import web  # noqa: E402

from worker.protocol import (  # noqa: E402
    LLAMA_LOG_PREFIX,
    STREAM_DONE,
    AppliedParams,
    ExitCode,
    Health,
    LaunchSpec,
    StreamUsage,
    encoder,
    spec_decoder,
    usage_trailer,
)


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def _say(msg: str) -> None:
    print(f"fake_worker[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def _record_start(state_dir: str, spec: LaunchSpec) -> int:
    """Append this start to starts.jsonl; return how many starts came before it."""
    path = Path(state_dir) / "starts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    before = len(path.read_text().splitlines()) if path.exists() else 0
    record = {
        "start": before,
        "pid": os.getpid(),
        "spec": msgspec.to_builtins(spec),
        "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")},
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return before


class FakeWorker:
    def __init__(self, spec: LaunchSpec, start_index: int) -> None:
        self.spec = spec
        self.start_index = start_index
        self.alias = spec.model_alias or Path(spec.model_path).stem
        self.load_s = _env_float("FAKE_WORKER_LOAD_S", 0.3) or 0.0
        self.token_interval_s = _env_float("FAKE_WORKER_TOKEN_INTERVAL_S", 0.01) or 0.0
        self.default_tokens = _env_int("FAKE_WORKER_TOKENS", 5) or 0
        self.progress = 0.0
        self.ready = False
        self.active = 0
        self.queued = 0
        self.requests_served = 0
        self.last_token_at: float | None = None  # monotonic; None when idle
        self.hog: list[bytes] = []  # FAKE_WORKER_ALLOCATE_MIB
        self.slots = max(1, _env_int("FAKE_WORKER_SLOTS", 1) or 1)
        self.gen_lock = asyncio.Semaphore(self.slots)
        self.stopping = asyncio.Event()
        self.load_task: asyncio.Task[None] | None = None

    # --- load ---------------------------------------------------------------------------

    def _load_failure(self) -> tuple[int, list[str]] | None:
        """(exit code, stderr lines) if this start must fail during the load."""
        only = os.environ.get("FAKE_WORKER_FAIL_ONLY")
        if only and self.alias not in only.split(","):
            return None
        oom_above = _env_int("FAKE_WORKER_OOM_ABOVE_LAYERS", None)
        layers = self.spec.n_gpu_layers
        if oom_above is not None and (layers == -1 or layers > oom_above):
            return ExitCode.OOM, [
                LLAMA_LOG_PREFIX + "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1024.00 MiB "
                "on device 0: cudaMalloc failed: out of memory",
                LLAMA_LOG_PREFIX + "alloc_tensor_range: failed to allocate CUDA0 buffer of size 1073741824",
                LLAMA_LOG_PREFIX + "llama_model_load: error loading model: unable to allocate CUDA0 buffer",
                f"fake_worker[{os.getpid()}]: out of memory while loading with n_gpu_layers={layers}",
            ]
        code = _env_int("FAKE_WORKER_EXIT_CODE", None)
        crash = _env_flag("FAKE_WORKER_CRASH_AT_LOAD") or code is not None
        crash_times = _env_int("FAKE_WORKER_CRASH_TIMES", None)
        if crash_times is not None:
            crash = self.start_index < crash_times
        healthy_file = os.environ.get("FAKE_WORKER_HEALTHY_FILE")
        if healthy_file:
            crash = not os.path.exists(healthy_file)
        if not crash:
            return None
        code = 1 if code is None else code
        return code, [f"fake_worker[{os.getpid()}]: failing at load (start {self.start_index}) with exit code {code}"]

    async def load(self) -> None:
        failure = self._load_failure()
        stall_at = _env_float("FAKE_WORKER_STALL_LOAD_AT", None)
        steps = 20
        for i in range(1, steps + 1):
            await asyncio.sleep(self.load_s / steps)
            progress = i / steps
            if failure is not None and progress >= 0.5:
                for line in failure[1]:
                    print(line, file=sys.stderr, flush=True)
                # A crash: no cleanup, the socket file stays behind.
                os._exit(failure[0])
            if stall_at is not None and progress >= stall_at:
                _say(f"load stalled at {self.progress:.2f}")
                await self.stopping.wait()
                return
            self.progress = progress
        self.progress = 1.0
        self.ready = True
        _say(f"ready: {self.alias}")
        allocate = _env_int("FAKE_WORKER_ALLOCATE_MIB", None)
        if allocate and self.start_index == 0:
            _say(f"allocating {allocate} MiB")
            # b"x" * n writes every page (a zeroed bytearray would stay virtual).
            self.hog = [b"x" * (1 << 20) for _ in range(allocate)]
            _say(f"allocated {allocate} MiB and was not killed")
        hang_after = _env_float("FAKE_WORKER_HANG_AFTER_READY_S", None)
        if hang_after is not None:
            asyncio.get_running_loop().call_later(hang_after, self._hang)

    def _hang(self) -> None:
        _say("hanging (event loop blocked)")
        # Block the event loop: health, requests and the SIGTERM handler all stop answering.
        # The lifetime timer thread (or SIGKILL) ends the process.
        while True:
            time.sleep(1.0)

    # --- health -------------------------------------------------------------------------

    def health(self) -> Health:
        if not self.ready:
            return Health(status="loading", pid=os.getpid(), progress=self.progress)
        spec = self.spec
        params = AppliedParams(
            model_path=spec.model_path,
            n_gpu_layers=spec.n_gpu_layers,
            tensor_split=spec.tensor_split,
            split_mode=spec.split_mode,
            main_gpu=spec.main_gpu,
            n_ctx=spec.n_ctx,
            n_batch=spec.n_batch,
            n_threads=spec.n_threads or os.cpu_count() or 1,
            chat_format=spec.chat_format,
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            cuda_device_order=os.environ.get("CUDA_DEVICE_ORDER"),
            llama_cpp_version="fake",
            gpu_offload_supported=True,
            parallel=self.slots,  # FAKE_WORKER_SLOTS at a time, whatever the spec asks (top of this file)
            prefill_chunk=spec.prefill_chunk,
            token_gap_ms=spec.token_gap_ms,
            draft_max=spec.draft_max,
        )
        since = None if self.last_token_at is None else time.monotonic() - self.last_token_at
        return Health(
            status="ok",
            pid=os.getpid(),
            progress=1.0,
            model=self.alias,
            params=params,
            active=self.active,
            queued=self.queued,
            seconds_since_token=since,
            requests_served=self.requests_served,
        )

    async def handle_health(self, request: web.Request) -> web.Response:
        h = self.health()
        return web.Response(
            body=encoder.encode(h), status=200 if h.status == "ok" else 503, content_type="application/json"
        )

    async def handle_models(self, request: web.Request) -> web.Response:
        body = {
            "object": "list",
            "data": [{"id": self.alias, "object": "model", "created": 0, "owned_by": "vram-llm"}],
        }
        return web.json_response(body)

    async def handle_slots(self, request: web.Request) -> web.Response:
        """llama-server's GET /slots for its one slot (worker/api/slots.py has the real one)."""
        busy = self.active > 0
        if busy and request.query.get("fail_on_no_slot", "") not in ("", "0"):
            return web.json_response({"error": {"code": 503, "message": "no slot available"}}, status=503)
        return web.json_response([{"id": 0, "id_task": self.requests_served, "n_ctx": self.spec.n_ctx,
                                   "speculative": False, "is_processing": busy}])

    # --- generation ---------------------------------------------------------------------

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        if not self.ready:
            return _error(503, "model is loading", "unavailable_error")
        if "Authorization" in request.headers or "X-Api-Key" in request.headers:
            # The supervisor keeps API keys to itself: a test sees this 400 if one leaks.
            return _error(400, "fake worker: a client credential reached the worker", "invalid_request_error")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        _say(f"request {request.headers.get('X-Request-Id', '-')}: {request.method} {request.path}")
        max_tokens = body.get("max_tokens")
        n = self.default_tokens if max_tokens is None else int(max_tokens)
        finish = "stop" if max_tokens is None else "length"
        stream = bool(body.get("stream", False))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake-{os.getpid()}-{self.requests_served + self.active + self.queued}"
        created = int(time.time())

        self.queued += 1
        try:
            await self.gen_lock.acquire()
        finally:
            self.queued -= 1
        self.active += 1
        self.last_token_at = time.monotonic()
        try:
            if stream:
                return await self._stream(request, rid, created, n, finish, chat)
            tokens = [tok async for tok in self._tokens(n)]
            text = "".join(tokens)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
                choice["logprobs"] = None
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": self.alias,
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                }
            )
        finally:
            self.active -= 1
            self.last_token_at = None
            self.requests_served += 1
            self.gen_lock.release()

    async def _tokens(self, n: int) -> Any:
        if _env_flag("FAKE_WORKER_STALL_GENERATION"):
            # A hung generation: no token ever; health keeps answering, seconds_since_token grows.
            await self.stopping.wait()
            raise ConnectionResetError("worker stopping")
        for i in range(n):
            await asyncio.sleep(self.token_interval_s)
            self.last_token_at = time.monotonic()
            yield f"tok{i}" if i == 0 else f" tok{i}"

    async def _stream(
        self, request: web.Request, rid: str, created: int, n: int, finish: str, chat: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, role: bool = False, done: bool = False) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish if done else None}
            if chat:
                d: dict[str, Any] = {}
                if role:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                choice["delta"] = d
            else:
                choice["text"] = delta or ""
                choice["logprobs"] = None
            payload = {"id": rid, "object": obj, "created": created, "model": self.alias, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            if chat:
                await resp.write(chunk(None, role=True))
            async for tok in self._tokens(n):
                await resp.write(chunk(tok))
            usage = StreamUsage(model=self.alias, prompt_tokens=1, completion_tokens=n, ttft_s=self.token_interval_s, gen_s=0.0)
            await resp.write(chunk(None, done=True) + usage_trailer(usage) + STREAM_DONE)
            await resp.write_eof()
        except ConnectionResetError:
            # Client went away (or we are stopping): stop generating, like the real worker.
            pass
        return resp


async def _read(request: web.Request) -> web.Response:
    return web.json_response({})


async def _say_path(request: web.Request, response: web.StreamResponse) -> None:
    # What the supervisor asked for (its route table rewrites some paths), on every answer,
    # 404s for the paths this fake does not serve included.
    response.headers["X-Fake-Worker-Path"] = request.path_qs


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


async def serve(spec: LaunchSpec, start_index: int) -> int:
    fake = FakeWorker(spec, start_index)
    app = web.Application(client_max_size=spec.max_body_bytes)
    app.router.add_get("/health", fake.handle_health)
    app.router.add_get("/v1/models", fake.handle_models)
    app.router.add_get("/v1/fake/read", _read)
    app.router.add_get("/slots", fake.handle_slots)
    app.router.add_post("/v1/chat/completions", fake.handle_chat)
    app.router.add_post("/v1/completions", fake.handle_completions)
    app.on_response_prepare.append(_say_path)

    loop = asyncio.get_running_loop()
    if _env_flag("FAKE_WORKER_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _say("ignoring SIGTERM")
    else:
        loop.add_signal_handler(signal.SIGTERM, fake.stopping.set)
    loop.add_signal_handler(signal.SIGINT, fake.stopping.set)

    sock = Path(spec.socket_path)
    if sock.exists() or sock.is_symlink():
        sock.unlink()  # a stale socket from a crashed predecessor
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(sock), backlog=_env_int("FAKE_WORKER_BACKLOG", 128) or 128).start()
    _say(f"listening on {sock}, loading for {fake.load_s}s")
    fake.load_task = asyncio.create_task(fake.load())
    try:
        await fake.stopping.wait()
        _say("stopping")
    finally:
        fake.load_task.cancel()
        await runner.cleanup()
        if sock.exists():
            sock.unlink()
    return ExitCode.OK


def main() -> int:
    parser = argparse.ArgumentParser(description="misbehaving stand-in for python -m worker")
    parser.add_argument("--spec", required=True, help="path of a JSON LaunchSpec")
    args = parser.parse_args()
    try:
        spec = spec_decoder.decode(Path(args.spec).read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        print(f"fake_worker: invalid launch spec {args.spec}: {exc}", file=sys.stderr)
        return ExitCode.BAD_SPEC

    lifetime = _env_float("FAKE_WORKER_MAX_LIFETIME_S", 300.0) or 300.0
    # A thread, not the event loop: it must fire even when the loop is deliberately hung.
    timer = threading.Timer(lifetime, lambda: os._exit(1))
    timer.daemon = True
    timer.start()

    state_dir = os.environ.get("FAKE_WORKER_STATE_DIR")
    start_index = _record_start(state_dir, spec) if state_dir else 0
    if os.environ.get("FAKE_WORKER_CRASH_TIMES") and not state_dir:
        print("fake_worker: FAKE_WORKER_CRASH_TIMES needs FAKE_WORKER_STATE_DIR", file=sys.stderr)
        return ExitCode.BAD_SPEC
    return asyncio.run(serve(spec, start_index))


if __name__ == "__main__":
    sys.exit(main())
