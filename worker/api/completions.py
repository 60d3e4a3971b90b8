"""OpenAI completions (``POST /v1/completions``): a raw prompt, no chat template, no tools."""

from __future__ import annotations

import dataclasses
import time
import uuid

from aiohttp import web
from msgspec import UNSET

from worker import openai_schema as oai
from worker.api.chat import sampling_of, usage_of
from worker.api.openai_sse import stream_openai
from worker.api.run import Piece, Run, Runner, Stopwatch, cut_error, finish_of
from worker.api.shapes import (
    TextChoice,
    TextChunk,
    TextChunkWithUsage,
    TextCompletion,
    enc,
    json_response,
    sse,
    text_logprobs,
)
from worker.engine import Prepared


class CompletionsApi:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def completions(self, request: web.Request) -> web.StreamResponse:
        runner = self.runner
        runner.require_ready()
        req, ignored = oai.decode_completion(await request.read(), runner.spec.strict_params)
        headers = runner.ignored_params(request, ignored)
        prompt: str | list[int]
        if isinstance(req.prompt, str):
            prompt = req.prompt
        elif isinstance(req.prompt[0], str):
            prompt = req.prompt[0]  # type: ignore[assignment]
        else:
            prompt = req.prompt  # type: ignore[assignment]
        max_tokens = oai.max_tokens_of(req, 16)  # 16: OpenAI's default
        sampling = sampling_of(req, max_tokens)
        if req.logprobs is not None:
            sampling = dataclasses.replace(sampling, logprobs=req.logprobs)
        engine = runner.engine
        prepared = await runner.prepare(lambda: engine.prepare_completion(prompt, sampling), "prompt")
        cid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            clock = Stopwatch() if req.timings_per_token else None
            return await self._stream(request, prepared, cid, include_usage, req.return_token_ids, headers, clock)
        out = await runner.complete(prepared)
        if out.cut:
            return json_response(cut_error(), 503)
        gen = out.gen
        ids = req.return_token_ids
        body = TextCompletion(
            id=cid,
            created=int(time.time()),
            model=engine.model_id,
            choices=[TextChoice(
                0, out.text, out.finish,
                logprobs=text_logprobs(gen.logprobs, 0) if req.logprobs is not None else None,
                prompt_token_ids=prepared.tokens if ids else UNSET,
                token_ids=gen.token_ids if ids else UNSET,
            )],
            usage=usage_of(gen),
        )
        return json_response(enc.encode(body), headers=headers)

    async def _stream(
        self, request: web.Request, prepared: Prepared, cid: str, include_usage: bool,
        with_ids: bool, headers: dict[str, str], clock: Stopwatch | None = None,
    ) -> web.StreamResponse:
        """``clock``: llama-server's timings_per_token (each chunk carries ``timings``)."""
        created = int(time.time())
        model = self.runner.engine.model_id
        chunk_cls = TextChunkWithUsage if include_usage else TextChunk
        offset = [0]  # characters of the tokens whose logprobs were sent (text_offset)

        def chunk(finish: str | None, piece: Piece) -> bytes:
            text, ids, lps = piece
            logprobs = None
            if lps is not None:
                logprobs = text_logprobs(lps, offset[0])
                offset[0] += sum(len(t) for t in logprobs.tokens)
            choice = TextChoice(0, text, finish, logprobs=logprobs, token_ids=UNSET if ids is None else ids)
            out = chunk_cls(cid, created, model, [choice])
            if clock is not None:
                clock.piece()
                out.timings = clock.timings()
            return sse(out)

        def final(run: Run, rest: Piece) -> bytes:
            out = chunk(finish_of(run.gen), rest)
            if include_usage:
                out += sse(TextChunkWithUsage(cid, created, model, [], usage=usage_of(run.gen)))
            return out

        first = None
        if with_ids:  # vLLM sends the prompt's token ids on the first chunk's choice
            choice = TextChoice(0, "", None, prompt_token_ids=prepared.tokens, token_ids=[])
            first = sse(chunk_cls(cid, created, model, [choice]))
        return await stream_openai(
            self.runner, request, prepared, first, lambda piece: chunk(None, piece), final, with_ids, headers,
            on_gen=clock.on_gen if clock is not None else None,
        )
