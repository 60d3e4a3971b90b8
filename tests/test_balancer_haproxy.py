"""Two vram-llm instances behind a real HAProxy (issue 26), with the README's configuration:
health checks on /health, leastconn, retries on a refused connection or a 503.

HAProxy comes from Debian's package (.ci/run installs it; the test installs it when it can,
else skips saying why). The instances run the fake worker: HAProxy does not care which
model answers, and its answers take milliseconds on a busy box.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.balancers import Pool, behind_balancer, installed_or_skip, kill_one_worker_under_load, sigterm_one_under_load


def haproxy_config(port: int, members: dict[str, int]) -> str:
    """The README's "Several boxes" HAProxy recipe, with test-sized check intervals."""
    servers = "\n".join(f"    server {name} 127.0.0.1:{p} check" for name, p in members.items())
    return f"""\
global
    maxconn 512

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # A request that could not reach a server, or got 503 from a draining one, goes to another.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503
    option http-buffer-request

frontend llm
    bind 127.0.0.1:{port}
    default_backend vram_llm

backend vram_llm
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    default-server inter 250ms fall 1 rise 2
{servers}
"""


@pytest.fixture
def haproxy_pool(tmp_path: Path) -> Iterator[tuple[Pool, str]]:
    binary = installed_or_skip("haproxy", "haproxy")

    def start(pool: Pool, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, {n: s.port for n, s in pool.members.items()}))
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True)
        assert check.returncode == 0, check.stderr.decode()
        return subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)

    with behind_balancer(tmp_path, "haproxy", start) as got:
        yield got


def test_haproxy_spreads_and_a_sigterm_loses_no_request(haproxy_pool: tuple[Pool, str]) -> None:
    """4 looping clients: both instances serve (leastconn); SIGTERM to one mid-load: it
    leaves the rotation by its /health, finishes what it has and exits 0; not one request
    fails, and the other instance serves everything after."""
    assert sigterm_one_under_load(*haproxy_pool).count() >= 40


def test_haproxy_keeps_serving_when_one_worker_is_killed(haproxy_pool: tuple[Pool, str]) -> None:
    """kill -9 of instance b's worker under 4 looping clients: b's supervisor restarts it
    (its /health is 503 meanwhile), HAProxy serves from a, and no request fails."""
    kill_one_worker_under_load(*haproxy_pool)
