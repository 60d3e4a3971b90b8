"""The contract between the supervisor and a worker process.

Rules for this module:
- It imports nothing heavy (no llama_cpp, no aiohttp): the supervisor imports it and
  must start without llama_cpp installed.
- Every message crossing the process boundary is a msgspec Struct defined here, so the
  two sides cannot drift apart.

How a worker is started: ``<worker_command> --spec PATH`` where PATH holds a JSON
``LaunchSpec``. The worker serves HTTP on ``spec.socket_path`` (a Unix socket, never TCP)
and exits with one of the ``ExitCode`` values below.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

SplitMode = Literal["layer", "row", "none"]
# A template without tool markup: the generic format (worker/engine/tools.py) or a 400.
ToolsMode = Literal["generic", "refuse"]
# llama.cpp's flash attention setting (llama-server's -fa): "auto" lets llama.cpp enable it
# where the device that holds a layer's KV cache supports it (CPU and CUDA do).
FlashAttn = Literal["auto", "on", "off"]


class ExitCode(enum.IntEnum):
    """Why a worker stopped. The supervisor's restart policy acts on these."""

    OK = 0  # asked to stop (SIGTERM/SIGINT) and did
    FAILURE = 1  # anything unexpected: back off and restart
    BAD_SPEC = 3  # the launch spec is invalid: restarting cannot help
    BAD_MODEL = 4  # model file missing, unreadable or not GGUF: restarting cannot help
    OOM = 5  # out of memory while loading: re-plan with a smaller footprint


# Exit codes after which a restart with the same inputs cannot succeed.
PERMANENT_EXIT_CODES = frozenset({ExitCode.BAD_SPEC, ExitCode.BAD_MODEL})

# Substrings of llama.cpp / ggml / CUDA log lines that mean "out of memory".
# Matched case-insensitively against each stderr line of the worker, by the worker
# itself (to choose its exit code) and by the supervisor (a worker killed before it
# could exit cleanly still left these lines behind).
OOM_MARKERS = (
    "out of memory",
    "cudamalloc failed",
    "failed to allocate cuda",
    "unable to allocate cuda",
    "failed to allocate buffer",
    "cuda error: out of memory",
    "cublas_status_alloc_failed",
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating",
    "cannot allocate memory",
)


def is_oom_line(line: str) -> bool:
    low = line.lower()
    if "ggml_backend_cuda_buffer_type_alloc_buffer: allocating" in low:
        # llama.cpp prints this line right before the failure message; only count it
        # when it reports a failure.
        return "failed" in low
    return any(m in low for m in OOM_MARKERS)


# What llama.cpp's RPC client prints when it aborts the worker because a remote host went
# away (ggml-rpc.cpp: the link broke mid-service, or the host did not answer at load). The
# supervisor names the cause in the restart history; the next plan probes the host again.
RPC_LOSS_MARKERS = (
    "remote rpc server crashed or returned malformed response",
    "failed to connect to",
    "rpc handshake failed for",
)


def is_rpc_loss_line(line: str) -> bool:
    low = line.lower()
    return any(m in low for m in RPC_LOSS_MARKERS)


# Prefix of every line the worker writes to stderr that comes from llama.cpp itself,
# so a person (and the supervisor's ring buffer) can tell it from the worker's own lines.
LLAMA_LOG_PREFIX = "llama.cpp: "


# The largest request body a worker reads (the supervisor's router refuses larger ones first).
MAX_BODY_BYTES = 8 * 1024 * 1024


class LaunchSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything a worker needs to load one model. Applied to llama_cpp.Llama as given.

    A setting has one default, in the supervisor's config schema (supervisor/config.py): the
    fields that carry one are required here, so the worker never defaults them again. The
    optional ones are plan results (no GPU by default) or "not set" (None: llama.cpp's or the
    GGUF's own choice).
    """

    model_path: str
    socket_path: str
    model_alias: str | None = None  # id served on /v1/models; default: file stem
    n_gpu_layers: int = 0  # -1 = all layers
    tensor_split: list[float] | None = None
    split_mode: SplitMode
    main_gpu: int = 0
    # Remote devices (llama.cpp rpc-servers, "host:port/device") placed BEFORE the local GPUs in
    # llama_model_params.devices; tensor_split then has their entries first. Empty: local only.
    rpc_devices: list[str] = msgspec.field(default_factory=list)
    n_ctx: int
    n_batch: int
    n_threads: int | None = None  # None: llama.cpp's default
    chat_format: str | None = None  # None: the template in the GGUF metadata
    flash_attn: FlashAttn
    max_body_bytes: int = MAX_BODY_BYTES
    # Requests generated at once (llama.cpp sequences of one context, each with a KV
    # cache of n_ctx cells); 1 serves one request at a time. At most n_batch.
    parallel: int
    # The scheduler (worker/engine/scheduler.py): running streams' inter-token gap kept while
    # newcomers' prompts are read, from the measured step cost, and the least prompt tokens
    # a step takes beside them. Drafts from the context: at most draft_max tokens a step.
    token_gap_ms: int
    prefill_chunk: int
    draft_max: int
    # Host RAM (MiB) for snapshots of earlier prompts' KV (0: none).
    cache_ram_mib: int
    # The disk tier under it: MiB of states kept in cache_dir (0 or an empty dir: none); the
    # worker keeps them in cache_dir/<settings key> (worker/engine/diskcache.py).
    cache_disk_mib: int
    cache_dir: str
    # Every model's disk states together (the parent of cache_dir); 0: no shared budget.
    cache_disk_total_mib: int
    # Unknown top-level request fields: a 400 (True) or ignored and named in the
    # X-Ignored-Params response header (False, as llama-server and vLLM do).
    strict_params: bool
    # Serve /v1/embeddings from a second context on the same weights; pooling "mean",
    # "cls" or "last" (None: the GGUF's, else mean).
    embeddings: bool
    pooling: str | None = None
    # Serve /rerank (llama-server's shape) from a second context with RANK pooling (a
    # reranker GGUF: a classifier head on a BERT-like or Qwen3 model).
    reranking: bool
    # The chat template used instead of the GGUF's: a Jinja file's path or the name of one
    # of llama.cpp's built-in templates (llama_chat_builtin_templates). None: the GGUF's.
    chat_template: str | None
    # Tool requests when the chat template has no tool markup: "generic" (tools described in
    # the system message, a grammar-constrained JSON call) or "refuse" (400 tools_unsupported).
    tools: ToolsMode
    # /v1/responses kept for previous_response_id and GET /v1/responses/{id}: at most this
    # many (least recently stored dropped first), each for this long. 0: none kept.
    responses_store_size: int
    responses_store_ttl_s: float


class AppliedParams(msgspec.Struct, kw_only=True):
    """What the worker actually applied, reported by /health once ready."""

    model_path: str
    n_gpu_layers: int
    tensor_split: list[float] | None
    split_mode: SplitMode
    main_gpu: int
    n_ctx: int
    n_batch: int
    n_threads: int
    chat_format: str | None
    cuda_visible_devices: str | None
    cuda_device_order: str | None
    llama_cpp_version: str
    gpu_offload_supported: bool
    parallel: int
    prefill_chunk: int
    token_gap_ms: int
    draft_max: int
    # How tool calls are written and parsed: "hermes", "llama3", "mistral" (the template's own
    # markup), "generic" (no markup: JSON in a grammar), or None (tools refused).
    tool_format: str | None = None


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Body of the worker's GET /health. 503 while loading, 200 once ready."""

    status: Literal["loading", "ok"]
    pid: int
    progress: float = 0.0  # model load progress, 0..1
    model: str | None = None
    params: AppliedParams | None = None
    # Generation liveness: how many requests are running (in a slot) or waiting, and
    # seconds since ANY running request last made progress (a token or a prompt chunk;
    # None when idle). The supervisor uses this to detect a hung generation.
    active: int = 0
    queued: int = 0
    seconds_since_token: float | None = None
    requests_served: int = 0
    # Prompt reuse from the slots' KV caches: requests that reused a cached prefix and
    # the prompt tokens they did not evaluate again.
    cache_hits: int = 0
    cache_tokens_reused: int = 0
    # The host-RAM cache of KV snapshots: entries, their bytes, requests restored from
    # it and the prompt tokens they did not evaluate again.
    ram_cache_entries: int = 0
    ram_cache_bytes: int = 0
    ram_cache_hits: int = 0
    ram_cache_tokens_saved: int = 0
    # The disk tier (same meanings), plus files dropped as damaged and failed writes.
    disk_cache_entries: int = 0
    disk_cache_bytes: int = 0
    disk_cache_hits: int = 0
    disk_cache_tokens_saved: int = 0
    disk_cache_errors: int = 0
    # The slots' KV cache: tokens it holds now (running and cached prompts alike) and how
    # many it can hold (n_ctx per slot x slots), as llama-server's kv_cache_usage_ratio.
    kv_tokens: int = 0
    kv_capacity: int = 0
    # Drafts from the context: tokens drafted and accepted (llama-server's draft_n and
    # draft_n_accepted, summed over requests).
    draft_tokens: int = 0
    draft_tokens_accepted: int = 0
    # What the drafter learned: a drafted token's acceptance by the length of the match it
    # came from (keyed by the least length of each bucket: "2", "4", "8", "16", "32").
    draft_acceptance: dict[str, float] | None = None
    # The batch steps: how many, their decode rows, how many read prompt tokens and how many
    # read two slots' prompts or more together, and seconds in whole steps and inside
    # llama_decode alone (their difference is the Python around each step).
    steps: int = 0
    step_rows: int = 0
    prompt_steps: int = 0
    shared_prompt_steps: int = 0
    step_seconds: float = 0.0
    decode_seconds: float = 0.0
    # Of kv_tokens, those of slots generating now: the KV a scheduler counts as in use
    # (an idle slot's cached prompt is given up to the next request that needs the slot,
    # as vLLM counts its cached free blocks as free).
    kv_tokens_active: int = 0


health_decoder = msgspec.json.Decoder(Health)
spec_decoder = msgspec.json.Decoder(LaunchSpec)
encoder = msgspec.json.Encoder()


# --- the usage trailer of a streamed answer ------------------------------------------------
# A streamed answer ends with one SSE comment line, written in the same write as
# "data: [DONE]", that tells the supervisor the request's token counts and timing without
# it having to parse every chunk: the supervisor checks only whether a relayed chunk ends
# with [DONE] and, if so, cuts this line out of it. SSE clients ignore comment lines, so a
# stream that reaches a client without passing the supervisor is still valid.
USAGE_TRAILER = b": vram-llm-usage "
STREAM_DONE = b"data: [DONE]\n\n"


class StreamUsage(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None = None  # worker's request arrival -> first generated piece
    gen_s: float | None = None  # first piece -> last piece (inter-token latency basis)


_usage_decoder = msgspec.json.Decoder(StreamUsage)


def usage_trailer(usage: StreamUsage) -> bytes:
    return USAGE_TRAILER + encoder.encode(usage) + b"\n\n"


_TRAILER_LINE = b"\n" + USAGE_TRAILER


def has_usage_trailer(chunk: bytes) -> bool:
    """True when ``chunk`` carries a stream's usage trailer. Every dialect's stream puts it in
    its last write (OpenAI's before ``data: [DONE]``, the Responses and Anthropic streams
    after their last event). Only at the start of a line: generated text inside an event's
    JSON may hold the same words, never a raw line break before them."""
    return chunk.startswith(USAGE_TRAILER) or _TRAILER_LINE in chunk


def split_usage_trailer(chunk: bytes) -> tuple[bytes, StreamUsage | None]:
    """``chunk`` without the usage trailer, and the usage it carried (None if absent or bad)."""
    start = chunk.rfind(USAGE_TRAILER)
    if start < 0:
        return chunk, None
    end = chunk.find(b"\n\n", start)
    if end < 0:
        return chunk, None
    try:
        usage = _usage_decoder.decode(chunk[start + len(USAGE_TRAILER) : end])
    except msgspec.DecodeError:
        usage = None
    return chunk[:start] + chunk[end + 2 :], usage


# --- Anthropic's error shape (the /v1/messages routes), for the worker and the supervisor ---
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    504: "timeout_error", 529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error_body(status: int, message: str) -> bytes:
    """``{"type": "error", "error": {"type", "message"}}``, the type chosen by HTTP status."""
    return encoder.encode({"type": "error", "error": {"type": anthropic_error_type(status), "message": message}})


def is_anthropic_path(path: str) -> bool:
    """The routes answered in Anthropic's shape, errors included."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")
