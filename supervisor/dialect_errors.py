"""Errors the supervisor answers itself, in the shape of the route's API dialect.

The supervisor writes its own refusals (401/403 keys, 404 unknown model, 408/413 bodies,
429/503 admission) in OpenAI's shape (``proxy.openai_error``). On Anthropic's routes
(``/v1/messages``...) an Anthropic client expects ``{"type": "error", "error": {"type",
"message"}}``: this middleware rewrites such a refusal there, keeping its status and headers
(``Retry-After``, ``WWW-Authenticate``). What the worker answers passes untouched: it
writes these routes' errors in Anthropic's shape itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from worker.protocol import anthropic_error_body, is_anthropic_path


class _OpenAIError(msgspec.Struct):
    message: str


class _OpenAIBody(msgspec.Struct):
    error: _OpenAIError


_decode = msgspec.json.Decoder(_OpenAIBody).decode


@web.middleware
async def anthropic_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    resp = await handler(request)
    if resp.status < 400 or not is_anthropic_path(request.path) or not isinstance(resp, web.Response):
        return resp
    if resp.prepared or not isinstance(resp.body, bytes):
        return resp  # relayed from the worker (already Anthropic-shaped), or streamed
    try:
        message = _decode(resp.body).error.message
    except (msgspec.DecodeError, msgspec.ValidationError):
        return resp
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-type", "content-length")}
    return web.Response(
        status=resp.status, body=anthropic_error_body(resp.status, message), content_type="application/json",
        headers=headers,
    )
