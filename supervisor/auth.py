"""API keys: who may call what, checked by one aiohttp middleware.

Rules of this module:
- Keys come from ``server.api_keys`` (the repeatable ``--api-key`` flag: admin keys) and
  from ``server.api_keys_file``. With no key configured at all, every route is open (a
  loopback-only default install); with at least one key, only ``/health`` is.
- Key file format, one key per line; blank lines and lines starting with ``#`` are skipped:

      [NAME:]KEY [SCOPE]

  NAME is ``[A-Za-z0-9._-]{1,64}`` (what logs show; default ``line-N``), KEY is at least 16
  printable characters without spaces, SCOPE is ``inference`` (``/v1/*``, its root aliases,
  llama-server's native routes and ``GET /slots``: supervisor/routes.py; the default) or
  ``admin`` (everything: ``/status``, ``/metrics`` and the admin routes as well).
  ``server.metrics_open`` opens ``/metrics`` like ``/health`` (schedulers that scrape
  without a key).
- The secret is never logged, shown in ``/status`` or echoed in an error: the rest of the
  supervisor only ever sees the key's NAME (``request[KEY_NAME]``).
- Lookup is constant-time over the whole key set: the presented key and every stored key
  are hashed to the same length and all are compared (hmac.compare_digest), with no early
  exit, so timing says neither which key matched nor how much of one.
- ``KeyStore.reload`` (SIGHUP) swaps the whole set at once; a file that fails to parse
  keeps the previous set, so a typo cannot open or lock the server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiohttp import web

from supervisor.access_log import KEY_NAME
from supervisor.config import Config, ConfigError
from supervisor.proxy import openai_error
from supervisor.routes import HEALTH_PATHS, is_api

log = logging.getLogger("vram_llm.auth")

Scope = Literal["inference", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "admin")
MIN_KEY_LEN = 16


_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces


@dataclass(frozen=True)
class ApiKey:
    name: str
    scope: Scope
    digest: bytes  # sha256 of the key; the key itself is not kept

    def __repr__(self) -> str:  # a repr in a log or traceback shows no secret material
        return f"ApiKey(name={self.name!r}, scope={self.scope!r})"


def key_digest(secret: str) -> bytes:
    """What a key is kept and compared as (supervisor/fastpath.py keeps no key either)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def parse_key_line(line: str, default_name: str, default_scope: Scope = "inference") -> ApiKey:
    """One ``[NAME:]KEY [SCOPE]`` line -> ApiKey; ValueError says what is wrong (never the key)."""
    fields = line.split()
    if not 1 <= len(fields) <= 2:
        raise ValueError("expected '[NAME:]KEY [SCOPE]'")
    scope = default_scope
    if len(fields) == 2:
        if fields[1] not in SCOPES:
            raise ValueError(f"unknown scope (the field after the key); allowed: {' | '.join(SCOPES)}")
        scope = fields[1]  # type: ignore[assignment]
    name, sep, secret = fields[0].partition(":")
    if not sep:
        name, secret = default_name, fields[0]
    elif not _NAME.fullmatch(name):
        raise ValueError("the name before ':' must be 1-64 of [A-Za-z0-9._-]")
    if len(secret) < MIN_KEY_LEN or not _KEY.fullmatch(secret):
        raise ValueError(f"the key must be at least {MIN_KEY_LEN} printable characters without spaces")
    return ApiKey(name, scope, key_digest(secret))


def load_keys(config: Config) -> tuple[ApiKey, ...]:
    """Every key the configuration names; ConfigError (naming file and line, not the key)."""
    keys: list[ApiKey] = []
    for i, raw in enumerate(config.server.api_keys, 1):
        try:
            keys.append(parse_key_line(raw, f"flag-{i}", default_scope="admin"))
        except ValueError as e:
            raise ConfigError(f"--api-key #{i}: {e}") from None
    path = config.server.api_keys_file
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
            world_readable = bool(Path(path).stat().st_mode & stat.S_IROTH)
        except OSError as e:
            raise ConfigError(f"server.api_keys_file: cannot read {path}: {e.strerror}") from None
        if world_readable:
            log.warning("%s is readable by every user of this machine: chmod o-r it", path)
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                keys.append(parse_key_line(line, f"line-{n}"))
            except ValueError as e:
                raise ConfigError(f"{path}:{n}: {e}") from None
    names = [k.name for k in keys]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"API key names must be unique; repeated: {', '.join(dup)}")
    return tuple(keys)


def _secret_of(line: str) -> str:
    name, sep, secret = line.split()[0].partition(":")
    return secret if sep else name


