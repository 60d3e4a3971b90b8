"""The /status document as msgspec structs: encoded by the endpoint, decoded by `vram-llm status`.

One description of the shape, so the server and the command cannot drift apart. Every field
has a default so that an older or partial document still decodes (the command renders what
is there). Optional per-worker readings are omitted, not null, when unknown.
"""

from __future__ import annotations

from typing import Any

import msgspec


class _S(msgspec.Struct, kw_only=True):
    pass


class RamCache(_S):
    entries: int
    bytes: int
    hits: int
    tokens_saved: int


class DiskCache(_S):
    """The prompt cache's disk tier (model.cache_disk_mib): states that outlive the worker."""

    dir: str  # the model's directory (the worker keeps one subdirectory per settings key)
    entries: int
    bytes: int
    hits: int
    tokens_saved: int
    errors: int  # damaged files dropped, failed writes (a failed write turns the tier off)


class WorkerStatus(_S, omit_defaults=True):
    pid: int
    generation: int
    started_at: float
    uptime_s: float
    ready_for_s: float | None = None
    load_progress: float | None = None
    # From the worker's last /health answer (absent before the first one).
    active: int | None = None
    queued: int | None = None
    seconds_since_token: float | None = None
    requests_served: int | None = None
    cache_hits: int | None = None  # requests that reused a slot's cached prompt
    cache_tokens_reused: int | None = None
    ram_cache: RamCache | None = None  # the host-RAM cache of KV snapshots
    disk_cache: DiskCache | None = None  # its disk tier (absent when off)
    # From the OS (absent when the process cannot be read).
    rss_mib: float | None = None
    cpu_percent: float | None = None


class RestartRecord(_S):
    at: float  # wall-clock time, for people
    kind: str
    reason: str


class LastExit(_S):
    pid: int
    code: int | None
    description: str | None
    kind: str
    detail: str
    at: float
    ran_for_s: float


class RequestCounts(_S):
    in_flight: int = 0
    waiting_for_worker: int = 0
    served: int = 0


class SupervisorInfo(_S):
    pid: int
    uptime_s: float
    model: str


class GpuNow(_S):
    index: int
    uuid: str
    name: str
    total_mib: int
    free_mib: int
    used_mib: int
    worker_mib: int | None = None  # what the worker's processes use on it (NVML)


class HealthVerdict(_S, omit_defaults=True):
    """What /health answers (200 when ``ok``); `vram-llm status` exits 0 only when ``ok``."""

    ok: bool
    status: str  # "ok", else the first model's state, or "loading" with several models
    reason: str = ""  # why not ok (with several models it names the model)
    retry_after_s: int | None = None  # /health's Retry-After when not ok


class ModelRow(_S):
    """One model of several (absent with a single model)."""

    id: str
    state: str  # a worker state, or "unloaded"
    reason: str = ""
    loaded: bool = False  # ready to answer now
    pinned: bool = False
    planned_mib: dict[str, int] = msgspec.field(default_factory=dict)  # GPU UUID -> MiB, the plan's estimate
    measured_mib: dict[str, int] = msgspec.field(default_factory=dict)  # GPU UUID -> MiB NVML measured
    restarts: int = 0
    swaps_in: int = 0  # loads after the first
    in_flight: int = 0
    idle_s: float | None = None  # seconds since its last request (None: none yet)


class Status(_S):
    state: str
    reason: str = ""
    worker: WorkerStatus | None = None
    restarts: int = 0  # the history below keeps the last 50
    restart_history: list[RestartRecord] = msgspec.field(default_factory=list)
    failure_streak: int = 0
    crash_loop: bool = False
    backoff_delay_s: float | None = None
    next_attempt_in_s: float | None = None
    last_exit: LastExit | None = None
    stderr_tail: list[str] = msgspec.field(default_factory=list)
    plan: dict[str, Any] | None = None  # Plan.to_dict() of the running worker
    oom_adjustment: str | None = None
    requests: RequestCounts = msgspec.field(default_factory=RequestCounts)
    supervisor: SupervisorInfo | None = None  # added by the endpoint
    health: HealthVerdict | None = None  # added by the endpoint: /health's answer now
    gpus_now: list[GpuNow] = msgspec.field(default_factory=list)  # added by the endpoint
    # Several models: every model (the fields above describe the first) and the evictions
    # made to load another model.
    models: list[ModelRow] = msgspec.field(default_factory=list)
    swaps: int = 0


def decode_status(raw: bytes) -> Status:
    """The /status body; msgspec.DecodeError (a ValueError) when it is not one."""
    return msgspec.json.decode(raw, type=Status)
