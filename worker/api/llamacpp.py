"""llama-server's own endpoints in its shapes: ``POST /completion``, ``GET /props`` (and
``POST /props``, refused), ``POST /rerank``.

Rules for this module:
- The shapes follow llama-server's ``tools/server`` code (server-task.cpp
  ``to_json_non_oaicompat``, ``result_timings::to_json``, ``task_params::to_json``;
  server-context.cpp ``get_props``; server-common.cpp ``format_response_rerank``): the
  field names and their nesting are the contract its clients (its web UI, SillyTavern,
  scripts) read. Values we cannot measure the way llama-server does are documented where
  they are computed.
- Generation goes through ``Runner.run`` (one generation path for every dialect); this
  module only shapes requests and answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from worker import openai_schema as oai
from worker.api.chat import sampling_of
from worker.api.openai_sse import stream_openai
from worker.api.run import GenerationFailed, Piece, Run, Runner, Stopwatch, cut_error, is_cut, millis
from worker.api.shapes import Timings, enc, json_response, piece_text
from worker.engine import SLOT_ACTIONS, Generation, Prepared, SlotBusy, SlotFileMissing, TokenLogprob

# llama.cpp's LLAMA_DEFAULT_SEED: what llama-server reports when no seed was sent.
_DEFAULT_SEED = 0xFFFFFFFF
# The sampler order of our chains (worker/engine/chains.py), in llama-server's names.
_SAMPLERS = ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"]


class Progress(msgspec.Struct):
    """llama-server's ``prompt_progress`` (return_progress)."""

    total: int
    cache: int
    processed: int
    time_ms: float


class TopProb(msgspec.Struct):
    id: int
    token: str
    bytes: list[int]
    logprob: float


class TokenProb(msgspec.Struct):
    id: int
    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[TopProb]


class Partial(msgspec.Struct):
    """A streamed piece (server_task_result_cmpl_partial::to_json_non_oaicompat)."""

    index: int
    content: str
    tokens: list[int]
    stop: bool
    id_slot: int
    tokens_predicted: int
    tokens_evaluated: int
    timings: Timings | UnsetType = UNSET
    prompt_progress: Progress | UnsetType = UNSET
    completion_probabilities: list[TokenProb] | UnsetType = UNSET


class Final(msgspec.Struct):
    """The answer, or a stream's last event (server_task_result_cmpl_final::to_json_non_oaicompat)."""

    index: int
    content: str
    tokens: list[int]
    id_slot: int
    stop: bool
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    generation_settings: dict[str, Any]
    prompt: str
    has_new_line: bool
    truncated: bool
    stop_type: str
    stopping_word: str
    tokens_cached: int
    timings: Timings
    completion_probabilities: list[TokenProb] | UnsetType = UNSET


def generation_settings(req: oai.NativeCompletionRequest, only_metrics: bool = False) -> dict[str, Any]:
    """llama-server's ``generation_settings`` (task_params::to_json): every key it writes.
    Samplers we do not run (DRY, XTC, mirostat, dynamic temperature, top-n-sigma) show
    llama.cpp's values that turn them off, which is what they are here."""
    n_predict = oai.max_tokens_of(req, None)
    biases = req.logit_bias if isinstance(req.logit_bias, dict) else {}  # ids by now (the route's)
    out: dict[str, Any] = {
        "seed": _DEFAULT_SEED if req.seed is None else req.seed & 0xFFFFFFFF,
        "temperature": req.temperature,
        "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0,
        "top_k": req.top_k,
        "top_p": req.top_p,
        "min_p": req.min_p,
        "top_n_sigma": -1.0,
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "typical_p": req.typical_p,
        "repeat_last_n": 64,
        "repeat_penalty": req.repetition_penalty or req.repeat_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": 64,
        "dry_sequence_breakers": ["\n", ":", '"', "*"],
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.1,
        "adaptive_target": -1.0,
        "adaptive_decay": 0.9,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or ()),
        "max_tokens": -1 if n_predict is None else n_predict,
        "n_predict": -1 if n_predict is None else n_predict,
        "n_keep": req.n_keep,
        "n_discard": 0,
        "ignore_eos": req.ignore_eos,
        "stream": req.stream,
        "logit_bias": [{"bias": v, "token": int(k)} for k, v in biases.items()],
        "n_probs": req.n_probs,
        "min_keep": 0,
        "grammar": req.grammar or "",
        "grammar_lazy": False,
        "grammar_triggers": [],
        "preserved_tokens": [],
        "chat_format": "Content-only",
        "reasoning_format": "none",
        "reasoning_in_content": False,
        "generation_prompt": "",
        "samplers": list(_SAMPLERS),
        "speculative.types": "none",
        "timings_per_token": req.timings_per_token,
        "post_sampling_probs": req.post_sampling_probs,
        "backend_sampling": False,
        "lora": [],
    }
    if only_metrics:  # /props: the settings without the per-request lists
        for key in ("stop", "logit_bias", "grammar", "grammar_lazy", "grammar_triggers",
                    "preserved_tokens", "dry_sequence_breakers"):
            del out[key]
    return out


