"""Serving metrics: what an operator graphs (tokens, latencies, queue, memory).

Rules of this module:
- Per-request series are fed once per ended request by the access log middleware
  (``ServingMetrics.observe``); nothing on the per-chunk relay path touches them.
- Point-in-time gauges (worker lifecycle, queue, busy slots, worker RSS and GPU memory)
  are read at scrape time from what each model's manager already knows and from the
  cached inventory read that /status uses (``refresh`` before each scrape: NVML's
  inventory is not asked more than once a second).
- Names follow Prometheus conventions: ``vram_llm_`` prefix, base units (seconds, bytes),
  ``_total`` on counters (the client library adds it). The README maps each series to the
  llama-server metric it corresponds to.
- Every series carries a ``model`` label, with one sample set per model of the fleet (one
  model: its alias or file stem, as its answers name it; several: the model ids). The
  exceptions are the per-GPU memory series: a GPU is shared by models, so they are labelled
  by GPU; ``vram_llm_worker_gpu_memory_bytes{model,gpu,uuid}`` says who holds what.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from supervisor.access_log import Finished
from supervisor.fleet import Fleet
from supervisor.gpus import GpuProbeError
from supervisor.nvml import process_gpu_memory
from supervisor.routes import path_group
from supervisor.spawn import worker_pids_of
from supervisor.states import WorkerState
from supervisor.status import GpuNow
from supervisor.status_view import worker_status
from supervisor.worker_process import WorkerManager
from worker.protocol import Health

# Latency buckets from 10 ms (a cached short prompt) to 5 minutes (a long generation).
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Inter-token gaps: 1 ms (a small model on a GPU) to 1 s (a large one on CPUs).
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
_MIB = 2**20

log = logging.getLogger("vram_llm.metrics")


class ServingMetrics(Collector):
    def __init__(self, registry: CollectorRegistry, fleet: Fleet) -> None:
        self._fleet = fleet  # every model with a manager, one or several (SIGHUP changes the list)
        self._gpus: list[GpuNow] = []
        self._worker_gpus: dict[str, dict[str, int]] = {}  # model -> GPU UUID -> MiB (NVML)
        self.prompt_tokens = Counter(
            "vram_llm_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry
        )
        self.completion_tokens = Counter(
            "vram_llm_completion_tokens", "Completion tokens generated", ["model"], registry=registry
        )
        self.requests = Counter(
            "vram_llm_http_requests", "HTTP requests answered, by path group and status code",
            ["model", "path", "code"], registry=registry,
        )
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=registry)

        self.duration = hist("vram_llm_request_duration_seconds",
                             "Time from arrival to the end of the answer (API requests)", _LATENCY)
        self.ttft = hist("vram_llm_time_to_first_token_seconds",
                         "Time from arrival to the first generated token (streamed answers)", _LATENCY)
        self.itl = hist("vram_llm_inter_token_latency_seconds",
                        "Mean gap between generated tokens, one sample per streamed answer", _ITL)
        self.queue_wait = hist("vram_llm_queue_wait_seconds", "Time a request waited for a ready worker", _LATENCY)
        # llamacpp:prompt_tokens_total and llamacpp:tokens_predicted_total (model -> count)
        self._tokens: dict[str, list[int]] = {}
        self._counted: dict[tuple[str, str, str], Any] = {}  # label children: see observe
        self._timed: dict[str, Any] = {}
        registry.register(self)

    def _replicas_of(self, model: str, mgr: WorkerManager) -> list[WorkerManager]:
        """Every replica of a configured model; a removed one still draining is its manager."""
        return self._fleet.replicas(model) if model in self._fleet.ids else [mgr]

    def _pairs(self) -> list[tuple[str, WorkerManager]]:
        """(model label, manager) of every model; the first answers requests without "model"."""
        fleet = self._fleet
        return [(m, fleet.managers[m]) for m in fleet.all_ids]

    def observe(self, done: Finished) -> None:
        """One ended request (called by the access log middleware)."""
        rec = done.record
        # A fixed set of path labels (supervisor/routes.py): no client-chosen path is a label.
        group = path_group(done.path)
        # A CORS preflight (answered by the supervisor in microseconds) is counted, not timed.
        api = group in ("/v1", "native") and done.method != "OPTIONS"
        # Requests no model answers (/health, /metrics, an unknown id) count under the first.
        model = rec.model or self._pairs()[0][0]
        key = (model, group, str(done.status))
        # The label children, looked up once: labels() costs more than the increment, on
        # every request (no label set is ever removed, so a kept child stays the exported one).
        counter = self._counted.get(key)
        if counter is None:
            counter = self._counted[key] = self.requests.labels(*key)
        counter.inc()
        if not api:
            return
        if rec.prompt_tokens or rec.completion_tokens:
            tally = self._tokens.setdefault(model, [0, 0])
            tally[0] += rec.prompt_tokens or 0
            tally[1] += rec.completion_tokens or 0
        if rec.prompt_tokens:
            self.prompt_tokens.labels(model).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self.completion_tokens.labels(model).inc(rec.completion_tokens)
        timed = self._timed.get(model)
        if timed is None:
            timed = self._timed[model] = self.duration.labels(model)
        timed.observe(done.duration_s)
        if rec.queue_wait_s is not None:
            self.queue_wait.labels(model).observe(rec.queue_wait_s)
        if rec.ttft_s is not None:
            self.ttft.labels(model).observe(rec.ttft_s)
        if rec.inter_token_s is not None:
            self.itl.labels(model).observe(rec.inter_token_s)

    async def refresh(self) -> None:
        """Before a scrape: the GPU rows (the cached read /status uses) and what each model's
        worker processes hold on each GPU."""
        pairs = self._pairs()
        pids = {m: worker_pids_of(h[0]) for m, mgr in pairs if (h := mgr.last_health()) is not None}
        first = pairs[0][0]
        try:
            self._gpus = await self._fleet.preparers[first].gpus_now(pids.get(first, []))
        except GpuProbeError as e:
            # The rest of the scrape is still worth having; the GPU series go missing,
            # which an alert on absent() sees.
            log.warning("metrics: cannot read the GPU inventory: %s", e)
            self._gpus = []
        # The first model's reading came with the rows; the others' are read here.
        held = {first: {g.uuid: g.worker_mib for g in self._gpus if g.worker_mib}}
        others = {m: p for m, p in pids.items() if m != first}
        if others:
            held.update(await asyncio.to_thread(lambda: {m: process_gpu_memory(p) for m, p in others.items()}))
        self._worker_gpus = held

    def collect(self) -> Iterator[Any]:
        models = self._pairs()
        yield from _lifecycle(models, {m: self._fleet.replicas(m) for m in self._fleet.ids})
        yield from _scheduler(models, self._tokens)
        waiting = GaugeMetricFamily("vram_llm_queue_depth", "Requests waiting for a ready worker or a slot",
                                    labels=["model", "where"])
        busy = GaugeMetricFamily("vram_llm_slots_busy", "Generation slots in use (worker /health active)",
                                 labels=["model"])
        rss = GaugeMetricFamily("vram_llm_worker_resident_memory_bytes", "Worker process RSS", labels=["model"])
        now = asyncio.get_running_loop().time()
        for model, mgr in models:
            # The worker as /status shows it (status_view): its last /health and the OS's reading.
            w = worker_status(mgr.view, now)
            waiting.add_metric([model, "supervisor"], sum(r.admission.waiting for r in self._replicas_of(model, mgr)))
            waiting.add_metric([model, "worker"], (w.queued if w else None) or 0)
            busy.add_metric([model], (w.active if w else None) or 0)
            if w is not None and w.rss_mib is not None:
                rss.add_metric([model], w.rss_mib * _MIB)
        yield waiting
        yield busy
        yield rss
        yield from _replicas(self._fleet)
        index = {g.uuid: str(g.index) for g in self._gpus}
        held = GaugeMetricFamily("vram_llm_worker_gpu_memory_bytes",
                                 "GPU memory the model's worker processes use (NVML)", labels=["model", "gpu", "uuid"])
        for model, _ in models:
            for uuid, mib in sorted(self._worker_gpus.get(model, {}).items()):
                held.add_metric([model, index.get(uuid, ""), uuid], mib * _MIB)
        yield held
        used = GaugeMetricFamily("vram_llm_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu", "uuid"])
        free = GaugeMetricFamily("vram_llm_gpu_memory_free_bytes", "GPU memory free (NVML)", labels=["gpu", "uuid"])
        for g in self._gpus:
            labels = [str(g.index), g.uuid]
            used.add_metric(labels, g.used_mib * _MIB)
            free.add_metric(labels, g.free_mib * _MIB)
        yield used
        yield free


def _replicas(fleet: Fleet) -> Iterator[Any]:
    """Every model's replicas: how many, and per replica (1: the first) up, slots, served."""
    count = GaugeMetricFamily("vram_llm_replicas", "Workers of the model (its replicas setting)", labels=["model"])
    up = GaugeMetricFamily("vram_llm_replica_up", "1 while the replica's worker is ready", labels=["model", "replica"])
    busy = GaugeMetricFamily("vram_llm_replica_slots_busy", "Requests holding a generation slot of the replica",
                             labels=["model", "replica"])
    served = CounterMetricFamily("vram_llm_replica_requests_served", "Requests the replica answered",
                                 labels=["model", "replica"])
    for mid in fleet.ids:
        reps = fleet.replicas(mid)
        count.add_metric([mid], len(reps))
        for n, mgr in enumerate(reps, 1):
            labels = [mid, str(n)]
            up.add_metric(labels, 1 if mgr.view.state is WorkerState.READY else 0)
            busy.add_metric(labels, mgr.admission.generating)
            served.add_metric(labels, mgr.admission.served)
    yield from (count, up, busy, served)


