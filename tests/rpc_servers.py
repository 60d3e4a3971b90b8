"""llama.cpp rpc-servers on loopback for tests (issue 29): ``python -m worker.engine.rpc_server``
on the CPU backend, each in its own process group, killed and reaped when the test is done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from supervisor.rpc import probe_endpoint
from tests.supervisor_harness import free_port, poll

REPO = Path(__file__).resolve().parent.parent


def rpc_unsupported() -> str | None:
    """Why the tests that need llama.cpp's RPC backend cannot run here (None: they can)."""
    from worker.engine import rpc

    return rpc.supported()


class RpcServer:
    """One rpc-server on 127.0.0.1 (CPU backend, one thread: the CI box has two cores)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"rpc-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.engine.rpc_server", "--port", str(self.port), "--threads", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_serving(self, timeout: float = 60.0) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"rpc-server exited with {self.proc.returncode}: {self.log()}"
            return probe_endpoint(self.endpoint, 1.0)[1] is None

        poll(up, timeout, f"rpc-server {self.endpoint}", interval=0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
