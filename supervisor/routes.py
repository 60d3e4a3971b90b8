"""The paths the supervisor serves, in one table: app.py registers them, auth.py scopes
them, metrics.py groups them, the router rewrites by them.

Rules of this module:
- PURE: paths in, answers out; no aiohttp, no I/O.
- llama-server answers the OpenAI routes with and without ``/v1`` (the openai SDK with a
  base URL that lacks ``/v1`` calls ``/chat/completions``). The supervisor rewrites such a
  root alias to its ``/v1`` path before proxying (``worker_path``), so the worker has one
  route per thing and the alias cannot drift from it. Where llama-server's root path
  answers in its own shape (``/completions``, ``/embeddings``) we answer in OpenAI's, as
  issue 25 asks: clients written for OpenAI come first.
- llama-server's own root endpoints (``/completion``, ``/props``, ``/rerank``, the
  tokenizer, ``POST /slots/{id}``) go to the worker under their own path, routed by the
  request's ``model`` like ``/v1``. ``GET /slots`` is answered by the supervisor
  (balancer.py: from the ready worker, outside admission).
- A new path gets a row here, not an ``if`` somewhere else: the metrics label groups
  paths into a fixed set (``path_group``), so no client-chosen path becomes a label value.
"""

from __future__ import annotations

from typing import Literal

# Root alias -> the /v1 path the worker serves.
V1_ALIASES: dict[str, str] = {
    "/chat/completions": "/v1/chat/completions",
    "/chat/completions/input_tokens": "/v1/chat/completions/input_tokens",
    "/completions": "/v1/completions",
    "/embeddings": "/v1/embeddings",
}

# llama-server's native endpoints at the root, proxied under the same path (the worker
# answers 404 for one it does not serve, e.g. /infill).
WORKER_ROOT_PATHS: tuple[str, ...] = (
    "/tokenize", "/detokenize", "/apply-template",
    "/completion", "/props", "/infill",
    "/rerank", "/reranking",  # /v1/rerank and /v1/reranking go with the rest of /v1
)

# POST /slots/{id}?action=save|restore|erase (llama-server's slot actions), proxied as is.
SLOT_ACTION_PREFIX = "/slots/"
# GET /slots: llama-server's slot list, answered by the supervisor (balancer.py) for paddler.
SLOTS_PATH = "/slots"

# llama-server answers its health check at both; open, as /health.
HEALTH_PATHS: tuple[str, ...] = ("/health", "/v1/health")

# GET /models and /models/{id}: the model list, as /v1/models (answered by the supervisor).
# They do not collide with POST /models/{id}/load|unload (one more segment, admin scope).
MODELS_ALIAS = "/models"

PathGroup = Literal["/v1", "native", "/health", "/status", "/metrics", "other"]


def is_slot_action(path: str) -> bool:
    """``/slots/{id}``: exactly one non-empty segment after ``/slots/``."""
    rest = path[len(SLOT_ACTION_PREFIX):] if path.startswith(SLOT_ACTION_PREFIX) else ""
    return bool(rest) and "/" not in rest


def is_models_alias(path: str) -> bool:
    """``/models`` or ``/models/{id}`` (not ``/models/{id}/load``)."""
    if path == MODELS_ALIAS:
        return True
    rest = path[len(MODELS_ALIAS) + 1:] if path.startswith(MODELS_ALIAS + "/") else ""
    return bool(rest) and "/" not in rest


def path_group(path: str) -> PathGroup:
    """The metrics label of a path, from a fixed set: the OpenAI/Anthropic API under ``/v1``
    and its root aliases are ``/v1``; llama-server's native endpoints are ``native``."""
    if path in HEALTH_PATHS:
        return "/health"
    if path.startswith("/v1/") or path in V1_ALIASES or is_models_alias(path):
        return "/v1"
    if path in WORKER_ROOT_PATHS or is_slot_action(path) or path == SLOTS_PATH:
        return "native"
    if path in ("/status", "/metrics"):
        return path  # type: ignore[return-value]
    return "other"


def is_api(path: str) -> bool:
    """A request a model answers (an inference key may call it; its tokens and duration
    are measured)."""
    return path_group(path) in ("/v1", "native")


def worker_path(path: str) -> str:
    """The path the worker serves for ``path``: a root alias's /v1 path, else itself."""
    return V1_ALIASES.get(path, path)