# The worker's prompt caches, from its last /health (counters restart with the worker).
_CACHES = (
    ("prompt_cache_hits", "Requests that reused a slot's cached prompt", "cache_hits", CounterMetricFamily),
    ("prompt_cache_tokens_reused", "Prompt tokens reused from slots", "cache_tokens_reused", CounterMetricFamily),
    ("ram_cache_entries", "KV snapshots in the host-RAM cache", "ram_cache_entries", GaugeMetricFamily),
    ("ram_cache_bytes", "Bytes of KV snapshots in the host-RAM cache", "ram_cache_bytes", GaugeMetricFamily),
    ("ram_cache_hits", "Requests restored from the host-RAM cache", "ram_cache_hits", CounterMetricFamily),
    ("ram_cache_tokens_saved", "Prompt tokens restored from RAM", "ram_cache_tokens_saved", CounterMetricFamily),
    ("kv_cache_tokens", "Tokens held in the slots' KV cache (running and cached prompts)", "kv_tokens",
     GaugeMetricFamily),
    ("disk_cache_entries", "KV states in the prompt cache's disk tier", "disk_cache_entries", GaugeMetricFamily),
    ("disk_cache_bytes", "Bytes of KV states on disk", "disk_cache_bytes", GaugeMetricFamily),
    ("disk_cache_hits", "Requests restored from disk", "disk_cache_hits", CounterMetricFamily),
    ("disk_cache_tokens_saved", "Prompt tokens restored from disk", "disk_cache_tokens_saved", CounterMetricFamily),
    ("disk_cache_errors", "Damaged disk states dropped and failed writes", "disk_cache_errors", CounterMetricFamily),
    # The batch loop (worker/engine/batch.py): drafts from the context and the steps.
    ("draft_tokens", "Tokens drafted from the context", "draft_tokens", CounterMetricFamily),
    ("draft_tokens_accepted", "Drafted tokens the model confirmed", "draft_tokens_accepted", CounterMetricFamily),
    ("batch_steps", "Batch steps (one llama_decode each)", "steps", CounterMetricFamily),
    ("batch_step_seconds", "Seconds in batch steps (building, decoding, sampling)", "step_seconds",
     CounterMetricFamily),
    ("batch_decode_seconds", "Seconds inside llama_decode", "decode_seconds", CounterMetricFamily),
)


