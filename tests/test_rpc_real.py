"""A model split across this host's CPU and two llama.cpp rpc-servers on loopback (issue 29).

Real processes: two ``python -m worker.engine.rpc_server`` (CPU backend), `vram-llm serve` with
both as [[rpc]] endpoints, the real SmolLM2 model. Each server may hold at most 430 MiB, so
the plan keeps the first layers on the CPU and splits the rest between the two servers.
Skipped, saying why, when llama-cpp-python was built without the RPC backend (an old wheel);
scripts/bootstrap.sh builds it with -DGGML_RPC=ON, so there they run.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.rpc import probe_endpoint
from tests.rpc_servers import RpcServer, rpc_unsupported
from tests.supervisor_harness import Supervisor, poll

_WHY = rpc_unsupported()
pytestmark = [pytest.mark.model, pytest.mark.skipif(_WHY is not None, reason=f"no RPC backend: {_WHY}")]

CAP_MIB = 430
PROMPT = "The capital of France is"
SETTINGS: dict[str, dict[str, Any]] = {
    "model": {"ctx_size": 2048, "parallel": 1},
    "worker": {"health_interval_s": 1.0},
    "restart": {"backoff_initial_s": 0.1},
    "shutdown": {"grace_s": 5.0},
}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RpcServer, RpcServer]]:
    a, b = RpcServer(tmp_path), RpcServer(tmp_path)
    try:
        a.wait_serving()
        b.wait_serving()
        yield a, b
    finally:
        a.kill()
        b.kill()


def rpc_toml(*servers: RpcServer) -> str:
    return "".join(f'[[rpc]]\nendpoint = "{s.endpoint}"\nmax_mib = {CAP_MIB}\n' for s in servers)


def greedy(s: Supervisor) -> str:
    code, body = s.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}, timeout=120)
    assert code == 200, body
    return str(body["choices"][0]["text"])


def remote_rows(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["uuid"]: g for g in st["plan"]["gpus"] if g["uuid"].startswith("rpc:")}


def buffers(log: str, endpoint: str) -> dict[str, float]:
    """MiB llama.cpp allocated on the server at ``endpoint``, by kind, as the worker logged it
    (the client asks the server for each buffer: these are the server's allocations)."""
    out: dict[str, float] = {}
    for kind, pat in (("weights", "model buffer size"), ("kv", "KV buffer size"), ("compute", "compute buffer size")):
        m = re.findall(rf"RPC\d+\[{re.escape(endpoint)}\] {pat} =\s+([0-9.]+) MiB", log)
        out[kind] = float(m[-1]) if m else 0.0
    return out


def test_probe_answers_and_is_bounded_when_busy_or_gone(servers: tuple[RpcServer, RpcServer]) -> None:
    a, _ = servers
    found, why = probe_endpoint(a.endpoint, 2.0)
    assert why is None and len(found) == 1 and 0 < found[0][0] <= found[0][1]
    # An rpc-server serves one client at a time: while one holds it, the next one is not
    # answered. The probe gives up at its deadline instead of hanging.
    host, port = a.endpoint.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as held:
        held.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
        assert len(held.recv(64)) > 0  # our HELLO is answered: we hold the server now
        t0 = time.monotonic()
        found, why = probe_endpoint(a.endpoint, 0.5)
        assert found == [] and why is not None and why.startswith("no answer within 0.5s")
        assert time.monotonic() - t0 < 3.0
    # The server is free again once the holder leaves.
    poll(lambda: probe_endpoint(a.endpoint, 1.0)[1] is None, 10.0, "the server to answer again")


def test_split_across_cpu_and_two_servers_matches_a_local_run(tmp_path: Path, servers: tuple[RpcServer, RpcServer]) -> None:
    a, b = servers
    (tmp_path / "split").mkdir()
    split = Supervisor(tmp_path / "split", SETTINGS, extra_toml=rpc_toml(a, b))
    try:
        st = split.wait_ready(180)
        plan = st["plan"]
        assert plan["rpc_devices"] == [f"{a.endpoint}/0", f"{b.endpoint}/0"]
        rows = remote_rows(st)
        ra, rb = rows[f"rpc:{a.endpoint}/0"], rows[f"rpc:{b.endpoint}/0"]
        # The CPU keeps the first layers, then server a, then server b with the output layer.
        assert 0 < ra["first_layer"] and ra["last_layer"] + 1 == rb["first_layer"] and rb["last_layer"] == 30
        assert rb["has_output"] and plan["n_gpu_layers"] == 31 - ra["first_layer"]
        text = greedy(split)
        log = split.log()
        for row, srv in ((ra, a), (rb, b)):
            got = buffers(log, srv.endpoint)
            est = row["estimate"]
            # The weights and KV cache the plan put there are what the server was asked to hold;
            # everything (with the compute buffer) stays within what the plan gave it.
            assert abs(got["weights"] - est["weights_mib"]) <= 1.0, (got, est)
            assert abs(got["kv"] - est["kv_mib"]) <= 1.0, (got, est)
            assert got["compute"] > 0 and sum(got.values()) <= row["planned_mib"] <= CAP_MIB, (got, row)
        assert split.stop() == 0
    finally:
        split.kill_hard()
    (tmp_path / "local").mkdir()
    local = Supervisor(tmp_path / "local", SETTINGS)
    try:
        st = local.wait_ready(180)
        assert st["plan"]["rpc_devices"] == [] and st["plan"]["cpu_only"]
        assert greedy(local) == text
        assert local.stop() == 0
    finally:
        local.kill_hard()


def test_a_server_killed_mid_generation_is_an_error_then_the_plan_leaves_it_out(
    tmp_path: Path, servers: tuple[RpcServer, RpcServer]
) -> None:
    a, b = servers
    s = Supervisor(tmp_path, SETTINGS, extra_toml=rpc_toml(a, b))
    try:
        first = s.wait_ready(180)
        pid = first["worker"]["pid"]
        outcome: dict[str, Any] = {}

        def stream() -> None:
            body = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True, "ignore_eos": True}
            req = urllib.request.Request(
                s.base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            chunks = 0
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    for line in r:
                        if line.startswith(b"data: {"):
                            chunks += 1
                            outcome["chunks"] = chunks
                            if b'"error"' in line:
                                outcome["error"] = line.decode()
                        elif line.startswith(b"data: [DONE]"):
                            outcome["done"] = True
            except Exception as e:  # the connection cut: the error the client sees
                outcome["error"] = repr(e)
            outcome["finished"] = True

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        poll(lambda: outcome.get("chunks", 0) >= 3, 60.0, "the first tokens")
        b.kill()
        # Not a hang: the request ends, with an error (the worker died with the host's link).
        poll(lambda: outcome.get("finished"), 60.0, "the stream to end")
        t.join(5)
        # The proxy's answer to a worker that died mid-stream: one error event, then the end.
        assert "worker_failed" in outcome.get("error", ""), outcome
        # The supervisor restarts the worker; the new plan leaves the dead host out.
        st = s.wait_state("ready", 120, pred=lambda st: st["worker"]["pid"] != pid)
        assert st["plan"]["rpc_devices"] == [f"{a.endpoint}/0"]
        assert any(n.startswith(f"rpc {b.endpoint} left out: cannot connect") for n in st["plan"]["notes"]), st["plan"]["notes"]
        history = st["restart_history"]
        assert history and "lost a remote device" in history[-1]["reason"], history
        assert greedy(s)  # serving again
        assert s.stop() == 0
    finally:
        s.kill_hard()
