"""The /status document as msgspec structs: encoded by the endpoint, decoded by `vram-llm status`.

One description of the shape, so the server and the command cannot drift apart. Every field
has a default so that an older or partial document still decodes (the command renders what
is there). Optional per-worker readings are omitted, not null, when unknown.
"""

from __future__ import annotations

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
    # The batch loop: drafts from the context (tokens drafted, accepted) and its steps (how
    # many; seconds in whole steps and inside llama_decode alone).
    draft_tokens: int | None = None
    draft_tokens_accepted: int | None = None
    draft_acceptance: dict[str, float] | None = None  # by least match length (worker/engine/drafts.py)
    steps: int | None = None
    step_seconds: float | None = None
    decode_seconds: float | None = None
    # From the OS (absent when the process cannot be read).
    rss_mib: float | None = None
    cpu_percent: float | None = None


class PlanEstimate(_S):
    """What the planner estimated one GPU holds (MiB)."""

    weights_mib: int = 0
    kv_mib: int = 0
    compute_mib: int = 0
    fixed_mib: int = 0
    total_mib: int = 0


class PlanGpu(_S):
    """One inventory GPU in the plan (planner.GpuPlan)."""

    index: int
    uuid: str
    name: str = ""
    pci_bus_id: str = ""
    total_mib: int = 0
    free_mib: int = 0
    reserve_mib: int = 0
    usable_mib: int = 0
    planned_mib: int = 0
    layers: int = 0  # repeating layers on this GPU
    has_output: bool = False
    share: float = 0.0  # its entry in tensor_split
    cuda_index: int | None = None  # None: not visible to the worker
    excluded_reason: str | None = None
    estimate: PlanEstimate = msgspec.field(default_factory=PlanEstimate)
    endpoint: str | None = None  # a remote device's rpc-server; None: a local GPU
    first_layer: int | None = None  # the layers placed here (n_layers: the output layer)
    last_layer: int | None = None

    @property
    def used(self) -> bool:
        """The worker sees it and the plan puts something there."""
        return self.cuda_index is not None and not self.excluded_reason and self.planned_mib > 0


class PlanModel(_S):
    """The model as the plan saw it (planner.ModelSummary)."""

    path: str = ""
    name: str = ""
    architecture: str = ""
    file_mib: int = 0
    n_layers: int = 0
    n_ctx_train: int = 0
    n_embd: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    vocab_size: int = 0
    tied_embeddings: bool = False
    chat_template: bool = False
    kv_mib_per_layer: float = 0.0


class PlanView(_S):
    """The plan of the running worker (planner.Plan, as /status shows it)."""

    env: dict[str, str] = msgspec.field(default_factory=dict)  # set in the worker's environment
    tensor_split: list[float] = msgspec.field(default_factory=list)
    n_gpu_layers: int = 0  # -1: every layer and the output layer
    offloaded_layers: int = 0
    output_on_gpu: bool = False
    split_mode: str = "layer"
    main_gpu: int = 0
    n_ctx: int = 0
    n_batch: int = 0
    flash_attn: bool = False
    cpu_only: bool = False
    source: str = ""
    gpus: list[PlanGpu] = msgspec.field(default_factory=list)  # every inventory GPU, in plan order
    model: PlanModel | None = None
    host_weights_mib: int = 0
    notes: list[str] = msgspec.field(default_factory=list)
    rpc_devices: list[str] = msgspec.field(default_factory=list)  # remote devices, first in the worker's list

    def planned_mib(self) -> dict[str, int]:
        """GPU UUID -> MiB the plan puts there, for the GPUs it uses."""
        return {g.uuid: g.planned_mib for g in self.gpus if g.used}


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


class ReplicaRow(_S):
    """One replica of a model that has several (``replicas`` other than 1)."""

    replica: int  # 1: the model's first replica (its manager), 2, 3...: extra ones
    state: str
    reason: str = ""
    pid: int | None = None
    planned_mib: dict[str, int] = msgspec.field(default_factory=dict)  # GPU UUID -> MiB of its plan
    slots: int = 0  # generation slots of its worker (0 while not ready)
    generating: int = 0  # requests holding one
    waiting: int = 0  # requests waiting for it
    served: int = 0  # requests it answered
    restarts: int = 0
    cache_hits: int | None = None  # its worker's prompt reuse (last /health)
    cache_tokens_reused: int | None = None


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
    disk_cache: DiskCache | None = None  # its prompt cache's disk tier, while it has a worker
    replicas: list[ReplicaRow] = msgspec.field(default_factory=list)  # with several replicas


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
    plan: PlanView | None = None  # the plan of the running worker
    oom_adjustment: str | None = None
    requests: RequestCounts = msgspec.field(default_factory=RequestCounts)
    supervisor: SupervisorInfo | None = None  # added by the endpoint
    health: HealthVerdict | None = None  # added by the endpoint: /health's answer now
    gpus_now: list[GpuNow] = msgspec.field(default_factory=list)  # added by the endpoint
    # Several models: every model (the fields above describe the first) and the evictions
    # made to load another model.
    models: list[ModelRow] = msgspec.field(default_factory=list)
    swaps: int = 0
    # The first model's replicas, when it has several (each model's are in its row too).
    replicas: list[ReplicaRow] = msgspec.field(default_factory=list)


def decode_status(raw: bytes) -> Status:
    """The /status body; msgspec.DecodeError (a ValueError) when it is not one."""
    return msgspec.json.decode(raw, type=Status)