def _lifecycle(models: list[tuple[str, WorkerManager]], replicas: dict[str, list[WorkerManager]]) -> Iterator[Any]:
    """Each model's worker lifecycle: state, requests, restarts, backoff, prompt caches. The
    request counts are the model's, every replica's together; the rest is its first's."""
    state = GaugeMetricFamily("vram_llm_worker_state", "Worker state (1 for the current one)",
                              labels=["model", "state"])
    in_flight = GaugeMetricFamily("vram_llm_requests_in_flight", "Requests being proxied", labels=["model"])
    waiting = GaugeMetricFamily("vram_llm_requests_waiting", "Requests waiting for a ready worker", labels=["model"])
    served = CounterMetricFamily("vram_llm_requests_served", "Requests answered by the worker", labels=["model"])
    restarts = CounterMetricFamily("vram_llm_worker_restarts", "Worker failures that led to a restart",
                                   labels=["model", "kind"])
    streak = GaugeMetricFamily(
        "vram_llm_worker_failure_streak",
        "Worker failures in the current streak (within restart.failure_window_s, since a stable run)",
        labels=["model"],
    )
    crash_loop = GaugeMetricFamily(
        "vram_llm_worker_crash_loop",
        "1 while waiting out restart.backoff_max_s because more than restart.max_failures failed",
        labels=["model"],
    )
    next_attempt = GaugeMetricFamily(
        "vram_llm_worker_next_attempt_seconds",
        "Seconds until the next worker start attempt (0 when none is scheduled)",
        labels=["model"],
    )
    caches = [(family(f"vram_llm_{name}", doc, labels=["model"]), field) for name, doc, field, family in _CACHES]
    kv_ratio = GaugeMetricFamily("vram_llm_kv_cache_usage_ratio",
                                 "Share of the KV cache's cells in use (0..1)", labels=["model"])
    for model, mgr in models:
        for s in WorkerState:
            state.add_metric([model, s.value], 1.0 if mgr.state is s else 0.0)
        counts = [r.counters for r in replicas.get(model, [mgr])]
        in_flight.add_metric([model], sum(c.in_flight for c in counts))
        waiting.add_metric([model], sum(c.waiting for c in counts))
        served.add_metric([model], sum(c.served for c in counts))
        for kind, n in sorted(mgr.counters.restarts_by_kind.items()):
            restarts.add_metric([model, kind], n)
        streak.add_metric([model], mgr.failure_streak())
        crash_loop.add_metric([model], 1.0 if mgr.crash_loop else 0.0)
        next_attempt.add_metric([model], mgr.next_attempt_in_s() or 0.0)
        last = mgr.last_health()
        if last is not None:
            for fam, field in caches:
                fam.add_metric([model], getattr(last[1], field))
            if last[1].kv_capacity:
                kv_ratio.add_metric([model], last[1].kv_tokens / last[1].kv_capacity)
    yield from (state, in_flight, waiting, served, restarts, streak, crash_loop, next_attempt)
    yield from (fam for fam, _ in caches)
    yield kv_ratio


