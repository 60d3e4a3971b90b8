"""In-process fakes for the lifecycle tier: a process adapter without processes, a
preparer without GPUs, and an event loop whose clock only moves when nothing can run.

With ``run_virtual`` a test drives a ``WorkerManager`` (or a fleet of them) through
backoffs, stalls and grace periods of minutes in milliseconds, and deterministically:
the clock jumps to the next timer only when every task is waiting (supervisord's tests
call ``transition()`` without sleeping; this is the asyncio way to the same end).
"""

from __future__ import annotations

import asyncio
import collections
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import aiohttp

from supervisor.config import Config
from supervisor.launch import default_spec
from supervisor.launches import Launch, NoRoom, PlanFailed
from supervisor.restart import PlanAdjust
from worker.protocol import AppliedParams, Health

T = TypeVar("T")


class _VirtualSelector:
    """Never blocks while a timer is due: instead the loop's clock jumps to it."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualClockLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("deadlock: no task can run and no timer is set")
        self._loop.now += timeout
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self._selector = _VirtualSelector(self._selector, self)  # type: ignore[has-type]

    def time(self) -> float:
        return self.now


def run_virtual(main: Callable[[], Awaitable[T]], limit_s: float = 3600.0) -> T:
    """Run ``main()`` on a virtual clock; fail if it takes more than ``limit_s`` virtual seconds."""
    loop = VirtualClockLoop()

    async def bounded() -> T:
        return await asyncio.wait_for(main(), limit_s)

    try:
        return loop.run_until_complete(bounded())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def sync_to_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``asyncio.to_thread`` for the virtual clock: a thread's wake-up is not a timer."""
    return func(*args, **kwargs)


def health(status: str = "ok", *, progress: float = 1.0, since_token: float | None = None, parallel: int = 1) -> Health:
    params = AppliedParams(model_path="/m.gguf", n_gpu_layers=0, tensor_split=None, split_mode="layer", main_gpu=0,
                           n_ctx=4096, n_batch=512, n_threads=1, chat_format=None, cuda_visible_devices=None,
                           cuda_device_order=None, llama_cpp_version="fake", gpu_offload_supported=False,
                           parallel=parallel, prefill_chunk=0, token_gap_ms=1,
                           draft_max=0)
    return Health(status=status, pid=1, progress=progress, seconds_since_token=since_token,  # type: ignore[arg-type]
                  params=params if status == "ok" else None)


class FakeProcess:
    """One fake worker. ``mode`` says what its /health answers: "ok" (200), "loading"
    (503 with ``progress``), "silent" (no answer), "stuck" (200, no token for ages)."""

    def __init__(self, pid: int, mode: str, ignore_term: bool) -> None:
        self.pid = pid
        self.session = cast(aiohttp.ClientSession, None)
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.killed_by_us = False
        self.oom_line: str | None = None
        self.host_oom = False
        self.mode = mode
        self.progress = 0.0
        self.ignore_term = ignore_term
        self.probes = 0
        self.stopped = False
        self.stop_gate: asyncio.Event | None = None  # set: stop() waits for it (an unload in progress)

    def exit(self, code: int) -> None:
        if not self.exited.done():
            self.exited.set_result(code)

    async def health(self, timeout_s: float) -> tuple[int, Health] | None:
        self.probes += 1
        if self.mode == "silent":
            await asyncio.sleep(timeout_s)
            return None
        if self.mode == "loading":
            return 503, health("loading", progress=self.progress)
        if self.mode == "stuck":
            return 200, health(since_token=10_000.0)
        return 200, health()

    async def stop(self, timeout_s: float) -> None:
        if self.stop_gate is not None:
            await self.stop_gate.wait()
        if not self.exited.done():
            self.killed_by_us = True
            if self.ignore_term:
                await asyncio.sleep(timeout_s)
                self.exit(-9)
            else:
                self.exit(-15)
        await self.exited
        self.stopped = True

    def host_oom_killed(self) -> bool:
        return self.host_oom

    def usage(self) -> tuple[float | None, float | None]:
        return 12.5, 1.0


class FakeSpawner:
    """Starts ``FakeProcess``es; ``modes`` gives each new one its mode (default "ok")."""

    def __init__(self) -> None:
        self.stderr: collections.deque[str] = collections.deque(maxlen=50)
        self.procs: list[FakeProcess] = []
        self.modes: collections.deque[str] = collections.deque()
        self.fail_next: OSError | None = None
        self.ignore_term = False
        self.started = asyncio.Event()

    @property
    def last(self) -> FakeProcess:
        return self.procs[-1]

    async def start(self, gen: int, launch: Launch) -> FakeProcess:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        p = FakeProcess(10_000 + gen, self.modes.popleft() if self.modes else "ok", self.ignore_term)
        self.stderr.clear()
        self.procs.append(p)
        self.started.set()
        return p


def launch_of(socket_path: str, adjust: PlanAdjust | None = None, parallel: int = 1) -> Launch:
    spec = default_spec("/m.gguf", socket_path, n_ctx=4096, parallel=parallel)
    return Launch(spec=spec, env={}, plan={"gpus": []}, planned_layers=32, reserve_mib=512,
                  summary="fake plan" if adjust is None else f"fake plan, {adjust.description}")


class FakePreparer:
    """Answers each start with a Launch, or raises what ``raises`` holds (once)."""

    def __init__(self) -> None:
        self.adjusts: list[PlanAdjust | None] = []
        self.raises: collections.deque[Exception] = collections.deque()
        self.settled = 0

    async def __call__(self, adjust: PlanAdjust | None, socket_path: str) -> Launch:
        self.adjusts.append(adjust)
        if self.raises:
            raise self.raises.popleft()
        return launch_of(socket_path, adjust)

    async def wait_gpu_settled(self, timeout_s: float) -> None:
        self.settled += 1


def fast_config(**restart: Any) -> Config:
    """Short limits so a test reads well (the clock is virtual anyway)."""
    import msgspec

    return msgspec.convert(
        {
            "worker": {"health_interval_s": 1.0, "health_timeout_s": 1.0, "health_failures": 2,
                       "load_stall_timeout_s": 30.0, "token_stall_timeout_s": 60.0, "stop_timeout_s": 5.0},
            "restart": {"backoff_initial_s": 1.0, "backoff_max_s": 8.0, "max_failures": 3,
                        "stable_after_s": 100.0, "failure_window_s": 600.0, **restart},
            "shutdown": {"grace_s": 20.0},
            "admission": {"wait_timeout_s": 30.0, "queue_size": 4},
        },
        Config,
    )


__all__ = ["FakePreparer", "FakeProcess", "FakeSpawner", "NoRoom", "PlanFailed", "fast_config", "run_virtual",
           "sync_to_thread", "health", "launch_of"]
