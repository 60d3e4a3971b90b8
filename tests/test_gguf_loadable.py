"""tests/gguf_factory.py ``write_loadable``: random-weight llama models with SmolLM2's tokenizer
that the real worker loads and runs, in two sizes."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from supervisor.default_model import default_model_path
from tests.conftest import LoadableModel, WorkerProcess, short_tmpdir, worker_spec

pytestmark = pytest.mark.model

TEXT = "Hello world, ünïcödé and <|im_end|> too."
SHAPES = [{"n_layers": 2, "n_embd": 64}, {"n_layers": 4, "n_embd": 128}]


def post(proc: WorkerProcess, path: str, body: dict[str, Any]) -> Any:
    with proc.client() as c:
        r = c.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def smollm2_tokens(text: str) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(str(default_model_path()), vocab_only=True, verbose=False)
    try:
        return list(vocab.tokenize(text.encode(), add_bos=False, special=True))
    finally:
        vocab.close()


def test_sizes_differ_and_stay_small(loadable_model: LoadableModel) -> None:
    # (tests/test_fleet_real.py checks that the planner's footprints differ as well)
    small, big = (loadable_model(**s) for s in SHAPES)
    assert small.stat().st_size < big.stat().st_size < 20 * 2**20


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['n_layers']}x{s['n_embd']}")
def test_the_real_worker_loads_it_and_generates(loadable_model: LoadableModel, shape: dict[str, int]) -> None:
    workdir = short_tmpdir()
    proc = WorkerProcess(workdir, worker_spec(workdir, model_path=str(loadable_model(**shape)), n_ctx=512))
    try:
        proc.wait_ready(timeout=60)
        # Random weights may pick the end-of-generation token at any step: ignore_eos makes
        # the count exact.
        done = post(proc, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True})
        assert done["usage"]["completion_tokens"] == 12 and done["choices"][0]["finish_reason"] == "length"
        # SmolLM2's tokenizer and chat template came with the metadata.
        tokens = post(proc, "/tokenize", {"content": TEXT})["tokens"]
        assert tokens == smollm2_tokens(TEXT)
        prompt = post(proc, "/apply-template", {"messages": [{"role": "user", "content": "hi"}]})["prompt"]
        assert prompt.endswith("<|im_start|>assistant\n")
        chat = post(proc, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True})
        assert chat["usage"]["completion_tokens"] == 5
    finally:
        code = proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert code == 0
