"""sd_notify through a real AF_UNIX datagram socket bound in a temp dir (no mocks)."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sdnotify import SdNotify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)  # bounded wait for each datagram
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_arrive(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = SdNotify.from_env({"NOTIFY_SOCKET": path})
    try:
        assert n.enabled
        assert n.ready()
        assert recv(sock) == ["READY=1"]
        assert n.ready("serving model.gguf")
        assert recv(sock) == ["READY=1", "STATUS=serving model.gguf"]
        assert n.status("loading 40%\nsecond line")
        assert recv(sock) == ["STATUS=loading 40% second line"]
        assert n.watchdog()
        assert recv(sock) == ["WATCHDOG=1"]
        assert n.extend_timeout(30_000_000)
        assert recv(sock) == ["EXTEND_TIMEOUT_USEC=30000000"]
        assert n.stopping()
        assert recv(sock) == ["STOPPING=1"]
    finally:
        n.close()


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = SdNotify.from_env({"NOTIFY_SOCKET": path})
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading("re-reading config")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = recv(sock)
        assert fields[0] == "RELOADING=1"
        key, value = fields[1].split("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after
        assert fields[2] == "STATUS=re-reading config"
    finally:
        n.close()


def test_abstract_socket_name() -> None:
    name = f"vram-llm-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    n = SdNotify.from_env({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.ready()
        assert recv(sock) == ["READY=1"]
    finally:
        n.close()
        sock.close()


def test_no_socket_is_a_noop() -> None:
    n = SdNotify.from_env({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.watchdog_interval_s() is None


def test_send_failure_never_raises_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = SdNotify.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    try:
        with caplog.at_level(logging.DEBUG, logger="supervisor.sdnotify"):
            assert n.ready() is False
            assert n.status("x") is False
            assert n.watchdog() is False
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
    finally:
        n.close()


def test_unsupported_address_is_off() -> None:
    n = SdNotify.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    n = SdNotify.from_env({"NOTIFY_SOCKET": "/nonexistent", **env})
    assert n.watchdog_interval_s() == expected


def test_unset_environment_hides_variables_from_children(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid()), "KEEP": "1"}
    n = SdNotify.from_env(env, unset_environment=True)
    try:
        assert env == {"KEEP": "1"}
        # The notifier still works after the variables are gone.
        assert n.watchdog_interval_s() == 10.0
        assert n.ready()
        assert recv(sock) == ["READY=1"]
    finally:
        n.close()