# --- the names schedulers read -------------------------------------------------------------
# The Gateway API Inference Extension's endpoint picker reads vLLM's names by default and
# dashboards written for llama-server read llama-server's: both sets are exported next to
# ours, always (a handful of samples per model; nothing to configure in the picker), with
# vLLM's ``model_name`` label. README "Metrics" maps them to our own series.


class Load(NamedTuple):
    """What a scheduler should see of one model now."""

    running: int  # requests holding a generation slot
    waiting: int  # requests waiting for a slot or for the model to be ready
    kv_active: float  # KV cells of running requests / all KV cells (0..1)
    kv_used: float  # KV cells holding anything, idle slots' cached prompts included (0..1)
    kv_tokens: int
    kv_capacity: int  # 0: no ready worker


def load_of(state: WorkerState, generating: int, waiting: int, health: Health | None) -> Load:
    """PURE. A model without a ready worker (unloaded, loading, backing off, failed,
    stopping) reports no KV at all, whatever its last worker said before it went: the
    picker must not avoid a fresh worker because of a dead one's cache. Requests waiting
    for it count as waiting, and requests a reload's old worker still answers as running."""
    if state is not WorkerState.READY or health is None or health.kv_capacity <= 0:
        return Load(generating, waiting, 0.0, 0.0, 0, 0)
    cap = health.kv_capacity
    return Load(generating, waiting, min(1.0, health.kv_tokens_active / cap), min(1.0, health.kv_tokens / cap),
                health.kv_tokens, cap)


