"""The inference engine: the only package in vram-llm that imports llama_cpp.

Rules for this package:
- server.py reaches the model only through ``Engine``: ``load()``, ``prepare_chat()``,
  ``prepare_completion()``, ``generation()`` and ``start()``.
- ``Llama`` is used to load the model, render chat templates and tokenize. Generation
  does not go through its Python loop: the batch loop calls llama.cpp's C API directly
  (``llama_decode`` on one reused ``llama_batch``, a ``llama_sampler`` chain per request,
  ``llama_token_to_piece`` once per vocabulary entry) so the per-token Python work is a
  few calls and no copy of the logits (only a request asking for logprobs reads its row).
- Threads: ``load()`` runs in a loader thread; ``prepare_*()`` in helper threads (they
  read the vocabulary, never the context); ONE batch-loop thread owns the context and
  runs every generation (``batch.py``).

The seams, one module each: ``load`` (llama.cpp log, model and context), ``prompt``
(template, tokens, request validation), ``chains`` (sampler chains), ``stops`` (stop
strings), ``generation`` (one request's per-token processing), ``tools`` (tool-call formats), ``slots`` (sequences and
their cached prompts), ``batch`` (the decode loop and admission), ``core`` (``Engine``).
"""

from worker.engine.core import Engine
from worker.engine.generation import Generation, Sink, TokenLogprob
from worker.engine.load import BadSetting, LlamaLog, LoadCancelled, LoadError, OutOfMemory
from worker.engine.prompt import ChatMessage, InvalidInput, Prepared, PromptTooLong, Sampling
from worker.engine.slotfiles import ACTIONS as SLOT_ACTIONS
from worker.engine.slotfiles import SlotBusy, SlotFileMissing
from worker.engine.stops import _held_back, _stop_at
from worker.engine.tools import CallStream, ParsedCall, StreamSplit, ToolRequest, parse_calls

__all__ = [
    "BadSetting",
    "CallStream",
    "ChatMessage",
    "Engine",
    "Generation",
    "InvalidInput",
    "LlamaLog",
    "LoadCancelled",
    "LoadError",
    "OutOfMemory",
    "Prepared",
    "PromptTooLong",
    "SLOT_ACTIONS",
    "Sampling",
    "SlotBusy",
    "SlotFileMissing",
    "Sink",
    "StreamSplit",
    "ParsedCall",
    "TokenLogprob",
    "ToolRequest",
    "_held_back",
    "_stop_at",
    "parse_calls",
]
