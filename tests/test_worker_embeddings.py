"""POST /v1/embeddings with the openai SDK and raw bodies: a worker with embeddings on
(SmolLM2, mean pooling) and the shared chat-only worker, which answers 400."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import WorkerProcess, own_worker

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def embed_worker() -> Iterator[WorkerProcess]:
    yield from own_worker(model_alias="embedder", embeddings=True, parallel=1)


@pytest.fixture
def sdk(embed_worker: WorkerProcess) -> Iterator[openai.OpenAI]:
    assert embed_worker.socket_path is not None
    http = httpx.Client(transport=httpx.HTTPTransport(uds=embed_worker.socket_path), timeout=120)
    with http, openai.OpenAI(base_url="http://worker/v1", api_key="x", http_client=http, max_retries=0) as c:
        yield c


def test_same_input_same_vector_different_inputs_differ(sdk: openai.OpenAI) -> None:
    r = sdk.embeddings.create(model="embedder", input=["The cat sat.", "Quantum field theory", "The cat sat."])
    vs = [np.asarray(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert len(vs[0]) == 576 and np.linalg.norm(vs[0]) == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(vs[0], vs[2], atol=1e-4)
    assert not np.allclose(vs[0], vs[1], atol=1e-2)
    # Batched with others or alone, an input gets the same vector.
    alone = sdk.embeddings.create(model="embedder", input="The cat sat.", encoding_format="float")
    assert np.allclose(alone.data[0].embedding, vs[0], atol=1e-3)
    assert r.usage.prompt_tokens == r.usage.total_tokens > alone.usage.prompt_tokens > 0


def test_base64_decodes_to_the_same_floats(embed_worker: WorkerProcess) -> None:
    with embed_worker.client() as c:
        f = c.post("/v1/embeddings", json={"input": "hello there", "encoding_format": "float"}).json()
        b = c.post("/v1/embeddings", json={"input": "hello there", "encoding_format": "base64"}).json()
        tokens = c.post("/tokenize", json={"content": "hello there", "add_special": True}).json()["tokens"]
        t = c.post("/v1/embeddings", json={"input": tokens}).json()
    decoded = np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, f["data"][0]["embedding"], atol=1e-6)
    assert np.allclose(t["data"][0]["embedding"], f["data"][0]["embedding"], atol=1e-4)
    assert f["usage"]["prompt_tokens"] == len(tokens)


def test_bad_embedding_requests_are_400s(embed_worker: WorkerProcess) -> None:
    with embed_worker.client() as c:
        for body, param in [
            ({"input": "x", "dimensions": 64}, "dimensions"),
            ({"input": []}, "input"),
            ({"input": [1, "a"]}, "input"),
            ({"input": [[1, 2], []]}, "input"),
            ({"input": [[10**8]]}, "input[0][0]"),
            ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ]:
            r = c.post("/v1/embeddings", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_chat_only_model_names_the_setting(client: httpx.Client) -> None:
    r = client.post("/v1/embeddings", json={"input": "hello"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "embeddings_disabled" and "embeddings = true" in err["message"]


def test_generation_still_served_beside_embeddings(sdk: openai.OpenAI) -> None:
    # The embeddings context is a second one: the generation context is unchanged.
    r = sdk.completions.create(model="embedder", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 4
    assert len(sdk.embeddings.create(model="embedder", input="x").data) == 1
