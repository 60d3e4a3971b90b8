"""The process adapter: start a worker from a Launch, probe its health, stop it.

Owns: each worker's OS process, its aiohttp session, the stderr ring (the last lines,
kept across restarts for /status) and the OOM-line flag. It never moves a state and
decides nothing: the manager (worker_process.py) calls it, alone, from its task, and
judges what it reports with the pure verdicts of liveness.py. Tests pass a fake
``Spawner`` (tests/lifecycle_fakes.py) to run the manager without processes.

Process hygiene (STYLE.md habit 6): the worker is a fresh interpreter in its own process
group; it is stopped with SIGTERM to the group, a deadline, then SIGKILL, and always reaped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import aiohttp
import msgspec
import psutil

from supervisor.cgroup import OomWatch
from supervisor.config import Config, resolved_worker_command
from supervisor.launches import Launch
from supervisor.restart import describe_exit
from worker.protocol import Health, health_decoder, is_oom_line

log = logging.getLogger("vram_llm.worker")

# Level names the worker's log lines start with (worker/__main__.py's format); anything
# else it prints (llama.cpp's lines, a traceback) is logged at INFO.
_WORKER_LEVELS = {"WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


class WorkerProcess(Protocol):
    """One started worker, as the manager sees it."""

    pid: int
    session: aiohttp.ClientSession  # one long-lived session to its socket (proxy.py)
    exited: asyncio.Future[int]  # its exit status, once reaped
    killed_by_us: bool
    oom_line: str | None  # the out-of-memory line it printed, if any

    async def health(self, timeout_s: float) -> tuple[int, Health] | None:
        """One /health probe: (HTTP status, body), or None when it did not answer."""

    async def stop(self, timeout_s: float) -> None:
        """TERM to the group, ``timeout_s``, KILL; reap, close the session, remove its files.
        Also for a process that exited already (cleans up after it)."""

    def host_oom_killed(self) -> bool:
        """The cgroup's oom_kill counter (else the kernel log) says the OOM killer killed it."""

    def usage(self) -> tuple[float | None, float | None]:
        """(RSS in MiB, CPU percent) now; None where the OS does not say."""


class Spawner(Protocol):
    """Starts workers for one model. ``stderr`` is the ring of the latest worker's lines."""

    stderr: collections.deque[str]

    async def start(self, gen: int, launch: Launch) -> WorkerProcess:
        """Start generation ``gen``; OSError when the process cannot be started."""


def host_oom_killed(pid: int) -> bool:
    """True when the kernel log says the host OOM killer killed ``pid``.

    Reading /dev/kmsg needs privileges that a sandboxed service may not have: then we
    cannot tell, and say no (the death is treated as an ordinary crash).
    """
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    needle = f"Killed process {pid} ".encode()
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                return False
            except OSError:  # EPIPE when records were overwritten; keep reading
                continue
            if not rec:
                return False
            if needle in rec and b"ut of memory" in rec:
                return True
    finally:
        os.close(fd)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Process:
    """A worker started by ``ProcessSpawner``."""

    def __init__(
        self, proc: asyncio.subprocess.Process, launch: Launch, spec_path: Path, stderr: collections.deque[str]
    ) -> None:
        self.pid = proc.pid
        self._proc = proc
        self._spec_path = spec_path
        self._socket_path = launch.spec.socket_path
        self._stderr = stderr
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=launch.spec.socket_path, limit=0),
            # The proxy sets per-request timeouts; the session itself never times out a
            # streamed generation.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        self.exited: asyncio.Future[int] = asyncio.ensure_future(proc.wait())
        self.killed_by_us = False
        self.oom_line: str | None = None
        self._reader = asyncio.create_task(self._read_stderr())
        self._psproc: psutil.Process | None = None
        with contextlib.suppress(psutil.Error):
            self._psproc = psutil.Process(proc.pid)
            self._psproc.cpu_percent(interval=None)
        self._oom_watch = OomWatch.of(proc.pid)  # the cgroup's OOM-kill count before it can run out

    async def _read_stderr(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        own = f"worker[{self.pid}] "
        while True:
            try:
                raw = await stdout.readline()
            except ValueError:  # a line over the limit: take what is there
                raw = await stdout.read(1 << 16)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\n")
            # The worker's own lines start "worker[PID] LEVEL ": keep its level, drop the
            # prefix we are about to add again.
            if line.startswith(own):
                line = line[len(own):]
            level = _WORKER_LEVELS.get(line.split(" ", 1)[0], logging.INFO)
            self._stderr.append(line)
            if is_oom_line(line):
                self.oom_line = line
                level = logging.ERROR
            log.log(level, "worker[%d]: %s", self.pid, line)

    async def health(self, timeout_s: float) -> tuple[int, Health] | None:
        try:
            async with self.session.get("http://worker/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                body = await resp.read()
            return resp.status, health_decoder.decode(body)
        except (aiohttp.ClientError, asyncio.TimeoutError, msgspec.DecodeError, OSError):
            return None

    async def stop(self, timeout_s: float) -> None:
        if self._proc.returncode is None:
            self.killed_by_us = True
            _killpg(self.pid, signal.SIGTERM)
            done, _ = await asyncio.wait({self.exited}, timeout=timeout_s)
            if not done:
                log.error("worker pid %d did not stop within %.0fs of SIGTERM: sending SIGKILL", self.pid, timeout_s)
                _killpg(self.pid, signal.SIGKILL)
        await self.exited
        # Anything the worker left in its group (helpers, grandchildren) goes too.
        _killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(self._reader, 2.0)
        self._reader.cancel()
        await self.session.close()
        for p in (self._socket_path, str(self._spec_path)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        log.info("worker pid %d is gone (%s)", self.pid, describe_exit(self._proc.returncode or 0))

    def host_oom_killed(self) -> bool:
        counted = self._oom_watch.killed()
        return counted if counted is not None else host_oom_killed(self.pid)

    def usage(self) -> tuple[float | None, float | None]:
        if self._psproc is None:
            return None, None
        with contextlib.suppress(psutil.Error):
            with self._psproc.oneshot():
                return round(self._psproc.memory_info().rss / 2**20, 1), self._psproc.cpu_percent(interval=None)
        return None, None


class ProcessSpawner:
    """Starts the real worker (``worker.command`` of the configuration in force)."""

    def __init__(self, config: Callable[[], Config], runtime_dir: Path) -> None:
        self._config = config
        self._runtime_dir = runtime_dir
        self.stderr: collections.deque[str] = collections.deque(maxlen=config().worker.stderr_lines)

    async def start(self, gen: int, launch: Launch) -> WorkerProcess:
        spec_path = self._runtime_dir / f"worker-{gen}.spec.json"
        spec_path.write_bytes(msgspec.json.encode(launch.spec))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(launch.spec.socket_path)
        cmd = [*resolved_worker_command(self._config()), "--spec", str(spec_path)]
        log.info("worker command: %s", " ".join(cmd))
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=launch.env,
                start_new_session=True,  # own process group: we kill the whole group
                limit=1 << 20,
            )
        except OSError as e:
            log.error("cannot start worker %s: %s", cmd, e)
            raise
        self.stderr.clear()
        log.info("worker pid %d started", proc.pid)
        return _Process(proc, launch, spec_path, self.stderr)


def worker_pids_of(pid: int) -> list[int]:
    """The worker and its descendants (NVML lists GPU memory per process)."""
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return [pid]
