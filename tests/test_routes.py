"""supervisor/routes.py: the one table of the paths the supervisor serves (issue 25)."""

from __future__ import annotations

import pytest

from supervisor.routes import V1_ALIASES, is_api, is_models_alias, is_slot_action, path_group, worker_path


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/chat/completions", "/v1/chat/completions"),
        ("/completions", "/v1/completions"),
        ("/embeddings", "/v1/embeddings"),
        ("/chat/completions/input_tokens", "/v1/chat/completions/input_tokens"),
        # llama-server's own endpoints keep their path: the worker serves them as they are.
        ("/completion", "/completion"), ("/props", "/props"), ("/rerank", "/rerank"),
        ("/v1/rerank", "/v1/rerank"), ("/slots/0", "/slots/0"), ("/v1/chat/completions", "/v1/chat/completions"),
    ],
)
def test_worker_path(path: str, upstream: str) -> None:
    assert worker_path(path) == upstream


def test_every_alias_is_the_root_of_its_v1_path() -> None:
    assert all(v1 == "/v1" + alias for alias, v1 in V1_ALIASES.items())


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/v1/chat/completions", "/v1"), ("/chat/completions", "/v1"), ("/completions", "/v1"),
        ("/embeddings", "/v1"), ("/models", "/v1"), ("/models/m", "/v1"), ("/v1/rerank", "/v1"),
        ("/completion", "native"), ("/props", "native"), ("/rerank", "native"), ("/reranking", "native"),
        ("/infill", "native"), ("/tokenize", "native"), ("/slots/3", "native"),
        ("/health", "/health"), ("/v1/health", "/health"), ("/status", "/status"), ("/metrics", "/metrics"),
        # Anything else is one label, whatever the client sends: no label per path.
        ("/models/m/load", "other"), ("/slots", "native"), ("/slots/", "other"), ("/slots/1/2", "other"),
        ("/random-1234", "other"), ("/", "other"), ("/v1", "other"), ("/modelsx", "other"),
    ],
)
def test_path_group_is_a_fixed_set(path: str, group: str) -> None:
    assert path_group(path) == group
    assert is_api(path) == (group in ("/v1", "native"))


def test_slot_and_model_paths_are_one_segment() -> None:
    assert is_slot_action("/slots/0") and is_slot_action("/slots/x")
    assert not any(map(is_slot_action, ("/slots", "/slots/", "/slots/0/save", "/slot/0")))
    assert is_models_alias("/models") and is_models_alias("/models/a.b:c")
    assert not any(map(is_models_alias, ("/models/", "/models/a/load", "/modelsa")))
