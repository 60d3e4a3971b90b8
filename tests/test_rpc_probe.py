"""Remote devices without llama.cpp (issue 29): the supervisor's RPC probe against small fake
servers speaking ggml-rpc's framing, the [[rpc]] config and flag, the address warning, the
restart reason, and `vram-llm plan` on a simulated inventory with remote devices."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.cli import build_parser, load_config, main
from supervisor.config import ConfigError
from supervisor.liveness import exit_verdict
from supervisor.rpc import EndpointError, RpcProbe, RpcTarget, endpoint_warning, parse_endpoint, probe_endpoint
from tests.supervisor_harness import free_port
from worker.protocol import is_rpc_loss_line

MIB = 1024 * 1024


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError
        buf += chunk
    return buf


@contextlib.contextmanager
def fake_server(mode: str = "ok", version: tuple[int, int, int] = (7, 0, 0), port: int | None = None,
                delay_s: float = 0.0) -> Iterator[str]:
    """A one-client-at-a-time server on loopback: "ok" answers HELLO, DEVICE_COUNT (2 devices)
    and GET_DEVICE_MEMORY; "silent" accepts and never answers; "close" hangs up at once."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def listen() -> None:
        srv.bind(("127.0.0.1", bound))
        srv.listen(4)
        srv.settimeout(0.05)

    def serve() -> None:
        if delay_s:
            if stop.wait(delay_s):  # comes up late (a host that is rebooting), unless stopped first
                return
            listen()
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)
            if mode == "close":
                conn.close()
                continue
            if mode == "silent":
                continue
            try:
                while True:
                    cmd, size = struct.unpack("<BQ", _recv(conn, 9))
                    data = _recv(conn, size)
                    if cmd == 14:
                        out = bytes(version) + b"\0" + bytes(24)
                    elif cmd == 15:
                        out = struct.pack("<I", 2)
                    elif cmd == 11:
                        dev = struct.unpack("<I", data)[0]
                        out = struct.pack("<QQ", (1000 + dev) * MIB, 2000 * MIB)
                    else:
                        break
                    conn.sendall(struct.pack("<Q", len(out)) + out)
            except (ConnectionError, OSError):
                pass
            conn.close()

    bound = port or free_port()
    if not delay_s:
        listen()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{bound}"
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()


def test_probe_reads_every_device() -> None:
    with fake_server() as ep:
        assert probe_endpoint(ep, 2.0) == ([(1000 * MIB, 2000 * MIB), (1001 * MIB, 2000 * MIB)], None)
        inv = RpcProbe([RpcTarget(ep, 500)], 2.0).read()
    assert [(d.device, d.free_mib, d.total_mib, d.max_mib, d.key) for d in inv.devices] == [
        (0, 1000, 2000, 500, f"rpc:{ep}/0"), (1, 1001, 2000, 500, f"rpc:{ep}/1")]
    assert inv.unreachable == ()


@pytest.mark.parametrize(
    ("mode", "version", "why"),
    [
        ("silent", (7, 0, 0), "no answer within 0.3s (an rpc-server serves one client at a time"),
        ("close", (7, 0, 0), "bad answer: "),  # closed, or reset (our HELLO was unread)
        ("ok", (6, 1, 0), "speaks RPC protocol 6.1.0; the worker's llama.cpp speaks 7.0.x"),
        ("ok", (7, 1, 0), "speaks RPC protocol 7.1.0"),
    ],
)
def test_probe_gives_a_reason_within_its_deadline(mode: str, version: tuple[int, int, int], why: str) -> None:
    with fake_server(mode, version) as ep:
        t0 = time.monotonic()
        found, got = probe_endpoint(ep, 0.3)
        assert time.monotonic() - t0 < 2.0
    assert found == [] and got is not None and got.startswith(why), got


def test_probe_of_a_closed_port_and_a_bad_endpoint() -> None:
    assert probe_endpoint(f"127.0.0.1:{free_port()}", 1.0)[1] == "cannot connect: Connection refused"
    assert "is not host:port" in str(probe_endpoint("nohost", 1.0)[1])


def test_wait_for_a_host_that_comes_back_or_give_it_up() -> None:
    port = free_port()
    t0 = time.monotonic()
    gone = RpcProbe([RpcTarget(f"127.0.0.1:{port}")], 0.5, wait_s=0.4, retry_s=0.05).read()
    assert 0.3 <= time.monotonic() - t0 < 3.0
    assert gone.devices == () and gone.unreachable == ((f"127.0.0.1:{port}", "cannot connect: Connection refused"),)
    with fake_server(port=port, delay_s=0.3) as ep:
        back = RpcProbe([RpcTarget(ep)], 0.5, wait_s=10.0, retry_s=0.05).read()
    assert len(back.devices) == 2 and back.unreachable == ()


