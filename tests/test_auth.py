"""API keys (supervisor/auth.py): the key file format as tables, then the real supervisor
with the fake worker, real HTTP clients and the openai SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from supervisor.auth import (
    KeyStore,
    client_key,
    load_keys,
    parse_key_line,
    required_scope,
)
from supervisor.config import ConfigError, build_config
from tests.supervisor_harness import REPO, Supervisor, poll

INF = "inf-key-0123456789abcdef"
ADMIN = "adm-key-0123456789abcdef"
FLAG = "flag-key-0123456789abcdef"
SECRETS = (INF, ADMIN, FLAG)

FAST = {
    "worker": {"health_interval_s": 0.2, "health_timeout_s": 1.0, "stop_timeout_s": 3.0},
    "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.4},
}


# --- tables --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "name", "scope"),
    [
        ("0123456789abcdef", "line-1", "inference"),
        ("app:0123456789abcdef", "app", "inference"),
        ("ops:0123456789abcdef admin", "ops", "admin"),
        ("0123456789abcdef inference", "line-1", "inference"),
        ("a.b-c_d:0123456789:abcdef", "a.b-c_d", "inference"),  # the first ':' ends the name
    ],
)
def test_key_line_format(line: str, name: str, scope: str) -> None:
    k = parse_key_line(line, "line-1")
    assert (k.name, k.scope) == (name, scope)
    assert "0123456789" not in repr(k)


@pytest.mark.parametrize(
    "line",
    [
        "short",  # under 16 characters
        "app:0123456789abcdef root",  # unknown scope
        "bad name:0123456789abcdef",  # a space splits it into KEY SCOPE, and the scope is bad
        "b@d:0123456789abcdef",  # name characters
        "app:0123456789abcdef admin extra",
    ],
)
def test_bad_key_lines_are_refused_without_echoing_the_key(line: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_key_line(line, "line-1")
    assert "0123456789" not in str(e.value)


def test_key_file_comments_duplicates_and_flag_keys(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n\napp:{INF}\n  ops:{ADMIN} admin  \n")
    cfg = build_config({"server": {"api_keys_file": str(f), "api_keys": [FLAG]}})
    keys = {k.name: k.scope for k in load_keys(cfg)}
    assert keys == {"flag-1": "admin", "app": "inference", "ops": "admin"}
    f.write_text(f"app:{INF}\napp:{ADMIN}\n")
    with pytest.raises(ConfigError, match="repeated: app") as e:
        load_keys(cfg)
    assert INF not in str(e.value) and ADMIN not in str(e.value)
    f.write_text(f"app:{INF} root\n")
    with pytest.raises(ConfigError, match=r"keys:1: unknown scope") as e:
        load_keys(cfg)
    assert INF not in str(e.value)


@pytest.mark.parametrize(
    ("path", "scope"),
    [("/health", None), ("/v1/health", None), ("/v1/models", "inference"), ("/v1/chat/completions", "inference"),
     ("/status", "admin"), ("/metrics", "admin"), ("/anything", "admin"), ("/v1", "admin"),
     ("/tokenize", "inference"), ("/detokenize", "inference"), ("/apply-template", "inference"),
     # issue 25: llama-server's paths take the same keys as /v1; the admin routes stay admin.
     ("/chat/completions", "inference"), ("/completions", "inference"), ("/embeddings", "inference"),
     ("/models", "inference"), ("/models/m1", "inference"), ("/models/m1/load", "admin"),
     ("/models/m1/unload", "admin"), ("/completion", "inference"), ("/props", "inference"),
     ("/rerank", "inference"), ("/reranking", "inference"), ("/v1/rerank", "inference"),
     ("/slots/0", "inference"), ("/slots", "inference"), ("/slots/0/x", "admin"), ("/infill", "inference"),
     ("/chat/completions/input_tokens", "inference")],
)
def test_route_scopes(path: str, scope: str | None) -> None:
    assert required_scope(path) == scope


def test_match_finds_the_key_and_a_reload_replaces_the_set(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"app:{INF}\nops:{ADMIN} admin\n")
    cfg = build_config({"server": {"api_keys_file": str(f)}})
    store = KeyStore.from_config(cfg)
    assert store.match(INF).name == "app"  # type: ignore[union-attr]
    assert store.match(ADMIN).scope == "admin"  # type: ignore[union-attr]
    assert store.match(INF + "x") is None and store.match("") is None
    f.write_text(f"ops:{ADMIN} admin\n")
    store.reload(cfg)
    assert store.match(INF) is None
    f.write_text("broken line with too many fields\n")
    store.reload(cfg)  # a broken file keeps the previous set
    assert store.match(ADMIN) is not None


def test_status_cli_key_order(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"app:{INF}\nops:{ADMIN} admin\n")
    cfg = build_config({"server": {"api_keys_file": str(f)}})
    assert client_key(cfg, None, {}) == ADMIN  # the first admin key of the file
    assert client_key(cfg, None, {"VRAM_LLM_API_KEY": FLAG}) == FLAG
    assert client_key(cfg, ["given-on-the-command-line"], {"VRAM_LLM_API_KEY": FLAG}) == "given-on-the-command-line"
    assert client_key(build_config({"server": {"api_keys": [f"me:{FLAG}"]}}), None, {}) == FLAG
    assert client_key(build_config({}), None, {}) is None


# --- the real supervisor ---------------------------------------------------------------------


def request(s: Supervisor, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(s.base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            body = json.loads(raw) if r.headers.get_content_type() == "application/json" else raw.decode()
            return r.status, body, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[Supervisor, Path]]:
    keys = tmp_path / "keys"
    keys.write_text(f"# test keys\napp:{INF}\nops:{ADMIN} admin\n")
    sections = {**FAST, "server": {"api_keys_file": str(keys)}}
    s = Supervisor(tmp_path, sections, args=["--api-key", FLAG], fake_worker=True)
    s.api_key = ADMIN
    try:
        s.wait_ready(60)
        yield s, keys
        assert s.stop() == 0
    finally:
        s.kill_hard()
    log = s.log_path.read_text(errors="replace")
    for secret in SECRETS:
        assert secret not in log, "an API key appeared in the supervisor's log"


def test_keys_gate_every_route_but_health(keyed: tuple[Supervisor, Path]) -> None:
    s, _ = keyed
    assert request(s, "/health")[0] == 200
    refusals = [
        request(s, "/v1/models"),
        request(s, "/v1/models", {"Authorization": "Bearer wrong-key-0123456789abcdef"}),
        request(s, "/v1/models", {"Authorization": INF}),  # no Bearer scheme
        request(s, "/v1/models", {"Authorization": f"Basic {INF}"}),
        request(s, "/v1/models", {"Api-Key": INF}),  # not a header we read
        request(s, f"/v1/models?api_key={INF}"),
        request(s, "/status"),
        request(s, "/metrics"),
    ]
    bodies = set()
    for code, body, headers in refusals:
        assert code == 401
        assert body["error"]["code"] == "invalid_api_key"
        assert headers.get("X-Request-Id")
        bodies.add(json.dumps(body))
        assert not any(secret in json.dumps(body) for secret in SECRETS)
    assert len(bodies) == 1, "a refusal must not say whether the key exists"
    code, body, _ = request(s, "/status", {"Authorization": f"Bearer {INF}"})
    assert (code, body["error"]["code"]) == (403, "insufficient_scope")
    assert request(s, "/metrics", {"X-Api-Key": INF})[0] == 403
    assert request(s, "/v1/models", {"Authorization": f"Bearer {INF}"})[0] == 200
    assert request(s, "/v1/models", {"X-Api-Key": INF})[0] == 200
    assert request(s, "/status", {"X-Api-Key": ADMIN})[0] == 200
    assert request(s, "/metrics", {"Authorization": f"Bearer {FLAG}"})[0] == 200
    status_text = json.dumps(request(s, "/status", {"X-Api-Key": ADMIN})[1])
    assert not any(secret in status_text for secret in SECRETS)


def test_refusals_on_anthropic_routes_are_anthropic_shaped(keyed: tuple[Supervisor, Path]) -> None:
    # The supervisor's own refusal (here the 401) in the shape an Anthropic client reads.
    s, _ = keyed
    req = urllib.request.Request(s.base + "/v1/messages", data=b"{}", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401 and info.value.headers.get("WWW-Authenticate")
    body = json.loads(info.value.read())
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"type", "message"}
    code, body, _ = request(s, "/v1/models")  # other routes keep OpenAI's shape
    assert code == 401 and body["error"]["code"] == "invalid_api_key"


def test_openai_sdk_with_a_key_plain_and_streaming(keyed: tuple[Supervisor, Path]) -> None:
    s, _ = keyed
    # The fake worker answers 400 if a credential header reaches it: a 200 proves none did.
    client = openai.OpenAI(base_url=s.base + "/v1", api_key=INF, max_retries=0, timeout=30)
    ans = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert ans.choices[0].message.content == "tok0 tok1 tok2"
    chunks = list(client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2"
    bad = openai.OpenAI(base_url=s.base + "/v1", api_key="wrong-key-0123456789abcdef", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key"


def test_sighup_revokes_a_key_without_a_restart(keyed: tuple[Supervisor, Path]) -> None:
    s, keys = keyed
    pid = s.proc.pid
    assert request(s, "/v1/models", {"X-Api-Key": INF})[0] == 200
    keys.write_text(f"ops:{ADMIN} admin\n")
    s.proc.send_signal(signal.SIGHUP)
    poll(lambda: request(s, "/v1/models", {"X-Api-Key": INF})[0] == 401, 30, "the revoked key to be refused")
    assert s.proc.pid == pid and s.proc.poll() is None
    s.wait_ready(60)
    assert request(s, "/v1/models", {"X-Api-Key": ADMIN})[0] == 200


def test_status_command_uses_the_admin_key_of_its_config(keyed: tuple[Supervisor, Path]) -> None:
    s, _ = keyed
    cmd = [sys.executable, "-m", "supervisor", "status", "--config", str(s.config_path)]
    env = {k: v for k, v in os.environ.items() if k != "VRAM_LLM_API_KEY"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 0, r.stderr  # the flag keys of serve are not in the file: the file's admin key
    r = subprocess.run([*cmd, "--api-key", INF], cwd=REPO, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 2 and "HTTP 403" in r.stderr
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                       env={**env, "VRAM_LLM_API_KEY": FLAG})
    assert r.returncode == 0, r.stderr


def test_listening_beyond_loopback_without_keys_warns(tmp_path: Path) -> None:
    s = Supervisor(tmp_path, FAST, args=["--host", "0.0.0.0"], fake_worker=True)
    try:
        s.wait_ready(60)  # the warning comes first, at start
        assert s.log().count("with no API key") == 1
        assert s.stop() == 0
    finally:
        s.kill_hard()
