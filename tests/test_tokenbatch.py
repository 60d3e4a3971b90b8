"""The batch loop's load-time measures (tokenbatch.calibrate) on the real SmolLM2 model:
they never raise (a failure would end the loop's thread and every request would wait
forever), and they always say when they are over."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import Any

import llama_cpp.llama_cpp as llama_lib
import pytest

from tests.conftest import default_model
from worker.engine import LlamaLog
from worker.engine.scheduler import StepCost
from worker.engine.tokenbatch import TokenBatch, calibrate

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def ctx() -> Iterator[Any]:
    LlamaLog(io.StringIO()).install()
    model = llama_lib.llama_model_load_from_file(str(default_model()).encode(), llama_lib.llama_model_default_params())
    assert model
    params = llama_lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 512, 512, 2, 2
    params.flash_attn_type = 1
    c = llama_lib.llama_init_from_model(model, params)
    yield c
    llama_lib.llama_free(c)
    llama_lib.llama_model_free(model)


class FailingBatch(TokenBatch):
    """A real batch whose decode fails, as llama_decode does on a broken model or device."""

    def decode(self, ctx: Any) -> int:
        raise RuntimeError("the device went away")


def test_measures_time_the_rows_and_say_when_they_are_over(ctx: Any) -> None:
    batch, cost, done = TokenBatch(512), StepCost(), threading.Event()
    try:
        assert calibrate(ctx, batch, cost, True, done) is True  # the CPU with flash attention: merge
    finally:
        batch.free()
    assert done.is_set() and cost.row_ratio is not None


def test_a_failing_measure_is_logged_not_raised(ctx: Any, caplog: pytest.LogCaptureFixture) -> None:
    batch, cost, done = FailingBatch(512), StepCost(), threading.Event()
    try:
        assert calibrate(ctx, batch, cost, True, done) is False  # no merge, defaults for drafts
    finally:
        batch.free()
    assert done.is_set() and cost.row_ratio is None
    assert "load-time measures failed" in caplog.text
