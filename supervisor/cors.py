"""CORS: which browser pages may call the API (``server.cors_origins``).

Rules of this module:
- The decision is pure (``CorsPolicy``, ``preflight``, ``response_headers``): the policy and
  the request's ``Origin`` and ``Access-Control-Request-*`` headers in, a status and headers
  out; tested as tables. ``Cors`` applies it to aiohttp and holds the policy in force.
- A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered
  by ``Cors.middleware``, which sits inside the request log (the preflight gets an id, a log
  line, a count) and the connection guard, and outside the API keys: a browser sends no credentials on a preflight, so
  it never needs a key. An allowed origin gets 204 with the ``Allow-*`` headers; any other
  origin a 403 without ``Access-Control-Allow-Origin``: an origin that is not allowed is never
  echoed.
- Every other response, errors, 401s and streams included, gets its headers when it is
  prepared (``on_response_prepare``, as ``X-Request-Id``): no handler can skip them.
- Explicit origins: the request's own origin is echoed, with credentials allowed, and every
  response says ``Vary: Origin`` (it depends on the Origin: a cache must not serve one
  origin's answer to another). ``["*"]``: ``Access-Control-Allow-Origin: *`` on every
  response, never credentials (browsers refuse ``*`` with credentials anyway).
- No origins configured: no CORS header at all (as before issue 25); a preflight is still
  answered here (403), without a key.
- SIGHUP replaces the policy (``reload``), as it does the key set. supervisor/fastpath.py
  answers ``GET /v1/models`` without aiohttp: it passes every request that carries an
  ``Origin`` through, and writes ``plain_headers`` (the headers of an answer to a request
  without one) in its own answers.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from supervisor.config import Config
from supervisor.proxy import openai_error

ALLOW_ORIGIN = "Access-Control-Allow-Origin"
ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
# Asked for nothing: what our clients send (the SDKs add their own, which a browser asks for).
DEFAULT_ALLOW_HEADERS = "Authorization, Content-Type, X-Api-Key, X-Request-Id"
# Response headers a page may read beyond the safelisted ones.
EXPOSE_HEADERS = "X-Request-Id, X-Ignored-Params, Retry-After, WWW-Authenticate"
MAX_AGE_S = 600  # browsers cache a preflight this long (Chrome caps it at 7200)
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 token)


@dataclass(frozen=True)
class CorsPolicy:
    origins: frozenset[str] = frozenset()  # exact origins, as browsers send them
    any_origin: bool = False  # ["*"]

    @classmethod
    def from_config(cls, config: Config) -> CorsPolicy:
        given = config.server.cors_origins  # checked by config.py (exact origins, or "*" alone)
        return cls(frozenset(o for o in given if o != "*"), "*" in given)

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any_origin or origin in self.origins)


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


def allow_headers(requested: str | None) -> str:
    """The request headers a preflight allows: those the browser asks for (the SDKs send
    their own, X-Stainless-* and anthropic-version among them), each a valid field name;
    a list, not ``*``, which browsers take literally with credentials."""
    if requested is None or not requested.strip():
        return DEFAULT_ALLOW_HEADERS
    names = [n.strip() for n in requested.split(",")]
    return ", ".join(n for n in names if _TOKEN.fullmatch(n)) or DEFAULT_ALLOW_HEADERS


def preflight(
    policy: CorsPolicy, origin: str | None, requested_headers: str | None, private_network: bool = False
) -> tuple[int, dict[str, str]]:
    """A preflight's status and headers: 204 and the ``Allow-*`` headers for an allowed
    origin, else 403 with no ``Access-Control-Allow-Origin``. ``private_network``: the
    browser asked ``Access-Control-Request-Private-Network: true`` (Chrome, for a public page
    calling a server on a private or loopback address); an allowed origin is let through."""
    headers = {"Vary": PREFLIGHT_VARY}
    if not policy.allows(origin):
        return 403, headers
    assert origin is not None
    headers[ALLOW_ORIGIN] = "*" if policy.any_origin else origin
    if not policy.any_origin:
        headers["Access-Control-Allow-Credentials"] = "true"
    headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
    headers["Access-Control-Allow-Headers"] = allow_headers(requested_headers)
    headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
    if private_network:
        headers["Access-Control-Allow-Private-Network"] = "true"
    return 204, headers


def response_headers(policy: CorsPolicy, origin: str | None) -> dict[str, str]:
    """The CORS headers of any other response to a request with this ``Origin`` (None: none)."""
    if not policy.enabled:
        return {}
    if policy.any_origin:
        return {ALLOW_ORIGIN: "*", "Access-Control-Expose-Headers": EXPOSE_HEADERS}
    out = {"Vary": "Origin"}
    if policy.allows(origin):
        assert origin is not None
        out[ALLOW_ORIGIN] = origin
        out["Access-Control-Allow-Credentials"] = "true"
        out["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    return out


class Cors:
    """The policy in force, its middleware (preflights) and its response hook."""

    def __init__(self, policy: CorsPolicy) -> None:
        self.policy = policy
        self._plain = b""
        self._plain_of: CorsPolicy | None = None

    def install(self, app: web.Application) -> None:
        """After the request log and the connection guard (a preflight counts as a request of
        its connection), before the keys (installed after this)."""
        app.middlewares.append(self.middleware)
        app.on_response_prepare.append(self._set_headers)

    def reload(self, config: Config) -> None:
        self.policy = CorsPolicy.from_config(config)  # a bad config never gets here (validated)

    def plain_headers(self) -> bytes:
        """Header lines (CRLF-terminated) of an answer to a request without ``Origin``."""
        if self._plain_of is not self.policy:
            self._plain = b"".join(f"{k}: {v}\r\n".encode("ascii") for k, v in response_headers(self.policy, None).items())
            self._plain_of = self.policy
        return self._plain

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not is_preflight(request.method, request.headers):
            return await handler(request)
        status, headers = preflight(
            self.policy,
            request.headers.get("Origin"),
            request.headers.get("Access-Control-Request-Headers"),
            request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true",
        )
        if status == 204:
            return web.Response(status=204, headers=headers)
        why = "this origin is not in server.cors_origins" if self.policy.enabled else (
            "CORS is off: server.cors_origins (--cors-origins) lists no origin")
        resp = openai_error(403, f"CORS preflight refused: {why}", type_="permission_error", code="cors_origin_not_allowed")
        resp.headers.update(headers)
        return resp

    async def _set_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if is_preflight(request.method, request.headers):
            return  # answered by the middleware, headers and all
        for name, value in response_headers(self.policy, request.headers.get("Origin")).items():
            if name == "Vary" and "Vary" in response.headers:
                value = f"{response.headers['Vary']}, {value}"
            response.headers[name] = value
