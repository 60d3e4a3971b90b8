"""``Engine``: one loaded model, the face the server talks to."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib

from worker.engine import slotfiles
from worker.engine.batch import BatchLoop
from worker.engine.diskcache import DiskCache, UnsafeDirectory, checked_dir, settings_key
from worker.engine.embed import Embedder, pooling_of, rerank_tokens
from worker.engine.generation import Generation, Pieces, Sink
from worker.engine.load import LlamaLog, load_llama
from worker.engine.prompt import ChatMessage, InvalidInput, Prepared, PromptPreparer, Sampling
from worker.engine.tools import ToolRequest
from worker.protocol import AppliedParams, LaunchSpec

log = logging.getLogger("worker")
# Longest wait for the batch loop's load-time measures (a second on two CPU cores with SmolLM2).
_CALIBRATION_WAIT_S = 120.0


class Engine:
    """One loaded llama.cpp model. See the package rules for threading."""

    def __init__(self, spec: LaunchSpec, log: LlamaLog) -> None:
        self.spec = spec
        self.log = log
        self.model_id = spec.model_alias or os.path.splitext(os.path.basename(spec.model_path))[0]
        self._llama: llama_cpp.Llama | None = None
        self._preparer: PromptPreparer | None = None
        self._pieces: Pieces | None = None
        self.loop: BatchLoop | None = None  # the scheduler; None until loaded
        self._embedder: Embedder | None = None  # with spec.embeddings, once loaded
        self._ranker: Embedder | None = None  # with spec.reranking, once loaded
        self._abort_load = threading.Event()
        self.n_ctx = 0  # one slot's context once loaded

    # --- loading -------------------------------------------------------------------

    def abort_load(self) -> None:
        """Ask a running load() to stop at its next progress report."""
        self._abort_load.set()

    def load(self, progress: Callable[[float], None]) -> None:
        """Load the model and start the batch loop; raises OutOfMemory, LoadCancelled or LoadError."""
        llama = load_llama(self.spec, self.log, self._abort_load, progress)
        self._llama = llama
        # The batch loop drives the context itself (llama_decode + sampler chains); the
        # Llama object's own token bookkeeping (n_tokens, input_ids) is never used.
        ctx = llama._ctx.ctx
        self.n_ctx = int(llama_lib.llama_n_ctx_seq(ctx))  # one slot's context
        self._preparer = PromptPreparer(llama, self.n_ctx, self.spec.tools)
        self._pieces = Pieces(llama._model.vocab)
        self.loop = BatchLoop(
            ctx,
            n_ctx=self.n_ctx,
            n_batch=int(llama_lib.llama_n_batch(ctx)),
            parallel=self.spec.parallel,
            prefill_chunk=self.spec.prefill_chunk,
            token_gap_s=self.spec.token_gap_ms / 1000,
            draft_max=self.spec.draft_max,
            cache_ram_bytes=self.spec.cache_ram_mib * 2**20,
            disk=self._disk_cache(),
        )
        # Ready only once the loop has timed its rows (tokenbatch.py): timings taken while the
        # next model loads beside it would mislead the drafts for this worker's whole life.
        if not self.loop.calibrated.wait(_CALIBRATION_WAIT_S):
            log.warning("the batch loop's load-time measures took over %.0f s; serving anyway", _CALIBRATION_WAIT_S)
        if self.spec.embeddings:
            self._embedder = Embedder(
                llama, int(llama_lib.llama_n_batch(ctx)), pooling_of(llama, self.spec.pooling),
                llama.n_threads,
            )
        if self.spec.reranking:
            self._ranker = Embedder(
                llama, int(llama_lib.llama_n_batch(ctx)), llama_lib.LLAMA_POOLING_TYPE_RANK,
                llama.n_threads, rank=True,
            )
        progress(1.0)

    def _disk_cache(self) -> DiskCache | None:
        """The disk tier of the prompt cache: ``spec.cache_dir``/<settings key>. States
        saved under another key (this model with other settings, another llama.cpp) can
        never be restored by this worker and are removed. None (RAM only, with a warning)
        when the directory cannot be used safely."""
        spec = self.spec
        if spec.cache_disk_mib <= 0 or not spec.cache_dir:
            return None
        key = settings_key(spec.model_path, self.n_ctx, spec.flash_attn, llama_cpp.__version__)
        root = Path(spec.cache_dir)
        try:
            directory = checked_dir(root / key.hex()[:16])
            for stale in root.iterdir():
                if stale.is_dir() and stale != directory and len(stale.name) == 16:
                    shutil.rmtree(stale, ignore_errors=True)
        except (OSError, UnsafeDirectory) as e:
            log.warning("prompt cache on disk turned off: %s; the RAM cache goes on", e)
            return None
        disk = DiskCache(directory, key, spec.cache_disk_mib * 2**20, root.parent, spec.cache_disk_total_mib * 2**20)
        # Indexed before the worker says ready: the first request after a restart or a
        # swap must find its conversation (headers only: milliseconds for thousands).
        disk.scan()
        log.info("prompt cache on disk: %s: %d states, %.0f MiB (up to %d MiB)", directory,
                 disk.stats.entries, disk.stats.bytes / 2**20, spec.cache_disk_mib)
        return disk

    def applied_params(self) -> AppliedParams:
        llama = self._require()
        return AppliedParams(
            model_path=self.spec.model_path,
            n_gpu_layers=self.spec.n_gpu_layers,
            tensor_split=self.spec.tensor_split,
            split_mode=self.spec.split_mode,
            main_gpu=self.spec.main_gpu,
            n_ctx=self.n_ctx,
            n_batch=llama.n_batch,
            n_threads=llama.n_threads,
            chat_format=llama.chat_format,
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            cuda_device_order=os.environ.get("CUDA_DEVICE_ORDER"),
            llama_cpp_version=llama_cpp.__version__,
            gpu_offload_supported=bool(llama_lib.llama_supports_gpu_offload()),
            parallel=self.spec.parallel,
            prefill_chunk=self.spec.prefill_chunk,
            token_gap_ms=self.spec.token_gap_ms,
            draft_max=self.spec.draft_max,
            tool_format=self._preparer.tool_format if self._preparer is not None else None,
        )

    def template_info(self) -> tuple[str, str, str]:
        """The chat template in use (the [model] chat_template override, else the GGUF's;
        a built-in template by its name) and the BOS and EOS tokens' text (llama-server's
        /props fields)."""
        llama = self._require()
        if self.spec.chat_template and llama.chat_handler is not None:
            template = self.spec.chat_template  # a llama.cpp built-in, rendered by name
        else:
            template = llama.metadata.get("tokenizer.chat_template", "")

        def text(token: int) -> str:
            return bytes(llama.detokenize([token], special=True)).decode("utf-8", "replace") if token >= 0 else ""

        return template, text(llama.token_bos()), text(llama.token_eos())

    def model_ftype(self) -> str:
        """The weights' type as llama.cpp names it (``Q4_1``, ``F16``; llama-server's
        /props model_ftype): the last word of llama_model_desc."""
        buf = ctypes.create_string_buffer(256)
        n = llama_lib.llama_model_desc(self._require()._model.model, buf, len(buf))
        desc = buf.raw[: max(n, 0)].decode("utf-8", "replace").split()
        return desc[-1] if desc else ""

    def close(self) -> None:
        """Stop the batch loop (running generations end "cancelled"), then free the model."""
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._ranker is not None:
            self._ranker.close()
            self._ranker = None
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    def _require(self) -> llama_cpp.Llama:
        if self._llama is None:
            raise RuntimeError("the model is not loaded")
        return self._llama

    # --- preparing requests (any thread) ----------------------------------------------

    def prepare_chat(
        self, messages: list[ChatMessage], sampling: Sampling, tools: ToolRequest | None = None,
        continue_final: bool = False,
    ) -> Prepared:
        self._require()
        assert self._preparer is not None
        return self._preparer.prepare_chat(messages, sampling, tools, continue_final)

    def prepare_completion(self, prompt: str | list[int], sampling: Sampling) -> Prepared:
        self._require()
        assert self._preparer is not None
        return self._preparer.prepare_completion(prompt, sampling)

    def apply_template(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> str:
        self._require()
        assert self._preparer is not None
        return self._preparer.apply_template(messages, tools)

    def tokenize(self, content: str, add_special: bool, parse_special: bool) -> list[int]:
        self._require()
        assert self._preparer is not None
        return self._preparer.tokenize(content, add_special, parse_special)

    def n_vocab(self) -> int:
        return int(self._require().n_vocab())

    def piece(self, token: int) -> bytes:
        self._require()
        assert self._preparer is not None
        return self._preparer.piece(token)

    def detokenize(self, tokens: list[int]) -> str:
        self._require()
        assert self._preparer is not None
        return self._preparer.detokenize(tokens)

    # --- embeddings (any thread; one request at a time) ------------------------------

    @property
    def serves_embeddings(self) -> bool:
        return self._embedder is not None

    def embed(self, inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
        """Normalized vectors, one per input, and the number of input tokens."""
        llama = self._require()
        assert self._embedder is not None and self._preparer is not None
        tokens: list[list[int]] = []
        n_vocab = llama.n_vocab()
        items: list[str | list[int]] = list(inputs)
        for i, item in enumerate(items):
            if isinstance(item, str):
                tokens.append(self._preparer.tokenize(item, True, True))
            else:
                for j, t in enumerate(item):
                    if not 0 <= t < n_vocab:
                        raise InvalidInput(
                            f"token id {t} is outside the vocabulary (0..{n_vocab - 1})",
                            f"input[{i}][{j}]",
                        )
                tokens.append(list(item))
        return self._embedder.embed(tokens), sum(map(len, tokens))

    # --- llama-server's slot files (any thread; the work runs on the loop thread) -------

    def slot_action(self, action: str, seq: int, filename: str | None) -> Future[dict[str, Any]]:
        """Save, restore or erase slot ``seq``'s cache (slotfiles.py); InvalidInput for a bad
        slot or file name; the future fails with SlotBusy / SlotFileMissing."""
        self._require()
        assert self.loop is not None
        if not 0 <= seq < len(self.loop.slots):
            raise InvalidInput(f"id_slot must be between 0 and {len(self.loop.slots) - 1}", "id_slot")
        ctx = self._require()._ctx.ctx
        if action == "erase":
            return self.loop.chores.add(seq, lambda slot: slotfiles.erase(ctx, slot))
        if filename is None:
            raise InvalidInput(f"{action} needs a filename", "filename")
        path = slotfiles.slot_file(self.spec.cache_dir, filename)
        if action == "save":
            return self.loop.chores.add(seq, lambda slot: slotfiles.save(ctx, slot, path))
        n_ctx = self.n_ctx
        return self.loop.chores.add(seq, lambda slot: slotfiles.restore(ctx, slot, path, n_ctx))

    # --- reranking (any thread; one request at a time) ------------------------------

    @property
    def serves_reranking(self) -> bool:
        return self._ranker is not None

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """The relevance score of each document for ``query`` (the reranker's raw output,
        as llama-server gives it) and the number of tokens evaluated."""
        llama = self._require()
        assert self._ranker is not None
        pairs = [rerank_tokens(llama, query, d) for d in documents]
        scores = self._ranker.embed(pairs, param="documents")
        return [s[0] if s else 0.0 for s in scores], sum(map(len, pairs))

    # --- generating --------------------------------------------------------------------

    def generation(self, prepared: Prepared, cancel: threading.Event) -> Generation:
        """A generation: iterate it for text, or hand it to ``start`` with a sink."""
        self._require()
        assert self.loop is not None and self._pieces is not None
        return Generation(prepared, cancel, self._pieces, self.loop.submit)

    def start(self, gen: Generation, sink: Sink) -> None:
        """Queue ``gen``; the batch loop calls ``sink`` from its thread as it runs."""
        assert self.loop is not None
        self.loop.submit(gen, sink)
