"""Pure tests of the request schema's tolerance for other servers' fields, and of the
rate limit on the warning that names them (no model, no process)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker import openai_schema as oai
from worker.log_limit import LogLimiter

USER = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"messages": USER, **fields}).encode()


def test_known_extensions_are_not_unknown_fields() -> None:
    req, ignored = oai.decode_chat(body(
        ignore_eos=True, min_tokens=1, repetition_penalty=1.1, typical_p=0.9, n_predict=5,
        stop_token_ids=[2], cache_prompt=False, return_token_ids=True,
        include_stop_str_in_output=True, skip_special_tokens=False, id_slot=0, n_keep=-1,
        samplers="kfypmt",
    ), strict=True)
    assert ignored == ()
    assert (req.ignore_eos, req.min_tokens, req.stop_token_ids, req.cache_prompt) == (True, 1, [2], False)


def test_unknown_top_level_fields_are_listed_in_body_order() -> None:
    req, ignored = oai.decode_chat(body(zeta=1, max_tokens=3, alpha={"x": [1]}), strict=False)
    assert ignored == ("zeta", "alpha")
    assert req.max_tokens == 3
    req2, ignored2 = oai.decode_completion(b'{"prompt": "hi", "dry_multiplier": 0.8}', strict=False)
    assert (req2.prompt, ignored2) == ("hi", ("dry_multiplier",))


@pytest.mark.parametrize("strict", [True, False])
def test_errors_after_an_unknown_field_still_name_their_field(strict: bool) -> None:
    with pytest.raises(oai.RequestError) as e:
        oai.decode_chat(body(zeta=1, max_tokens=0), strict=strict)
    assert e.value.param == ("zeta" if strict else "max_tokens")
    with pytest.raises(oai.RequestError) as e:
        oai.decode_chat(b'{"zeta": 1, "messages": [', strict=strict)
    # msgspec stops at the first problem: strict, that is the unknown field.
    assert (e.value.param if strict else e.value.code) == ("zeta" if strict else "invalid_json")


def test_strict_rejects_and_nested_unknown_fields_always_do() -> None:
    with pytest.raises(oai.RequestError) as e:
        oai.decode_chat(body(zeta=1), strict=True)
    assert e.value.param == "zeta"
    with pytest.raises(oai.RequestError) as e:
        oai.decode_chat(body(stream=True, stream_options={"include_usage": True, "zeta": 1}), strict=False)
    assert e.value.param == "stream_options.zeta"


@pytest.mark.parametrize(
    "fields, default, expected",
    [
        ({}, None, None),
        ({}, 16, 16),
        ({"min_tokens": 40}, 16, 40),  # the default grows to min_tokens
        ({"max_tokens": 5}, 16, 5),
        ({"n_predict": 7}, 16, 7),
        ({"n_predict": -1}, 16, None),  # llama-server: no limit
        ({"n_predict": -2}, None, None),
        ({"max_tokens": 7, "n_predict": 7}, None, 7),  # both, agreeing
        ({"max_completion_tokens": 4, "max_tokens": 9}, None, 4),
    ],
)
def test_max_tokens_of(fields: dict[str, Any], default: int | None, expected: int | None) -> None:
    req, _ = oai.decode_chat(body(**fields))
    assert oai.max_tokens_of(req, default) == expected


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": 7, "n_predict": 8}, "n_predict"),
        ({"max_tokens": 7, "n_predict": -1}, "n_predict"),
        ({"max_tokens": 3, "min_tokens": 4}, "min_tokens"),
        ({"n_predict": 3, "min_tokens": 4}, "min_tokens"),
    ],
)
def test_max_tokens_of_rejects_contradictions(fields: dict[str, Any], param: str) -> None:
    req, _ = oai.decode_chat(body(**fields))
    with pytest.raises(oai.RequestError) as e:
        oai.max_tokens_of(req, None)
    assert e.value.param == param


def test_log_limiter_one_line_per_key_per_window() -> None:
    lim = LogLimiter(window_s=60.0, per_window=10)
    # (key, now, allowed)
    steps = [
        (("a",), 0.0, True),
        (("a",), 1.0, False),
        (("a",), 59.9, False),
        (("b",), 59.9, True),  # another key is its own line
        (("a",), 60.0, True),  # a window later, once more
    ]
    for key, now, allowed in steps:
        assert lim.allow(key, now) is allowed, (key, now)
    assert lim.suppressed == 2


def test_log_limiter_caps_lines_of_all_keys_per_window() -> None:
    lim = LogLimiter(window_s=60.0, per_window=3)
    assert [lim.allow((f"k{i}",), float(i)) for i in range(5)] == [True, True, True, False, False]
    assert lim.suppressed == 2
    assert lim.allow(("k9",), 60.5)  # the first line left the window
    assert not lim.allow(("k10",), 60.6)


def test_log_limiter_keeps_a_bounded_memory() -> None:
    lim = LogLimiter(window_s=1.0, per_window=1000, max_keys=8)
    for i in range(100):
        lim.allow((f"k{i}",), float(i))
    assert len(lim._last) <= 8


def test_openai_sdk_fields_accepted_in_strict_mode() -> None:
    # The SDK's newer and bookkeeping fields (issue 15): known, never "unknown" even when strict.
    req, ignored = oai.decode_chat(body(
        max_completion_tokens=7, user="u-1", metadata={"k": "v"}, service_tier="auto", store=False,
        stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=20,
        parallel_tool_calls=True,
    ), strict=True)
    assert ignored == ()
    assert oai.max_tokens_of(req, None) == 7
    assert req.stream_options is not None and req.stream_options.include_usage
    assert (req.logprobs, req.top_logprobs) == (True, 20)
    comp, ignored = oai.decode_completion(
        json.dumps({"prompt": "x", "logprobs": 5, "user": "u"}).encode(), strict=True
    )
    assert (ignored, comp.logprobs) == ((), 5)
