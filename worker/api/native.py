"""Embeddings (``POST /v1/embeddings``) and llama-server's tokenizer routes (``/tokenize``,
``/detokenize``, ``/apply-template``): prompt budgeting against n_ctx."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from aiohttp import web

from worker import openai_schema as oai
from worker.api.chat import chat_messages, tool_dict
from worker.api.run import Runner
from worker.api.shapes import Embedding, EmbeddingList, EmbeddingUsage, enc, json_response


class NativeApi:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def embeddings(self, request: web.Request) -> web.Response:
        runner = self.runner
        runner.require_ready()
        req = oai.decode_as(oai.EmbeddingRequest, await request.read())
        inputs = oai.embedding_inputs(req)
        engine = runner.engine
        if not engine.serves_embeddings:
            raise oai.RequestError(
                f"the model {engine.model_id!r} is not configured for embeddings: set "
                "embeddings = true in its [model] section", param="model",
                code="embeddings_disabled",
            )
        vectors, n_tokens = await runner.off_loop(lambda: engine.embed(inputs))
        b64 = req.encoding_format == "base64"
        data = [
            Embedding(i, base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if b64 else v)
            for i, v in enumerate(vectors)
        ]
        body = EmbeddingList(data, engine.model_id, EmbeddingUsage(n_tokens, n_tokens))
        return json_response(enc.encode(body))

    async def tokenize(self, request: web.Request) -> web.Response:
        self.runner.require_ready()
        req = oai.decode_as(oai.TokenizeRequest, await request.read())
        engine = self.runner.engine

        def run() -> list[Any]:
            ids = engine.tokenize(req.content, req.add_special, req.parse_special)
            if not req.with_pieces:
                return ids
            out: list[Any] = []
            for t in ids:
                raw = engine.piece(t)
                try:  # llama-server: the piece as text, or its bytes when not valid UTF-8
                    piece: Any = raw.decode("utf-8")
                except UnicodeDecodeError:
                    piece = list(raw)
                out.append({"id": t, "piece": piece})
            return out

        return json_response(enc.encode({"tokens": await self.runner.off_loop(run)}))

    async def detokenize(self, request: web.Request) -> web.Response:
        self.runner.require_ready()
        req = oai.decode_as(oai.DetokenizeRequest, await request.read())
        content = await self.runner.off_loop(lambda: self.runner.engine.detokenize(req.tokens))
        return json_response(enc.encode({"content": content}))

    async def apply_template(self, request: web.Request) -> web.Response:
        self.runner.require_ready()
        req = oai.decode_as(oai.ApplyTemplateRequest, await request.read())
        oai.check_messages(req.messages)
        messages = chat_messages(req.messages)
        tools = [tool_dict(t) for t in req.tools] if req.tools else None
        prompt = await self.runner.off_loop(lambda: self.runner.engine.apply_template(messages, tools))
        return json_response(enc.encode({"prompt": prompt}))