@pytest.mark.parametrize(
    ("endpoint", "warned"),
    [("127.0.0.1:50052", False), ("localhost:50052", False), ("192.168.1.20:50052", False),
     ("10.1.2.3:1", False), ("8.8.8.8:50052", True), ("gpu-box.example.com:50052", True)],
)
def test_endpoints_outside_private_networks_are_warned_about(endpoint: str, warned: bool) -> None:
    w = endpoint_warning(endpoint)
    assert (w is not None) == warned
    if w:
        assert "no authentication" in w


@pytest.mark.parametrize("bad", ["host", ":50052", "h:0", "h:70000", "::1:50052", "h:p"])
def test_parse_endpoint_refuses(bad: str) -> None:
    with pytest.raises(EndpointError):
        parse_endpoint(bad)


def test_rpc_config_and_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[rpc]]\nendpoint = "10.0.0.2:50052"\nmax_mib = 20000\n[gpu]\nrpc_wait_s = 30\n')
    c = load_config(build_parser().parse_args(["plan", "--config", str(cfg)]))
    assert [(r.endpoint, r.max_mib) for r in c.rpc] == [("10.0.0.2:50052", 20000)] and c.gpu.rpc_wait_s == 30
    c = load_config(build_parser().parse_args(["plan", "--rpc", "127.0.0.1:5", "--rpc", "10.0.0.1:6"]))
    assert [r.endpoint for r in c.rpc] == ["127.0.0.1:5", "10.0.0.1:6"]
    for bad in (["--rpc", "nope"], ["--rpc", "a:1", "--rpc", "a:1"]):
        with pytest.raises(ConfigError, match="rpc"):
            load_config(build_parser().parse_args(["plan", *bad]))


def test_restart_reason_names_a_lost_remote_device() -> None:
    line = "/x/ggml-rpc.cpp:571: Remote RPC server crashed or returned malformed response"
    assert is_rpc_loss_line(line) and not is_rpc_loss_line("llama.cpp: load_tensors: offloading 30 layers")
    v = exit_verdict(7, -6, killed_by_us=False, oom_line=None, host_oom=False, last_line="#3 abort", rpc_line=line)
    assert v.detail.startswith("worker pid 7 exit code -6 (SIGABRT): lost a remote device (llama.cpp: ")


def test_plan_shows_remote_devices_from_a_simulated_inventory(tmp_path: Path) -> None:
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps([
        {"endpoint": "192.168.1.20:50052", "total_mib": 24000, "free_mib": 24000, "max_mib": 450},
        {"endpoint": "8.8.8.8:50052", "total_mib": 24000, "free_mib": 24000, "max_mib": 450},
        {"endpoint": "192.168.1.21:50052", "total_mib": 24000, "free_mib": 0, "unreachable": "cannot connect: No route to host"},
    ]))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--simulate-gpus", str(sim), "--reserve-mib", "0", "--parallel", "1"]) == 0
    text = out.getvalue()
    assert "devices for llama.cpp: RPC 192.168.1.20:50052/0, 8.8.8.8:50052/0 first" in text
    assert "the CPU keeps layers 0-" in text
    assert "note: rpc 192.168.1.21:50052 left out: cannot connect: No route to host" in text
    assert "note: rpc endpoint 8.8.8.8:50052 is a public address" in text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--json", "--simulate-gpus", str(sim), "--reserve-mib", "0", "--parallel", "1"]) == 0
    p = json.loads(out.getvalue())
    assert p["rpc_devices"] == ["192.168.1.20:50052/0", "8.8.8.8:50052/0"]
    rows = [g for g in p["gpus"] if g["endpoint"]]
    assert [r["first_layer"] is not None for r in rows] == [True, True] and rows[1]["has_output"]


def test_a_wheel_without_the_rpc_backend_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the RPC tests' skip reason and the worker's BadSetting say on an old wheel.
    from worker.engine import rpc

    monkeypatch.setattr(rpc, "_libs", None)
    monkeypatch.setattr(rpc, "_lib_dir", lambda: tmp_path)
    why = rpc.supported()
    assert why is not None and "built without the RPC backend" in why and "-DGGML_RPC=ON" in why