def _scheduler(models: list[tuple[str, WorkerManager]], tokens: dict[str, list[int]]) -> Iterator[Any]:
    label = ["model_name"]
    v_wait = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be processed", labels=label)
    v_run = GaugeMetricFamily("vllm:num_requests_running", "Requests in model execution batches", labels=label)
    v_kv = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                             "KV-cache usage of running requests. 1 means 100 percent usage", labels=label)
    v_info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache (a block is one token cell)",
                               labels=[*label, "block_size", "num_gpu_blocks"])
    l_run = GaugeMetricFamily("llamacpp:requests_processing", "Number of requests processing.", labels=label)
    l_wait = GaugeMetricFamily("llamacpp:requests_deferred", "Number of requests deferred.", labels=label)
    l_ratio = GaugeMetricFamily("llamacpp:kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.",
                                labels=label)
    l_tokens = GaugeMetricFamily("llamacpp:kv_cache_tokens", "KV-cache tokens.", labels=label)
    l_prompt = CounterMetricFamily("llamacpp:prompt_tokens", "Number of prompt tokens processed.", labels=label)
    l_pred = CounterMetricFamily("llamacpp:tokens_predicted", "Number of generation tokens processed.", labels=label)
    # Drafts and steps from the worker's last /health, under llama-server's names.
    l_steps = CounterMetricFamily("llamacpp:n_decode", "Total number of llama_decode() calls", labels=label)
    l_drafted = CounterMetricFamily("llamacpp:spec_decode_num_draft_tokens", "Number of draft tokens", labels=label)
    l_accepted = CounterMetricFamily("llamacpp:spec_decode_num_accepted_tokens", "Number of accepted draft tokens",
                                     labels=label)
    for model, mgr in models:
        view = mgr.view
        ld = load_of(view.state, mgr.admission.generating, mgr.admission.waiting, view.last_health)
        for fam, value in ((v_wait, ld.waiting), (v_run, ld.running), (v_kv, ld.kv_active), (l_run, ld.running),
                           (l_wait, ld.waiting), (l_ratio, ld.kv_used), (l_tokens, ld.kv_tokens)):
            fam.add_metric([model], value)
        if ld.kv_capacity:
            v_info.add_metric([model, "1", str(ld.kv_capacity)], 1.0)
        prompt, predicted = tokens.get(model, (0, 0))
        l_prompt.add_metric([model], prompt)
        l_pred.add_metric([model], predicted)
        h = view.last_health
        l_steps.add_metric([model], h.steps if h else 0)
        l_drafted.add_metric([model], h.draft_tokens if h else 0)
        l_accepted.add_metric([model], h.draft_tokens_accepted if h else 0)
    yield from (v_wait, v_run, v_kv, v_info, l_run, l_wait, l_ratio, l_tokens, l_prompt, l_pred, l_steps, l_drafted,
                l_accepted)
