"""Remote devices: llama.cpp RPC servers (``rpc-server``) read over their own protocol.

Rules for this module:
- The supervisor must start without llama_cpp, so the few commands the plan needs (HELLO,
  DEVICE_COUNT, GET_DEVICE_MEMORY) are spoken here over a plain socket, as
  ggml/src/ggml-rpc/ggml-rpc.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors
  frames them: request = cmd (1 byte) | size (uint64) | data; response = size (uint64) | data,
  little-endian (the server sends its structs as they lie in memory).
- Every read is bounded: an endpoint that refuses, does not answer, or answers something else
  is left out of the plan with a reason, never a hang. An rpc-server serves ONE client at a
  time (it accepts the next connection only when the current one closes), so one that is busy
  with a worker (ours or anyone's) accepts the TCP connection and then says nothing: that is
  "no answer", not an error of ours.
- The protocol has no authentication: ``endpoint_warning`` says so for any endpoint that is
  not loopback or a private address. Nothing here listens on a port.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from supervisor.inventory import RemoteDevice, RemoteInventory, RemoteProbe

if TYPE_CHECKING:
    from supervisor.config import Config

# ggml-rpc.h: the worker's llama.cpp speaks protocol 7.0.x; a server of another major version
# (or a newer minor) is refused by its HELLO check, and the worker would abort.
PROTO_MAJOR = 7
PROTO_MINOR = 0
CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24  # transport.h RPC_CONN_CAPS_SIZE: all zero = plain TCP, no RDMA
MIB = 1024 * 1024


class EndpointError(ValueError):
    """An endpoint string is not host:port."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of "host:port", as llama.cpp's parse_endpoint reads it (the first colon
    splits, so an IPv6 literal is not possible there either)."""
    host, sep, port = endpoint.partition(":")
    if not sep or not host or ":" in port or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise EndpointError(f"{endpoint!r} is not host:port (e.g. 192.168.1.20:50052)")
    return host, int(port)


def endpoint_warning(endpoint: str) -> str | None:
    """Why this endpoint deserves a warning (None: loopback or a private address).

    A host name is resolved by the caller's resolver only when asked to: here it is judged by
    its text, so "localhost" passes and any other name is warned about (we cannot know where
    it points)."""
    host, _ = parse_endpoint(endpoint)
    if host == "localhost":
        return None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return (
            f"rpc endpoint {endpoint}: llama.cpp's RPC protocol has no authentication; make sure "
            f"{host} is on a private network (anyone who can reach the port can run code on its devices)"
        )
    if addr.is_loopback or addr.is_private or addr.is_link_local:
        return None
    return (
        f"rpc endpoint {endpoint} is a public address: llama.cpp's RPC protocol has no authentication "
        "and no encryption; never expose an rpc-server to an open network"
    )


class _Conn:
    """One connection with a deadline for every byte."""

    def __init__(self, endpoint: str, deadline: float, clock: Callable[[], float]) -> None:
        host, port = parse_endpoint(endpoint)
        self._deadline = deadline
        self._clock = clock
        self.sock = socket.create_connection((host, port), timeout=self._left())

    def _left(self) -> float:
        left = self._deadline - self._clock()
        if left <= 0:
            raise TimeoutError
        return left

    def close(self) -> None:
        self.sock.close()

    def call(self, cmd: int, data: bytes, answer_size: int) -> bytes:
        self.sock.settimeout(self._left())
        self.sock.sendall(struct.pack("<BQ", cmd, len(data)) + data)
        size = struct.unpack("<Q", self._recv(8))[0]
        if size != answer_size:
            raise ValueError(f"answered {size} bytes to command {cmd}, expected {answer_size}")
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed the connection")
            buf += chunk
        return buf


def probe_endpoint(
    endpoint: str, timeout_s: float, clock: Callable[[], float] = time.monotonic
) -> tuple[list[tuple[int, int]], str | None]:
    """[(free bytes, total bytes) per device], or ([], why not) within ``timeout_s`` in all."""
    deadline = clock() + timeout_s
    try:
        conn = _Conn(endpoint, deadline, clock)
    except EndpointError as e:
        return [], str(e)
    except TimeoutError:
        return [], f"no connection within {timeout_s:g}s"
    except OSError as e:
        return [], f"cannot connect: {e.strerror or e}"
    try:
        hello = conn.call(CMD_HELLO, bytes(CONN_CAPS_SIZE), 4 + CONN_CAPS_SIZE)
        major, minor, patch = hello[0], hello[1], hello[2]
        if major != PROTO_MAJOR or minor > PROTO_MINOR:
            return [], (
                f"speaks RPC protocol {major}.{minor}.{patch}; the worker's llama.cpp speaks "
                f"{PROTO_MAJOR}.{PROTO_MINOR}.x (run an rpc-server of the same llama.cpp version)"
            )
        count = struct.unpack("<I", conn.call(CMD_DEVICE_COUNT, b"", 4))[0]
        out = []
        for dev in range(count):
            free, total = struct.unpack("<QQ", conn.call(CMD_GET_DEVICE_MEMORY, struct.pack("<I", dev), 16))
            out.append((free, total))
        return out, None if out else "reports no device"
    except TimeoutError:
        return [], (
            f"no answer within {timeout_s:g}s (an rpc-server serves one client at a time: "
            "another worker or llama.cpp may be using it)"
        )
    except (OSError, ValueError) as e:
        return [], f"bad answer: {e}"
    finally:
        conn.close()


@dataclass(frozen=True)
class RpcTarget:
    """One configured endpoint ([[rpc]] or --rpc) and how much of it the plan may use."""

    endpoint: str
    max_mib: int = 0  # 0: no cap beyond what the server reports free


class RpcProbe:
    """Reads every configured endpoint; one that is down is waited for up to ``wait_s``
    (re-tried every ``retry_s``), then left out with its reason."""

    def __init__(
        self,
        targets: Sequence[RpcTarget],
        timeout_s: float,
        wait_s: float = 0.0,
        retry_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.targets = tuple(targets)
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.retry_s = retry_s
        self._clock = clock
        self._sleep = sleep

    def read(self) -> RemoteInventory:
        devices: list[RemoteDevice] = []
        gone: list[tuple[str, str]] = []
        deadline = self._clock() + self.wait_s
        for t in self.targets:
            while True:
                found, why = probe_endpoint(t.endpoint, self.timeout_s, self._clock)
                if why is None or self._clock() + self.retry_s >= deadline:
                    break
                self._sleep(self.retry_s)
            if why is not None:
                gone.append((t.endpoint, why))
                continue
            for dev, (free, total) in enumerate(found):
                devices.append(
                    RemoteDevice(t.endpoint, dev, total // MIB, free // MIB, t.max_mib or None)
                )
        return RemoteInventory(tuple(devices), tuple(gone))


class _NoRemotes:
    def read(self) -> RemoteInventory:
        return RemoteInventory()


class _SimulatedRemotes:
    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> RemoteInventory:
        from supervisor.gpus import SimulatedProbe

        return SimulatedProbe(self.path).read_remotes()


def make_remote_probe(config: Config) -> RemoteProbe:
    """The remote devices of this configuration: the simulated file's (--simulate-gpus: a
    what-if, nothing is contacted), else every [[rpc]] endpoint's (none: nothing to read)."""
    if config.gpu.simulate_gpus:
        return _SimulatedRemotes(config.gpu.simulate_gpus)
    if not config.rpc:
        return _NoRemotes()
    targets = [RpcTarget(r.endpoint, r.max_mib) for r in config.rpc]
    return RpcProbe(targets, config.gpu.rpc_timeout_s, config.gpu.rpc_wait_s)
