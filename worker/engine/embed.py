"""Embeddings: a second llama.cpp context on the same weights, created with embeddings on.

Rules for this module:
- The generation context (batch.py) is never switched to embeddings mode: an embedding
  request never waits for a generation slot nor disturbs a running one. This context
  shares the model's weights (no second copy) and has its own small KV cache of
  ``n_batch`` cells, cleared after every decode.
- One request's inputs are packed into as few decodes as fit (``n_batch`` tokens and
  ``_MAX_SEQS`` inputs per decode); one embedding request runs at a time (a lock).
- Pooling: the configured one, else the GGUF's, else mean (a generative model's GGUF says
  none, which gives no per-input vector). Vectors are L2-normalized, as OpenAI's are.
- Reranking (``rank=True``) is the same context with llama.cpp's RANK pooling: each
  input (query and document together, ``rerank_tokens``) gives the model's classifier
  outputs (``n_cls_out`` floats, one for a reranker), returned raw as llama-server does.
"""

from __future__ import annotations

import threading
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
import numpy as np
from llama_cpp._internals import LlamaContext

from worker.engine.prompt import InvalidInput

_MAX_SEQS = 16
POOLINGS = {
    "mean": llama_lib.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_lib.LLAMA_POOLING_TYPE_CLS,
    "last": llama_lib.LLAMA_POOLING_TYPE_LAST,
}


def pooling_of(llama: llama_cpp.Llama, configured: str | None) -> int:
    if configured:
        return POOLINGS[configured]
    arch = llama.metadata.get("general.architecture", "")
    from_gguf = llama.metadata.get(f"{arch}.pooling_type")
    if from_gguf is not None and int(from_gguf) in POOLINGS.values():
        return int(from_gguf)
    return llama_lib.LLAMA_POOLING_TYPE_MEAN


def rerank_tokens(llama: llama_cpp.Llama, query: str, document: str) -> list[int]:
    """One (query, document) pair as a reranker reads it, as llama-server builds it: the
    GGUF's rerank template if it has one, else BOS? query EOS? SEP? document EOS? (each
    special token as the vocabulary asks)."""
    template = llama.metadata.get("tokenizer.chat_template.rerank")
    if template:
        text = template.replace("{query}", query).replace("{document}", document)
        return list(llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))
    vocab = llama._model.vocab
    eos = llama_lib.llama_vocab_eos(vocab)
    if eos < 0:
        eos = llama_lib.llama_vocab_sep(vocab)
    add_eos = bool(llama_lib.llama_vocab_get_add_eos(vocab))
    out: list[int] = []
    if llama_lib.llama_vocab_get_add_bos(vocab):
        out.append(llama_lib.llama_vocab_bos(vocab))
    out += llama.tokenize(query.encode("utf-8"), add_bos=False, special=False)
    if add_eos:
        out.append(eos)
    if llama_lib.llama_vocab_get_add_sep(vocab):
        out.append(llama_lib.llama_vocab_sep(vocab))
    out += llama.tokenize(document.encode("utf-8"), add_bos=False, special=False)
    if add_eos:
        out.append(eos)
    return out


class Embedder:
    def __init__(
        self, llama: llama_cpp.Llama, n_batch: int, pooling: int, n_threads: int, rank: bool = False
    ) -> None:
        params = llama_lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = _MAX_SEQS
        params.kv_unified = True  # the inputs of one decode share the n_batch cells
        params.embeddings = True
        params.pooling_type = llama_lib.LLAMA_POOLING_TYPE_RANK if rank else pooling
        params.n_threads = params.n_threads_batch = n_threads
        self._ctx = LlamaContext(model=llama._model, params=params, verbose=False)
        self.n_batch = n_batch
        self.rank = rank
        # RANK pooling gives the classifier's outputs per sequence, not a hidden state.
        self.n_embd = int(llama_lib.llama_model_n_cls_out(llama._model.model)) if rank else int(llama.n_embd())
        self._batch = llama_lib.llama_batch_init(n_batch, 0, 1)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            llama_lib.llama_batch_free(self._batch)
            self._ctx.close()

    def embed(self, inputs: list[list[int]], param: str = "input") -> list[list[float]]:
        for i, toks in enumerate(inputs):
            if not toks:
                raise InvalidInput("an input must not be empty", f"{param}[{i}]")
            if len(toks) > self.n_batch:
                raise InvalidInput(
                    f"input of {len(toks)} tokens is longer than the embedding context "
                    f"({self.n_batch} tokens, [model] n_batch)", f"{param}[{i}]",
                )
        out: list[list[float]] = []
        with self._lock:
            group: list[list[int]] = []
            for toks in inputs:
                if group and (len(group) == _MAX_SEQS or sum(map(len, group)) + len(toks) > self.n_batch):
                    out.extend(self._decode(group))
                    group = []
                group.append(toks)
            if group:
                out.extend(self._decode(group))
        return out

    def _decode(self, group: list[list[int]]) -> list[list[float]]:
        ctx: Any = self._ctx.ctx
        batch = self._batch
        i = 0
        for seq, toks in enumerate(group):
            for pos, t in enumerate(toks):
                batch.token[i] = t
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1  # an output row per token: pooling reads them
                i += 1
        batch.n_tokens = i
        llama_lib.llama_memory_clear(llama_lib.llama_get_memory(ctx), True)
        rc = llama_lib.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed for embeddings (code {rc})")
        vectors = []
        for seq in range(len(group)):
            ptr = llama_lib.llama_get_embeddings_seq(ctx, seq)
            if not ptr:
                raise RuntimeError("llama.cpp returned no pooled embedding")
            v = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float64)
            if self.rank:
                vectors.append(v.tolist())
                continue
            norm = float(np.linalg.norm(v))
            vectors.append((v / norm if norm > 0 else v).tolist())
        return vectors