def client_key(config: Config, flag_keys: list[str] | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key `vram-llm status` sends: --api-key, else $VRAM_LLM_API_KEY, else the first
    admin key of the config it read (server.api_keys, then the key file if readable)."""
    env = os.environ if environ is None else environ
    for given in (flag_keys or [])[:1] + [env.get("VRAM_LLM_API_KEY", "")]:
        if given.strip():
            return given.strip()
    for line in config.server.api_keys[:1]:
        if line.strip():
            return _secret_of(line)
    path = config.server.api_keys_file
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) == 2 and fields[1] == "admin" and not fields[0].startswith("#"):
            return _secret_of(line)
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def presented_key(request: web.Request) -> str | None:
    """The key from ``Authorization: Bearer KEY`` or ``X-Api-Key: KEY``; None if neither."""
    return presented_key_of(request.headers.get("Authorization"), request.headers.get("X-Api-Key"))


def presented_key_of(authorization: str | None, x_api_key: str | None) -> str | None:
    """``presented_key`` from the two header values (None: absent); also used by
    supervisor/fastpath.py, which reads headers without an aiohttp request."""
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    header = (x_api_key or "").strip()
    return header or None


def required_scope(path: str, metrics_open: bool = False) -> Scope | None:
    """None: open; otherwise the least scope a key needs for this path. ``metrics_open``
    (server.metrics_open): /metrics is open too, for schedulers that scrape without a key."""
    if path in HEALTH_PATHS or (metrics_open and path == "/metrics"):
        return None  # load balancers probe it without credentials
    if is_api(path):  # /v1/*, its root aliases, llama-server's native endpoints and GET /slots (routes.py)
        return "inference"
    return "admin"  # /status, /metrics, admin routes, and anything unknown


def _auth_error(status: int, message: str, code: str, type_: str) -> web.Response:
    resp = openai_error(status, message, type_=type_, code=code)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="vram-llm"'
    return resp


class KeyStore:
    """The current key set; ``match`` is the only read, ``reload`` the only write."""

    def __init__(self, keys: tuple[ApiKey, ...] = (), metrics_open: bool = False) -> None:
        self._keys = keys
        self._metrics_open = metrics_open

    @classmethod
    def from_config(cls, config: Config) -> KeyStore:
        return cls(load_keys(config), config.server.metrics_open)

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def describe(self) -> str:
        return ", ".join(f"{k.name} ({k.scope})" for k in self._keys) or "none"

    def reload(self, config: Config) -> None:
        try:
            keys = load_keys(config)
        except ConfigError as e:
            log.error("API keys: keeping the previous %d key(s): %s", len(self._keys), e)
            return
        self._keys = keys
        self._metrics_open = config.server.metrics_open
        log.info("API keys reloaded: %s", self.describe())

    def match(self, secret: str) -> ApiKey | None:
        return self.match_digest(key_digest(secret))

    def match_digest(self, digest: bytes) -> ApiKey | None:
        found: ApiKey | None = None
        for k in self._keys:  # no break: every key is compared, whichever matches
            if hmac.compare_digest(digest, k.digest):
                found = k
        return found

    def warn_if_exposed(self, host: str) -> None:
        if not self.enabled and not is_loopback(host):
            log.warning(
                "listening on %s with no API key: anyone who reaches this port can use the model "
                "and read /status and /metrics; set --api-key or server.api_keys_file",
                host,
            )

    def check(self, path: str, secret: str | None) -> tuple[int, ApiKey | None]:
        """The one access rule: 200 (allowed), 401 (no valid key) or 403 (too small a scope),
        and the key that matched (None on an open route or with no keys configured)."""
        return self.check_digest(path, None if secret is None or not self._keys else key_digest(secret))

    def check_digest(self, path: str, digest: bytes | None) -> tuple[int, ApiKey | None]:
        """``check`` with the presented key's ``key_digest`` (None: no key presented)."""
        need = required_scope(path, self._metrics_open)
        if need is None or not self._keys:
            return 200, None
        key = None if digest is None else self.match_digest(digest)
        if key is None:
            return 401, None
        if need == "admin" and key.scope != "admin":
            return 403, key
        return 200, key

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self._keys:
            return await handler(request)
        verdict, key = self.check(request.path, presented_key(request))
        if key is not None:
            request[KEY_NAME] = key.name
        if verdict == 401:
            # The same answer for a missing, malformed, unknown or revoked key.
            return _auth_error(
                401,
                "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'.",
                "invalid_api_key",
                "invalid_request_error",
            )
        if verdict == 403:
            return _auth_error(
                403, f"this key may not use {request.path}; it needs an admin key", "insufficient_scope",
                "permission_error",
            )
        return await handler(request)
