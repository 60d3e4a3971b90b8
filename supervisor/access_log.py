"""Request ids, one access log line per request, and the JSON log format.

Rules of this module:
- The middleware here is the outermost one: every request, refused ones included, gets
  an id (the client's ``X-Request-Id`` when it is sane, else a new one), the id goes back
  in the response's ``X-Request-Id`` header (set when headers are sent, so streamed
  answers carry it too), and one ``vram_llm.access`` line is logged when the request ends.
- Handlers fill the request's ``RequestRecord`` (``record(request)``): the proxy writes the
  model, token counts and timings it learns from the worker; auth writes the key's name.
  Nothing else writes it, and it is read once, when the request ends.
- How the proxy learns token counts without parsing streamed bytes: a non-streamed
  answer is small and already read whole, so its OpenAI ``usage`` and ``model`` fields
  are decoded (msgspec, a few microseconds); a streamed answer ends with the worker's
  usage trailer, an SSE comment line in the same write as ``data: [DONE]``
  (``worker.protocol.usage_trailer``), which the proxy cuts out of the final chunk, so the
  client sees a plain OpenAI stream. TTFT of a non-streamed answer is not measured.
- /health and /metrics are polled by machines: their lines are DEBUG, the rest INFO.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from worker.protocol import StreamUsage

access_log = logging.getLogger("vram_llm.access")

REQUEST_ID_HEADER = "X-Request-Id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_RECORD = "vram_llm_record"
_QUIET = frozenset({"/health", "/v1/health", "/metrics"})
# What the log learns about the caller (written by supervisor/auth.py): the key's name, never the key.
KEY_NAME = "vram_llm_key_name"


def request_id_for(header: str | None) -> str:
    """The client's id if it is sane (no spaces, quotes or control bytes to forge log lines)."""
    if header is not None and _SANE_ID.fullmatch(header):
        return header
    # 32 random hex digits, as uuid4().hex but without building a UUID (a tenth of the cost,
    # on every request that brings no id).
    return os.urandom(16).hex()


@dataclass
class RequestRecord:
    request_id: str
    started: float  # time.monotonic() when the request arrived
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_wait_s: float | None = None  # until a ready worker took it
    sent_at: float | None = None  # monotonic: the request went to a worker (the last one, after a resend)
    ttft_s: float | None = None  # arrival -> first generated token (streamed answers)
    inter_token_s: float | None = None  # mean gap between generated tokens (streamed answers)
    # The status of an answer whose last byte was written: a client that hangs up after the
    # stream's [DONE] cancels the handler, but it was answered, not a 499.
    answered: int | None = None

    def worker_taken(self, now: float) -> None:
        """The proxy got a ready worker at monotonic ``now``."""
        if self.queue_wait_s is None:
            self.queue_wait_s = now - self.started
        self.sent_at = now

    def body_usage(self, body: bytes) -> None:
        """Token counts and model from a non-streamed OpenAI answer (ignored if absent)."""
        try:
            ans = _answer_decoder.decode(body)
        except msgspec.DecodeError:
            return
        self.model = ans.model or self.model
        if ans.usage is not None:
            self.prompt_tokens = ans.usage.prompt_tokens or ans.usage.input_tokens
            self.completion_tokens = ans.usage.completion_tokens or ans.usage.output_tokens
        elif ans.tokens_evaluated is not None:  # llama-server's native /completion answer
            self.prompt_tokens = ans.tokens_evaluated
            self.completion_tokens = ans.tokens_predicted or 0

    def stream_usage(self, usage: StreamUsage | None) -> None:
        """Token counts and timing from a stream's usage trailer."""
        if usage is None:
            return
        self.model = usage.model or self.model
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        if usage.ttft_s is not None:
            self.ttft_s = ((self.sent_at or self.started) - self.started) + usage.ttft_s
        if usage.gen_s is not None and usage.completion_tokens > 1:
            self.inter_token_s = usage.gen_s / (usage.completion_tokens - 1)


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0  # chat and completions
    completion_tokens: int = 0
    input_tokens: int = 0  # Responses and Anthropic Messages
    output_tokens: int = 0


class _Answer(msgspec.Struct):
    model: str | None = None
    usage: _Usage | None = None
    tokens_evaluated: int | None = None  # llama-server's /completion (no usage block)
    tokens_predicted: int | None = None


_answer_decoder = msgspec.json.Decoder(_Answer)


@dataclass(frozen=True)
class Finished:
    """A request that has ended, as the access log and the metrics see it."""

    record: RequestRecord
    method: str
    path: str
    status: int
    duration_s: float
    key_name: str | None
    client: str | None

    def fields(self) -> dict[str, Any]:
        r = self.record
        return {
            "request_id": r.request_id,
            "method": self.method,
            "path": self.path,
            "model": r.model,
            "status": self.status,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "ttft_ms": None if r.ttft_s is None else round(r.ttft_s * 1000, 1),
            "duration_ms": round(self.duration_s * 1000, 1),
            "key": self.key_name,
            "client": self.client,
        }


def record(request: web.Request) -> RequestRecord:
    """This request's record (one is made for a request the middleware did not see)."""
    rec: RequestRecord | None = request.get(_RECORD)
    if rec is None:
        rec = request[_RECORD] = RequestRecord(request_id_for(request.headers.get(REQUEST_ID_HEADER)), time.monotonic())
    return rec


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


class RequestLog:
    """The outermost middleware; ``on_finished`` (the metrics) sees every ended request."""

    def __init__(self, on_finished: Callable[[Finished], None] | None = None) -> None:
        self._on_finished = on_finished

    def install(self, app: web.Application) -> None:
        app.middlewares.insert(0, self.middleware)
        app.on_response_prepare.append(self._set_header)

    @staticmethod
    async def _set_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[REQUEST_ID_HEADER] = record(request).request_id

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        rec = record(request)
        status = 499  # nginx's "client closed request": cancelled before an answer
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            if status == 499 and rec.answered is not None:
                status = rec.answered
            self.finished(Finished(
                rec, request.method, request.path, status, time.monotonic() - rec.started,
                request.get(KEY_NAME), request.remote,
            ))

    def finished(self, done: Finished) -> None:
        """One ended request: its log line, then ``on_finished``. The middleware calls it,
        and so does supervisor/fastpath.py for the requests it answers before aiohttp."""
        rec = done.record
        level = logging.DEBUG if done.path in _QUIET else logging.INFO
        if access_log.isEnabledFor(level):
            fields = done.fields()
            access_log.log(
                level,
                "%s %s %s %d model=%s tokens=%s/%s ttft_ms=%s duration_ms=%s key=%s client=%s",
                rec.request_id, done.method, done.path, done.status, _dash(rec.model),
                _dash(rec.prompt_tokens), _dash(rec.completion_tokens), _dash(fields["ttft_ms"]),
                fields["duration_ms"], _dash(done.key_name), _dash(done.client),
                extra={"request": fields},
            )
        if self._on_finished is not None:
            self._on_finished(done)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