_DEFAULTS = oai.NativeCompletionRequest(prompt="")


def _stop_type(gen: Generation) -> str:
    if gen.finish_reason == "length":
        return "limit"
    if gen.finish_reason == "stop":
        return "word" if gen.stop_string is not None else "eos"
    return "none"


class _Follow(Stopwatch):
    """One request's generation as llama-server reports it: its slot and its timings."""

    def __init__(self, runner: Runner) -> None:
        super().__init__()
        self.runner = runner
        self.slot = -1

    def started(self) -> None:
        """The slot a running generation occupies (read on the event loop while the batch
        loop runs it; a generation that ended already keeps -1, llama-server's "any")."""
        loop = self.runner.engine.loop
        if self.slot < 0 and loop is not None and self.gen is not None:
            self.slot = next((s.seq for s in loop.slots if s.gen is self.gen), -1)

    def piece_arrived(self) -> None:
        self.piece()
        self.started()


class LlamaCppApi:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._ids_by_piece: dict[bytes, int] | None = None  # for top_logprobs' ids, once asked

    # --- POST /completion ----------------------------------------------------------------

    def _prompt_tokens(self, prompt: str | list[str | int]) -> str | list[int]:
        """llama-server's tokenize_mixed: strings tokenized (special tokens parsed; BOS
        only when the prompt starts with text), token ids as they are."""
        if isinstance(prompt, str):
            return prompt
        out: list[int] = []
        engine = self.runner.engine
        for i, part in enumerate(prompt):
            if isinstance(part, str):
                out += engine.tokenize(part, add_special=i == 0, parse_special=True)
            else:
                out.append(part)
        return out

    def _token_biases(self, req: oai.NativeCompletionRequest) -> dict[str, float]:
        """llama-server's logit_bias forms as the token-id keyed dict every route uses (a
        text's tokens each get its bias, as llama-server does)."""
        engine = self.runner.engine
        n_vocab = engine.n_vocab()
        out: dict[str, float] = {}
        for key, value in oai.native_biases(req):
            if isinstance(key, str):
                for t in engine.tokenize(key, add_special=False, parse_special=False):
                    out[str(t)] = value
            elif 0 <= key < n_vocab:  # llama-server skips ids outside the vocabulary
                out[str(key)] = value
        return out

    def _ids_of_pieces(self) -> dict[bytes, int]:
        """Token id by its text, for top_logprobs (the engine reports alternatives by text;
        when two tokens share a text the lower id is named)."""
        if self._ids_by_piece is None:
            engine = self.runner.engine
            ids: dict[bytes, int] = {}
            for t in range(engine.n_vocab()):
                ids.setdefault(engine.piece(t), t)
            self._ids_by_piece = ids
        return self._ids_by_piece

    def _probs(self, ids: list[int], lps: list[TokenLogprob]) -> list[TokenProb]:
        by_piece = self._ids_by_piece or {}
        return [
            TokenProb(t, piece_text(lp.piece), list(lp.piece), lp.logprob,
                      [TopProb(by_piece.get(p, -1), piece_text(p), list(p), v) for p, v in lp.top])
            for t, lp in zip(ids, lps)
        ]

    async def completion(self, request: web.Request) -> web.StreamResponse:
        runner = self.runner
        runner.require_ready()
        req, ignored = oai.decode_native_completion(await request.read(), runner.spec.strict_params)
        headers = runner.ignored_params(request, ignored)
        engine = runner.engine
        prompt = await runner.off_loop(lambda: self._prompt_tokens(req.prompt))
        if req.logit_bias:
            biases = await runner.off_loop(lambda: self._token_biases(req))
            req = msgspec.structs.replace(req, logit_bias=biases or None)
        sampling = sampling_of(req, oai.max_tokens_of(req, None))
        if req.n_probs:
            sampling = dataclasses.replace(sampling, logprobs=req.n_probs)
            await runner.off_loop(self._ids_of_pieces)
        prepared = await runner.prepare(lambda: engine.prepare_completion(prompt, sampling), "prompt")
        prompt_text = await runner.off_loop(lambda: engine.detokenize(prepared.tokens))
        follow = _Follow(runner)
        settings = generation_settings(req)
        if req.stream:
            return await self._stream(request, req, prepared, follow, settings, prompt_text, headers)
        parts: list[str] = []

        async def on_start() -> None:
            follow.started()

        async def pieces(ps: list[Piece]) -> None:
            follow.piece_arrived()
            parts.extend(p[0] for p in ps)

        try:
            run = await runner.run(prepared, on_start, pieces, on_gen=follow.on_gen)
        except GenerationFailed as e:
            raise oai.RequestError(e.message, type="server_error", code=None, status=e.status) from None
        if is_cut(run.gen, run.stopped):
            return json_response(cut_error(), 503)
        gen = run.gen
        body = self._final(req, gen, follow, settings, prompt_text, "".join(parts))
        if req.n_probs:
            body.completion_probabilities = self._probs(gen.token_ids, gen.logprobs)
        return json_response(enc.encode(body), headers=headers)

    def _final(
        self, req: oai.NativeCompletionRequest, gen: Generation, follow: _Follow, settings: dict[str, Any],
        prompt_text: str, content: str,
    ) -> Final:
        return Final(
            index=0, content=content,
            tokens=list(gen.token_ids) if req.return_tokens and not req.stream else [],
            id_slot=follow.slot, stop=True, model=self.runner.engine.model_id,
            tokens_predicted=gen.completion_tokens, tokens_evaluated=gen.prompt_tokens,
            generation_settings=settings, prompt=prompt_text, has_new_line="\n" in content,
            truncated=False,  # a prompt longer than the context is a 400, never cut
            stop_type=_stop_type(gen), stopping_word=gen.stop_string or "",
            # The KV cache holds every token but the last sampled one (never decoded).
            tokens_cached=gen.prompt_tokens + max(gen.completion_tokens - 1, 0),
            timings=follow.timings(),
        )

    async def _stream(
        self, request: web.Request, req: oai.NativeCompletionRequest, prepared: Prepared, follow: _Follow,
        settings: dict[str, Any], prompt_text: str, headers: dict[str, str],
    ) -> web.StreamResponse:
        content = [False]  # a newline was streamed (has_new_line)
        with_probs = req.n_probs > 0

        def partial(piece: Piece, progress: bool = False) -> bytes:
            text, ids, lps = piece
            gen = follow.gen
            assert gen is not None
            now = time.monotonic()
            chunk = Partial(
                0, text, ids or [], False, follow.slot, gen.completion_tokens, gen.prompt_tokens,
            )
            if req.timings_per_token:
                chunk.timings = follow.timings()
            if progress:
                total, cached = gen.prompt_tokens, gen.prompt_cached
                start = gen.started_at or now
                chunk.prompt_progress = Progress(total, cached, total - cached, millis(now - start))
            if with_probs and lps:
                chunk.completion_probabilities = self._probs(ids or [], lps)
            return b"data: " + enc.encode(chunk) + b"\n\n"

        def piece_chunk(piece: Piece) -> bytes:
            out = b""
            if follow.first_at is None:
                follow.piece_arrived()
                if req.return_progress:  # the prompt is evaluated once the first text exists
                    out += partial(("", [], None), progress=True)
            follow.started()
            if "\n" in piece[0]:
                content[0] = True
            return out + partial(piece)

        def final(run: Run, rest: Piece) -> bytes:
            out = b""
            if rest[1] or rest[2]:  # tokens whose text was held back (a stop string's start)
                out += partial(rest)
            body = self._final(req, run.gen, follow, settings, prompt_text, "")
            body.has_new_line = content[0]
            return out + b"data: " + enc.encode(body) + b"\n\n"

        # Tokens travel with each piece when asked (return_tokens) or for n_probs' ids.
        return await stream_openai(
            self.runner, request, prepared, None, piece_chunk, final, req.return_tokens or with_probs,
            headers, done=b"", on_gen=follow.on_gen,
        )

    # --- /props --------------------------------------------------------------------------

    async def props(self, request: web.Request) -> web.Response:
        runner = self.runner
        runner.require_ready()
        engine = runner.engine
        template, bos, eos = await runner.off_loop(engine.template_info)
        params = engine.applied_params()
        tools = params.tool_format not in (None, "generic")  # the template's own tool markup
        body = {
            "default_generation_settings": {
                "params": generation_settings(_DEFAULTS, only_metrics=True),
                "n_ctx": engine.n_ctx,
            },
            "total_slots": runner.spec.parallel,
            "model_alias": engine.model_id,
            "model_ftype": engine.model_ftype(),
            "model_path": runner.spec.model_path,
            "modalities": {"vision": False, "video": False, "audio": False},
            "media_marker": "",  # text only: no media in prompts
            "endpoint_slots": True,
            "endpoint_props": False,
            "endpoint_metrics": True,
            "ui": False,  # no web UI is served
            "ui_settings": {},
            "chat_template": template,
            "chat_template_caps": {
                "supports_object_arguments": tools,
                "supports_parallel_tool_calls": tools,
                "supports_preserve_reasoning": False,
                "supports_reasoning_effort": False,
                "supports_string_content": True,
                "supports_system_role": True,
                "supports_tool_calls": tools,
                "supports_tools": tools,
                "supports_typed_content": False,
            },
            "bos_token": bos,
            "eos_token": eos,
            "build_info": f"vram-llm (llama-cpp-python {params.llama_cpp_version})",
            "is_sleeping": False,
            "cors_proxy_enabled": False,
        }
        return json_response(enc.encode(body))

    async def set_props(self, request: web.Request) -> web.Response:
        raise oai.RequestError(
            "This server does not support changing global properties: settings come from the "
            "config file ([model] section)", type="not_supported_error", code="not_supported", status=501,
        )

    # --- POST /slots/{id}?action=save|restore|erase ---------------------------------------

    async def slot_action(self, request: web.Request) -> web.Response:
        """llama-server's slot files: the slot's cached prompt (tokens and KV state) saved to
        a named file under the model's cache_dir, restored into a slot, or erased."""
        runner = self.runner
        runner.require_ready()
        raw_id = request.match_info["id_slot"]
        if not raw_id.isdigit():
            raise oai.RequestError(f"id_slot must be a slot number, got {raw_id!r}", param="id_slot",
                                   code="invalid_value")
        action = request.query.get("action", "")
        if action not in SLOT_ACTIONS:
            raise oai.RequestError(f"action must be one of {', '.join(SLOT_ACTIONS)}, got {action!r}",
                                   param="action", code="invalid_value")
        body = await request.read()
        filename = None
        if action != "erase" or body.strip():
            filename = oai.decode_as(oai.SlotFileRequest, body).filename
        engine = runner.engine
        fut = await runner.off_loop(lambda: engine.slot_action(action, int(raw_id), filename))
        try:
            result = await asyncio.wrap_future(fut)
        except SlotBusy as e:
            raise oai.RequestError(str(e), param="id_slot", code="slot_busy", status=409) from None
        except SlotFileMissing as e:
            raise oai.RequestError(str(e), param="filename", code="not_found", status=404) from None
        return json_response(enc.encode(result))

    # --- POST /rerank --------------------------------------------------------------------

    async def rerank(self, request: web.Request) -> web.Response:
        runner = self.runner
        runner.require_ready()
        req = oai.decode_as(oai.RerankRequest, await request.read())
        engine = runner.engine
        if not engine.serves_reranking:
            raise oai.RequestError(
                f"the model {engine.model_id!r} is not configured for reranking: set reranking = true "
                "in its [model] section (a reranker GGUF)", param="model", code="reranking_disabled",
            )
        scores, n_tokens = await runner.off_loop(lambda: engine.rerank(req.query, req.documents))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
        top_n = len(order) if req.top_n is None else req.top_n
        results: list[dict[str, Any]] = []
        for i in order[:top_n]:
            item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:  # Jina's and Cohere's shape
                item["document"] = {"text": req.documents[i]}
            results.append(item)
        body = {
            "model": engine.model_id,
            "object": "list",
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "results": results,
        }
        return json_response(enc.encode(body))
