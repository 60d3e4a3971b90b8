"""supervisor/cors.py's decisions as tables (issue 25); the running supervisor's answers are
in tests/test_llama_server_clients.py."""

from __future__ import annotations

import pytest

from supervisor.config import build_config
from supervisor.cors import (
    DEFAULT_ALLOW_HEADERS,
    EXPOSE_HEADERS,
    MAX_AGE_S,
    PREFLIGHT_VARY,
    CorsPolicy,
    allow_headers,
    is_preflight,
    preflight,
    response_headers,
)

A = "https://app.example"
OFF = CorsPolicy()
LISTED = CorsPolicy(frozenset({A, "http://localhost:3000"}))
ANY = CorsPolicy(any_origin=True)


def test_policy_from_config() -> None:
    assert CorsPolicy.from_config(build_config({})) == OFF and not OFF.enabled
    assert CorsPolicy.from_config(build_config({"server": {"cors_origins": ["*"]}})) == ANY
    assert CorsPolicy.from_config(build_config({"server": {"cors_origins": [A, "http://localhost:3000"]}})) == LISTED


ALLOWED_LISTED = {
    "Vary": PREFLIGHT_VARY, "Access-Control-Allow-Origin": A, "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "authorization, content-type", "Access-Control-Max-Age": str(MAX_AGE_S),
}
ALLOWED_ANY = {k: v for k, v in ALLOWED_LISTED.items() if k != "Access-Control-Allow-Credentials"}
ALLOWED_ANY["Access-Control-Allow-Origin"] = "*"
REFUSED = (403, {"Vary": PREFLIGHT_VARY})


@pytest.mark.parametrize(
    ("policy", "origin", "want"),
    [
        (LISTED, A, (204, ALLOWED_LISTED)),
        (ANY, A, (204, ALLOWED_ANY)),  # "*": never credentials
        (ANY, "null", (204, ALLOWED_ANY)),
        # Never echoed when not allowed: no Access-Control-Allow-Origin at all.
        (LISTED, "https://evil.example", REFUSED),
        (LISTED, "https://app.example.evil.example", REFUSED),
        (LISTED, "http://app.example", REFUSED),  # another scheme is another origin
        (LISTED, "https://APP.example", REFUSED),
        (LISTED, "null", REFUSED),
        (LISTED, None, REFUSED),
        (OFF, A, REFUSED),  # no CORS configured
    ],
)
def test_preflight(policy: CorsPolicy, origin: str | None, want: tuple[int, dict[str, str]]) -> None:
    assert preflight(policy, origin, "authorization, content-type") == want


@pytest.mark.parametrize(
    ("policy", "origin", "want"),
    [
        (OFF, A, {}),  # as before issue 25: no CORS header at all
        (OFF, None, {}),
        (LISTED, A, {"Vary": "Origin", "Access-Control-Allow-Origin": A, "Access-Control-Allow-Credentials": "true",
                     "Access-Control-Expose-Headers": EXPOSE_HEADERS}),
        (LISTED, "https://evil.example", {"Vary": "Origin"}),
        (LISTED, None, {"Vary": "Origin"}),  # a cache must not give this answer to a browser
        (ANY, A, {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSE_HEADERS}),
        (ANY, None, {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSE_HEADERS}),
    ],
)
def test_response_headers(policy: CorsPolicy, origin: str | None, want: dict[str, str]) -> None:
    assert response_headers(policy, origin) == want


def test_private_network_access_only_when_asked_and_allowed() -> None:
    # Chrome asks before a public page may call a server on a private or loopback address.
    assert preflight(LISTED, A, None, private_network=True)[1]["Access-Control-Allow-Private-Network"] == "true"
    assert "Access-Control-Allow-Private-Network" not in preflight(LISTED, A, None)[1]
    assert preflight(LISTED, "https://evil.example", None, private_network=True) == REFUSED


def test_credentials_only_with_explicit_origins() -> None:
    for origin in (A, "null", "https://x.example", None):
        assert "Access-Control-Allow-Credentials" not in response_headers(ANY, origin)
        assert "Access-Control-Allow-Credentials" not in preflight(ANY, origin, None)[1]


@pytest.mark.parametrize(
    ("requested", "allowed"),
    [
        (None, DEFAULT_ALLOW_HEADERS),
        ("", DEFAULT_ALLOW_HEADERS),
        # What the openai SDK sends from a browser: its own headers are asked for, and allowed.
        ("authorization,content-type,x-stainless-arch,x-stainless-lang",
         "authorization, content-type, x-stainless-arch, x-stainless-lang"),
        ("x-api-key, anthropic-version", "x-api-key, anthropic-version"),
        ("bad header, x-ok", "x-ok"),  # not a field name: left out
        ("a\r\nInjected: x", DEFAULT_ALLOW_HEADERS),
    ],
)
def test_allow_headers(requested: str | None, allowed: str) -> None:
    assert allow_headers(requested) == allowed


@pytest.mark.parametrize(
    ("method", "headers", "want"),
    [
        ("OPTIONS", {"Origin": A, "Access-Control-Request-Method": "POST"}, True),
        ("OPTIONS", {"Origin": A}, False),  # a plain OPTIONS: routed as any request
        ("OPTIONS", {"Access-Control-Request-Method": "POST"}, False),
        ("POST", {"Origin": A, "Access-Control-Request-Method": "POST"}, False),
    ],
)
def test_is_preflight(method: str, headers: dict[str, str], want: bool) -> None:
    assert is_preflight(method, headers) is want
