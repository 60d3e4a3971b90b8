"""What one start of a worker uses, and the two ways planning one can fail.

Owns nothing: plain values and exceptions shared by the fleet (which plans starts), the
preparer (launch.py, which builds a ``Launch``) and the manager (worker_process.py, which
starts from one). Imports nothing heavy: ``vram-llm plan`` reaches it without aiohttp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from supervisor.restart import PlanAdjust
from supervisor.status import PlanView
from worker.protocol import LaunchSpec


@dataclass(frozen=True)
class Launch:
    """What one start of the worker uses: the plan in force and how to apply it."""

    spec: LaunchSpec
    env: dict[str, str]
    plan: PlanView  # the plan, as /status shows it
    planned_layers: int  # layers actually offloaded by the plan (for the OOM ladder)
    reserve_mib: int
    summary: str  # one line for logs and sd_notify STATUS=


class LaunchPreparer(Protocol):
    """Plans a start: reads the GPU inventory now, applies the OOM-ladder adjustment."""

    async def __call__(self, adjust: PlanAdjust | None, socket_path: str) -> Launch: ...

    async def wait_gpu_settled(self, timeout_s: float) -> None:
        """Wait (bounded) until a dead worker's GPU memory has come back."""


class PlanFailed(Exception):
    """The plan itself cannot be made (e.g. the model file vanished): not retried."""


class NoRoom(Exception):
    """The fleet cannot place the model now (no room, busy models did not go idle in time,
    removed, shutting down): the manager stays unloaded and the requests waiting for this
    load get 503 with this reason."""

    def __init__(self, reason: str, retry_after_s: int = 5) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
