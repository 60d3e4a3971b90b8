"""`vram-llm status` rendering, as a pure function of a /status document; the address it asks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from supervisor.cli import build_parser, load_config
from supervisor.config import ConfigError
from supervisor.status import decode_status
from supervisor.status_cli import collapse_history, exit_code, render, status_url


def failure(at: float, pid: int, kind: str = "crash", what: str = "exit code 1 (FAILURE)") -> dict[str, Any]:
    return {"at": at, "kind": kind, "reason": f"worker pid {pid} {what}"}


def test_a_crash_loop_collapses_into_one_line_with_a_count() -> None:
    hist = [
        failure(0.0, 10, "hang", "hung"),
        *(failure(10.0 + 60 * i, 100 + i) for i in range(40)),
        failure(3000.0, 7, what="exit code -9 (SIGKILL)"),
    ]
    runs = collapse_history(hist)
    assert [(first["at"], last["at"], n) for first, last, n in runs] == [(0.0, 0.0, 1), (10.0, 2350.0, 40), (3000.0, 3000.0, 1)]
    # Runs end where the failure changes, and the pid alone does not change it.
    assert collapse_history([failure(0, 1), failure(1, 2, what="exit code -9 (SIGKILL)"), failure(2, 3)]) == [
        (failure(0, 1), failure(0, 1), 1),
        (failure(1, 2, what="exit code -9 (SIGKILL)"), failure(1, 2, what="exit code -9 (SIGKILL)"), 1),
        (failure(2, 3), failure(2, 3), 1),
    ]


def test_render_shows_the_crash_loop() -> None:
    st = {
        "state": "backoff",
        "reason": "crash loop: 41 failures in the last 10 minutes (...); next attempt in 12s",
        "restarts": 41,
        "failure_streak": 41,
        "crash_loop": True,
        "restart_history": [failure(10.0 + 60 * i, 100 + i) for i in range(41)],
    }
    lines = render(st, "http://127.0.0.1:8080/status").splitlines()
    assert "state:   BACKOFF  - crash loop: 41 failures in the last 10 minutes (...); next attempt in 12s" in lines
    assert "restarts: 41, 41 in the current streak (crash loop: retrying at the capped interval)" in lines
    history = [line for line in lines if "worker pid" in line and "last exit" not in line]
    assert len(history) == 1 and "41 times until" in history[0] and history[0].endswith("worker pid 140 exit code 1 (FAILURE)")


def test_render_shows_the_prompt_caches() -> None:
    st = {
        "state": "ready",
        "reason": "",
        "worker": {
            "pid": 5, "generation": 1, "started_at": 1.0, "uptime_s": 10.0, "active": 2, "queued": 0, "requests_served": 9,
            "cache_hits": 3, "cache_tokens_reused": 1200,
            "ram_cache": {"entries": 2, "bytes": 50 * 2**20, "hits": 1, "tokens_saved": 600},
        },
    }
    lines = render(st, "http://127.0.0.1:8080/status").splitlines()
    assert ("         prompt cache: 3 hits, 1200 tokens reused; RAM: 2 snapshots, 50 MiB, 1 hits, "
            "600 tokens saved") in lines


def test_render_shows_the_steps_and_what_the_drafts_learned() -> None:
    st = {
        "state": "ready",
        "reason": "",
        "worker": {
            "pid": 5, "generation": 1, "started_at": 1.0, "uptime_s": 10.0, "steps": 100, "step_seconds": 0.6,
            "decode_seconds": 0.5, "draft_tokens": 40, "draft_tokens_accepted": 30,
            "draft_acceptance": {"2": 0.5, "4": 0.5, "8": 0.86, "16": 0.98, "32": 0.994},
        },
    }
    lines = render(st, "http://127.0.0.1:8080/status").splitlines()
    assert ("         batch steps: 100, 6.0 ms each (5.0 in llama_decode); drafts: 30 of 40 tokens accepted "
            "(learned by match length: 2+ 50%, 4+ 50%, 8+ 86%, 16+ 98%, 32+ 99%)") in lines
    # No draft yet (or drafts off): the priors are not news.
    st["worker"].update(draft_tokens=0, draft_tokens_accepted=0)
    lines = render(st, "http://127.0.0.1:8080/status").splitlines()
    assert "         batch steps: 100, 6.0 ms each (5.0 in llama_decode); drafts: 0 of 0 tokens accepted" in lines


def test_exit_code_follows_the_health_verdict() -> None:
    def code(doc: dict[str, Any]) -> int:
        return exit_code(decode_status(json.dumps(doc).encode()))

    # Several models: the first is ready, a preloaded one is not: /health is 503, so is the exit.
    assert code({"state": "ready", "health": {"ok": False, "status": "loading", "reason": "model b: backoff"}}) == 1
    assert code({"state": "ready", "health": {"ok": True, "status": "ok"}}) == 0
    # One model: the verdict is its state.
    assert code({"state": "starting", "health": {"ok": False, "status": "starting", "reason": "loading"}}) == 1
    # A supervisor without the field: the first model's state decides, as before.
    assert code({"state": "ready"}) == 0 and code({"state": "backoff"}) == 1


def test_the_status_plan_has_every_field_of_the_planners_plan() -> None:
    # /status shows the plan typed (status.PlanView, decoded by this command); a field the
    # planner adds must not silently drop out of the document.
    import dataclasses

    from supervisor.planner import Estimate, GpuPlan, ModelSummary, Plan
    from supervisor.status import PlanEstimate, PlanGpu, PlanModel, PlanView

    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    assert names(Plan) == set(PlanView.__struct_fields__)
    assert names(GpuPlan) == set(PlanGpu.__struct_fields__)
    assert names(ModelSummary) == set(PlanModel.__struct_fields__)
    assert names(Estimate) | {"total_mib"} == set(PlanEstimate.__struct_fields__)


# --- issue 25: several listen addresses -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "host", "url"),
    [
        ([], "127.0.0.1", "http://127.0.0.1:8080/status"),
        (["--host", "127.0.0.1,::1"], ["127.0.0.1", "::1"], "http://127.0.0.1:8080/status"),
        (["--host", "::1", "--host", "127.0.0.1"], ["::1", "127.0.0.1"], "http://[::1]:8080/status"),
        (["--host", "::1,127.0.0.1", "--host", "10.0.0.5"], ["::1", "127.0.0.1", "10.0.0.5"], "http://[::1]:8080/status"),
        (["--host", "0.0.0.0"], "0.0.0.0", "http://127.0.0.1:8080/status"),  # asked on its loopback
        (["--host", "::,0.0.0.0"], ["::", "0.0.0.0"], "http://[::1]:8080/status"),  # "::" is IPv6 only
        (["--host", "gpu-box.lan", "--port", "9000"], "gpu-box.lan", "http://gpu-box.lan:9000/status"),
    ],
)
def test_host_flags_and_the_address_status_asks(argv: list[str], host: str | list[str], url: str) -> None:
    cfg = load_config(build_parser().parse_args(["status", *argv]))
    assert cfg.server.host == host
    assert status_url(cfg) == url


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--host", "127.0.0.1,"], "--host: server.host[1] must not be empty"),
        (["--host", "127.0.0.1:8080"], "--host: '127.0.0.1:8080' is not an IP address or host name"),
        (["--host", "::1", "--host", "::1"], "--host: server.host lists an address twice"),
        (["--cors-origins", "*,https://a.example"], '--cors-origins: "*" (any origin) stands alone'),
        (["--cors-origins", "https://a.example/"], "--cors-origins: server.cors_origins[0]"),
        (["--rpc", "gpu-box"], "--rpc: rpc[0].endpoint: 'gpu-box' is not host:port"),
        (["--rpc", "10.0.0.2:50052", "--rpc", "10.0.0.2:50052"], "--rpc: an endpoint is listed twice"),
    ],
)
def test_bad_host_and_cors_flags_name_the_flag(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(build_parser().parse_args(["serve", *argv]))
    assert needle in str(e.value)


def test_cors_flag_is_a_comma_list() -> None:
    cfg = load_config(build_parser().parse_args(["serve", "--cors-origins", "https://a.example, http://localhost:3000"]))
    assert cfg.server.cors_origins == ["https://a.example", "http://localhost:3000"]
    assert load_config(build_parser().parse_args(["serve", "--cors-origins", "*"])).server.cors_origins == ["*"]
