"""OpenAI's server-sent events for chat completions and completions: chunks, the usage
trailer the supervisor reads, ``[DONE]``, and errors reported in-stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from worker import openai_schema as oai
from worker.api.run import Piece, Run, Runner, cut_error, is_cut, stream_failed
from worker.api.shapes import json_response
from worker.engine import Generation, Prepared
from worker.protocol import STREAM_DONE, StreamUsage, usage_trailer

log = logging.getLogger("worker")


async def stream_openai(
    runner: Runner,
    request: web.Request,
    prepared: Prepared,
    first: bytes | None,
    piece_chunk: Callable[[Piece], bytes],
    final_chunks: Callable[[Run, Piece], bytes],
    with_ids: bool,
    headers: dict[str, str],
    should_stop: Callable[[], bool] | None = None,
    done: bytes = STREAM_DONE,
    on_gen: Callable[[Generation], None] | None = None,
) -> web.StreamResponse:
    """Stream a generation as SSE.

    With ``with_ids`` (return_token_ids) each piece carries the token ids generated
    since the previous one, and ``final_chunks`` gets those not sent yet (tokens whose
    text was held back or cut by a stop string), so the chunks' ids add up to all;
    the same for logprobs when the request asked for them. ``should_stop`` (asked after
    each write) ends the generation early as finished (the repeat rule). ``done`` ends
    the stream (llama-server's native /completion sends no ``[DONE]``); ``on_gen`` as in
    ``Runner.run``.
    """
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    times = [time.monotonic()]  # arrival, then the first piece (usage trailer)

    async def start() -> None:
        # Headers go out when this request gets a slot, not while it waits in the
        # queue: a stream that has not started can still be resent elsewhere by the
        # supervisor if this worker dies before its turn.
        await resp.prepare(request)
        if first is not None:
            await resp.write(first)

    async def write(pieces: list[Piece]) -> bool:
        if len(times) == 1:
            times.append(time.monotonic())
        await resp.write(b"".join(piece_chunk(piece) for piece in pieces))
        return should_stop is not None and should_stop()

    try:
        run = await runner.run(prepared, start, write, with_ids, on_gen)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:
        return await stream_failed(
            resp, e, lambda status, message: json_response(oai.error_body(message, type="server_error"), status),
            lambda status, message: b"data: " + oai.error_body(message, type="server_error") + b"\n\n",
        )
    gen = run.gen
    if is_cut(gen, run.stopped) and not resp.prepared:
        return json_response(cut_error(), 503)  # cut while waiting for a slot
    if is_cut(gen, run.stopped):
        # No finish chunk and no [DONE]: an error event says the answer is incomplete.
        await resp.write(b"data: " + cut_error() + b"\n\n")
    else:
        trailer = usage_trailer(StreamUsage(
            model=runner.engine.model_id, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
            ttft_s=times[1] - times[0] if len(times) > 1 else None,
            gen_s=(gen.last_token_at or times[-1]) - times[1] if len(times) > 1 else None,
        ))
        sent = run.sink.sent
        rest = (
            "",
            gen.token_ids[sent:] if with_ids else None,
            gen.logprobs[sent:] if prepared.sampling.logprobs is not None else None,
        )
        await resp.write(final_chunks(run, rest) + trailer + done)
    await resp.write_eof()
    return resp
