"""vram-llm's configuration: ONE typed schema, strict at the edge.

Rules for this module:
- ``Config`` below is the only description of the settings. The TOML file and the CLI
  flags (supervisor/cli.py maps each flag to a dotted path here) are both decoded through
  it, so they cannot drift apart.
- Unknown keys and bad values are ``ConfigError``s naming the key and what is allowed.
- Defaults here are the documented defaults; config.example.toml repeats them and a test
  decodes it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import sys
import tempfile
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from worker.protocol import FlashAttn, SplitMode, ToolsMode  # declared once, where the worker reads them

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Mib = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
DeviceOrder = Literal["free_desc", "pci"]


Placement = Literal["spread", "pack"]
Replicas = Annotated[int, msgspec.Meta(ge=1)] | Literal["auto"]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelSettings(_Section):
    """What every model has, declared once: the single ``[model]`` table and each ``[[models]]``
    entry share these keys, with these defaults (an entry's left-out keys take ``[model]``'s)."""

    ctx_size: PositiveInt = 4096
    n_batch: PositiveInt = 512
    threads: NonNegInt = 0  # 0: llama.cpp's default
    chat_format: str = ""  # empty: the chat template in the GGUF metadata
    # The chat template instead of the GGUF's: a Jinja file's path or a llama.cpp built-in
    # template name (chatml, llama3, ...); empty: the GGUF's. Used for chat, tool detection,
    # /apply-template and /props.
    chat_template: str = ""
    # llama.cpp's default, as llama-server's -fa: on where the backend supports it. true and
    # false are read as "on" and "off" (configs written before "auto").
    flash_attn: FlashAttn = "auto"
    parallel: PositiveInt = 4  # requests generated at once (slots, each with ctx_size KV cells)
    # Running streams' inter-token gap the scheduler keeps while it reads newcomers' prompts
    # (worker/engine/scheduler.py: from the measured cost of a step), and the least prompt
    # tokens a step takes beside them whatever the cost.
    token_gap_ms: PositiveInt = 1000
    prefill_chunk: PositiveInt = 16
    draft_max: NonNegInt = 8  # tokens drafted from the context per step (drafts.py); 0: none
    cache_ram_mib: NonNegInt = 1024  # host RAM for earlier prompts' KV snapshots; 0: none
    cache_disk_mib: NonNegInt = 4096  # disk for them under server.cache_dir (survives restarts); 0: none
    embeddings: bool = False  # also serve /v1/embeddings (a second, small context)
    pooling: Literal["", "mean", "cls", "last"] = ""  # embeddings pooling; empty: the GGUF's, else mean
    reranking: bool = False  # also serve /rerank (a reranker GGUF; a second, small context)
    tools: ToolsMode = "generic"  # a template without tool markup: the generic format, or 400
    # Which GPUs a model gets (supervisor/placement.py): "spread" every usable GPU, shares by
    # free VRAM; "pack" the fewest that hold it whole (weights, KV, compute, the reserve),
    # biggest free first. Replicas other than 1 are always packed.
    placement: Placement = "spread"
    # Workers of the model, each on GPUs of its own, requests routed to the least busy (and
    # to the one holding a conversation's prefix); "auto": as many packed copies as fit on
    # GPUs no other configured model needs, never evicting another model for one.
    replicas: Replicas = 1


class ModelSection(ModelSettings):
    """The single ``[model]`` table: one model, or the defaults of the ``[[models]]`` entries."""

    path: str = ""  # empty: the embedded default model (SmolLM2-135M-Instruct)
    alias: str = ""  # model id served on /v1/models; empty: the file stem


# Where a model may go when it does not fit on the GPUs even after every allowed eviction:
# "offload" keeps today's behaviour (the layers that do not fit stay in host RAM);
# "refuse" answers 503 naming what holds the memory.
WhenNoRoom = Literal["offload", "refuse"]
NonNegSeconds = Annotated[float, msgspec.Meta(ge=0)]
_MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$"


class ModelEntry(ModelSettings, kw_only=True):
    """One model of the ``[[models]]`` list (several models under one supervisor); the single
    ``[model]`` becomes one too (``resolved_models``), so everything downstream sees entries.

    Keys left out of an entry take the value given in the ``[model]`` section (defaults for
    every entry), else ``ModelSettings``' defaults.
    """

    id: Annotated[str, msgspec.Meta(pattern=_MODEL_ID)]  # the request's "model" field picks it
    path: str  # GGUF file; empty: the embedded default model
    pinned: bool = False  # never unloaded to make room for another model
    preload: bool = False  # loaded at start (and /health waits for it)
    ttl_s: NonNegSeconds = 0.0  # unloaded after this long idle; 0: never
    devices: list[NonNegInt] = msgspec.field(default_factory=list)  # NVML indices it may use; empty: all
    when_no_room: WhenNoRoom = "offload"


class ServerSection(_Section):
    # An address, or a list of them (each an IPv4 or IPv6 address or a host name); the first
    # is the one `vram-llm status` asks (listen_hosts).
    host: str | list[str] = "127.0.0.1"
    port: Port = 8080
    # Browser origins allowed to call the API (CORS): exact origins ("https://app.example",
    # scheme://host[:port]) or ["*"] for any (then without credentials); empty: no CORS headers.
    cors_origins: list[str] = msgspec.field(default_factory=list)
    api_keys: list[str] = msgspec.field(default_factory=list)  # admin keys (--api-key); see supervisor/auth.py
    api_keys_file: str = ""  # one "[NAME:]KEY [inference|admin]" per line; re-read on SIGHUP
    runtime_dir: str = ""  # empty: $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR, else the temp dir
    # The prompt cache's disk tier (model.cache_disk_mib); empty: $CACHE_DIRECTORY (systemd's
    # CacheDirectory=), else $XDG_CACHE_HOME/vram-llm, else ~/.cache/vram-llm; + /prompt-cache
    cache_dir: str = ""
    # Disk for every model's states together (each also within its own model.cache_disk_mib);
    # the least recently used state of any model goes first. 0: no shared budget.
    cache_disk_total_mib: NonNegInt = 0
    # Slow and idle clients (nginx's defaults): a connection that has not sent a complete
    # first request within header_timeout_s is closed; a request body with no data for
    # body_timeout_s gets 408; an idle keep-alive connection is closed after
    # keepalive_timeout_s.
    header_timeout_s: Seconds = 60.0
    body_timeout_s: Seconds = 60.0
    keepalive_timeout_s: Seconds = 75.0
    # Open client connections at most (lowered to fit the descriptor limit); at the cap
    # the longest idle one is closed to make room.
    max_connections: PositiveInt = 1024
    strict_params: bool = False  # unknown request fields: 400 instead of ignored
    # /metrics without a key when keys are configured (a scheduler's scrape: no secret there)
    metrics_open: bool = False
    # /v1/responses kept for previous_response_id and GET (per model, in the worker's memory).
    responses_store_size: NonNegInt = 1024
    responses_store_ttl_s: Seconds = 3600.0


class GpuSection(_Section):
    reserve_mib: Mib = 1024
    reserve_overrides: dict[str, Mib] = msgspec.field(default_factory=dict)  # UUID or NVML index
    device_order: DeviceOrder = "free_desc"
    split_mode: SplitMode = "layer"
    devices: list[NonNegInt] = msgspec.field(default_factory=list)  # NVML indices; empty: all
    set_cuda_visible_devices: bool = True
    use_fit_params: bool = False
    fit_params_command: str = "llama-fit-params"
    simulate_gpus: str = ""  # path of a simulated inventory (JSON)
    # Remote devices ([[rpc]]): each endpoint's memory is read before every plan, within this
    # many seconds (connect and answer together); one that does not answer is waited for up to
    # rpc_wait_s (0: left out at once, with the reason in the plan's notes).
    rpc_timeout_s: Seconds = 2.0
    rpc_wait_s: NonNegSeconds = 0.0


class RpcEndpoint(_Section):
    """A llama.cpp rpc-server on another host ([[rpc]]): its devices join the plan when the
    local GPUs cannot hold the model. The RPC protocol has no authentication: private networks only."""

    endpoint: str  # host:port
    max_mib: Mib = 0  # the most the plan puts on each of its devices; 0: what is free less the reserve


class WorkerSection(_Section):
    command: list[str] = msgspec.field(default_factory=list)  # empty: python -m worker
    load_stall_timeout_s: Seconds = 120.0
    health_interval_s: Seconds = 5.0
    health_timeout_s: Seconds = 5.0
    health_failures: PositiveInt = 3
    token_stall_timeout_s: Seconds = 120.0
    stop_timeout_s: Seconds = 10.0
    stderr_lines: PositiveInt = 200


class RestartSection(_Section):
    backoff_initial_s: Seconds = 1.0
    backoff_max_s: Seconds = 60.0
    stable_after_s: Seconds = 300.0
    max_failures: PositiveInt = 5
    failure_window_s: Seconds = 600.0
    # False: more than max_failures in the window is a crash loop, retried every backoff_max_s
    # for ever; True: it is FAILED until SIGHUP (for boxes where a person or an outer manager acts).
    give_up: bool = False
    oom_settle_timeout_s: Seconds = 30.0


class AdmissionSection(_Section):
    queue_size: NonNegInt = 64
    wait_timeout_s: Seconds = 120.0


class ShutdownSection(_Section):
    grace_s: Seconds = 30.0
    # SIGTERM: /health is 503 at once; new requests are still served this long (balancers
    # that only notice by their health checks), then answered 503 (retrying ones move on).
    drain_s: NonNegSeconds = 0.0


class Config(_Section):
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    gpu: GpuSection = msgspec.field(default_factory=GpuSection)
    worker: WorkerSection = msgspec.field(default_factory=WorkerSection)
    restart: RestartSection = msgspec.field(default_factory=RestartSection)
    admission: AdmissionSection = msgspec.field(default_factory=AdmissionSection)
    shutdown: ShutdownSection = msgspec.field(default_factory=ShutdownSection)
    # Several models: the [[models]] list (empty: the single [model] is the list of one) and
    # every .gguf of models_dir (id = file stem) after it.
    models: list[ModelEntry] = msgspec.field(default_factory=list)
    models_dir: str = ""
    rpc: list[RpcEndpoint] = msgspec.field(default_factory=list)


class ConfigError(Exception):
    """A config file or flag is wrong; the message is one line naming the key."""


# --- errors that name the key and what is allowed -----------------------------------------

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _element(t: Any) -> Any:
    """A list's element type (the entries of ``[[models]]``), else ``t``."""
    return typing.get_args(t)[0] if typing.get_origin(t) is list else t


def _struct_at(path: list[str]) -> type[msgspec.Struct] | None:
    """The Struct type found by walking field names from Config (through lists)."""
    t: Any = Config
    for name in path:
        hints = typing.get_type_hints(t, include_extras=True)
        if name not in hints:
            return None
        t = _element(hints[name])
        if not (isinstance(t, type) and issubclass(t, msgspec.Struct)):
            return None
    return t if isinstance(t, type) and issubclass(t, msgspec.Struct) else None


def _allowed_keys(section: type[msgspec.Struct]) -> list[str]:
    """A section's keys, its own first (``[model]``: path, alias, then the shared ones)."""
    out: list[str] = []
    for cls in section.__mro__:
        for name in vars(cls).get("__annotations__", {}):
            if name in section.__struct_fields__ and name not in out:
                out.append(name)
    return out


def _field_type(path: list[str]) -> Any:
    if not path:
        return None
    parent = _struct_at(path[:-1])
    if parent is None:
        return None
    return typing.get_type_hints(parent, include_extras=True).get(path[-1])


def key_choices(dotted: str) -> tuple[str, ...] | None:
    """The allowed values of a dotted Config key whose type is a Literal (the CLI's choices)."""
    t = _field_type(dotted.split("."))
    base = typing.get_args(t)[0] if typing.get_origin(t) is Annotated else t
    return tuple(str(a) for a in typing.get_args(base)) if typing.get_origin(base) is Literal else None


def key_default(dotted: str) -> Any:
    """The schema's default of a dotted Config key (the CLI's help text shows it)."""
    node: Any = Config()
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def _split_path(err: msgspec.ValidationError) -> tuple[str, list[str]]:
    """(the message, the dotted path's names) of a msgspec error; list indices dropped."""
    m = _AT.match(str(err))
    msg = m.group("msg") if m else str(err)
    raw_path = (m.group("path") or "") if m else ""
    return msg, [p for p in re.split(r"\.|\[[^\]]*\]", raw_path) if p]


def _error_key(err: msgspec.ValidationError) -> str:
    return ".".join(_split_path(err)[1])


def _entry_named(err: msgspec.ValidationError, data: dict[str, Any]) -> str:
    """For an error inside a ``[[models]]`` entry: which one (its number, and its id if any)."""
    m = re.search(r"`\$\.models\[(\d+)\]", str(err))
    if m is None:
        return ""
    i = int(m.group(1))
    entries = data.get("models")
    entry = entries[i] if isinstance(entries, list) and i < len(entries) else None
    mid = entry.get("id") if isinstance(entry, dict) else None
    return f"[[models]] entry {i + 1}" + (f" (id {mid!r})" if isinstance(mid, str) else "")


def _explain(err: msgspec.ValidationError, source: str, data: dict[str, Any] | None = None) -> ConfigError:
    msg, parts = _split_path(err)
    key = ".".join(parts)
    entry = _entry_named(err, data or {})
    unknown = re.match(r"Object contains unknown field `(.+)`", msg)
    if unknown:
        section = _struct_at(parts)
        where = entry or (f"[{key}]" if key else "top level")
        full = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        allowed = ", ".join(_allowed_keys(section)) if section else ""
        return ConfigError(f"{source}: unknown key '{full}' in {where}; allowed: {allowed}")
    if entry:
        key = f"{key} ({entry})"
    t = _field_type(parts)
    if t is not None:
        base = typing.get_args(t)[0] if typing.get_origin(t) is Annotated else t
        if typing.get_origin(base) is Literal:
            allowed = " | ".join(str(a) for a in typing.get_args(base))
            return ConfigError(f"{source}: {key}: {msg}; allowed: {allowed}")
    return ConfigError(f"{source}: {key or 'config'}: {msg}")


def _check(cfg: Config, source: str, flagged: set[str]) -> None:
    """Rules that span several keys (a Struct field cannot express them); ``flagged``: the
    keys set by flags (their errors say "flag", and the CLI names the flag)."""
    if cfg.restart.backoff_max_s < cfg.restart.backoff_initial_s:
        raise ConfigError(
            f"{source}: restart.backoff_max_s ({cfg.restart.backoff_max_s}) must be >= "
            f"restart.backoff_initial_s ({cfg.restart.backoff_initial_s})"
        )
    if len(set(cfg.gpu.devices)) != len(cfg.gpu.devices):
        raise ConfigError(f"{source}: gpu.devices lists an index twice: {cfg.gpu.devices}")
    for k in cfg.gpu.reserve_overrides:
        if not (k.isdigit() or k.startswith(("GPU-", "MIG-", "rpc:"))):
            raise ConfigError(
                f"{source}: gpu.reserve_overrides key {k!r}: expected a GPU UUID (GPU-...), "
                "an NVML index like \"0\" or a remote device like \"rpc:host:port/0\""
            )
    rpc_source = "flag" if "rpc" in flagged else source  # --rpc replaces the file's [[rpc]]
    for n, r in enumerate(cfg.rpc):
        host, sep, port = r.endpoint.partition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{rpc_source}: rpc[{n}].endpoint: {r.endpoint!r} is not host:port (e.g. 192.168.1.20:50052)")
    ends = [r.endpoint for r in cfg.rpc]
    if len(set(ends)) != len(ends):
        raise ConfigError(f"{rpc_source}: rpc: an endpoint is listed twice: {ends}")
    ids = [m.id for m in cfg.models]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{source}: models: id {', '.join(map(repr, dup))} is used twice")
    for m in cfg.models:
        if len(set(m.devices)) != len(m.devices):
            raise ConfigError(f"{source}: models ({m.id}): devices lists an index twice: {m.devices}")
    settings: list[tuple[str, ModelSettings]] = [("model", cfg.model), *((f"models ({m.id})", m) for m in cfg.models)]
    for where, ms in settings:
        if ms.parallel > ms.n_batch:
            raise ConfigError(
                f"{source}: {where}: parallel ({ms.parallel}) must be <= n_batch ({ms.n_batch}): "
                "every slot decodes one token per batch"
            )


# A host name (RFC 1123 labels); an address is checked by ipaddress.
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
# An origin as a browser sends it: scheme://host[:port], lower case, no path (RFC 6454).
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


def _unbracketed(host: str) -> str:
    """An IPv6 address may be written in brackets, as in a URL."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def listen_hosts(cfg: Config) -> list[str]:
    """The addresses to listen on, in order (server.host, one or a list)."""
    hosts = [cfg.server.host] if isinstance(cfg.server.host, str) else cfg.server.host
    return [_unbracketed(h) for h in hosts]


def base_url(host: str, port: int) -> str:
    """``http://host:port`` with an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _host_problems(host: str | list[str]) -> list[str]:
    hosts = [host] if isinstance(host, str) else host
    if not hosts:
        return ["server.host: give at least one address"]
    out: list[str] = []
    for i, h in enumerate(hosts):
        where = "server.host" if isinstance(host, str) else f"server.host[{i}]"
        bare = _unbracketed(h)
        if not bare:
            out.append(f"{where} must not be empty")
            continue
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            if ":" in bare or not _HOST_NAME.fullmatch(bare):
                out.append(
                    f"{where}: {h!r} is not an IP address or host name (one address per entry; "
                    "the port is server.port)"
                )
    if len(set(hosts)) != len(hosts):
        out.append(f"server.host lists an address twice: {hosts}")
    return out


def _origin_problems(origins: list[str]) -> list[str]:
    out: list[str] = []
    if "*" in origins and len(origins) > 1:
        out.append('server.cors_origins: "*" (any origin) stands alone: remove the other origins or the "*"')
    for i, o in enumerate(origins):
        where = f"server.cors_origins[{i}]"
        if o == "*":
            continue
        if o == "null":
            out.append(f"{where}: the origin 'null' (sandboxed pages, file://) cannot be allowed: any page can send it")
        elif not _ORIGIN.fullmatch(o):
            m = _ORIGIN.match(o.lower())
            hint = ""
            if m is not None:
                hint = " (no path, not even a trailing '/')" if m.end() < len(o) else " (in lower case, as browsers send it)"
            out.append(
                f"{where}: {o!r} is not an origin: expected scheme://host[:port] such as "
                f"'https://app.example' or 'http://localhost:3000'{hint}"
            )
    if len(set(origins)) != len(origins):
        out.append(f"server.cors_origins lists an origin twice: {origins}")
    return out


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections."""
    *sections, last = dotted.split(".")
    node = data
    for s in sections:
        child = node.setdefault(s, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: [{s}] must be a table, not a value")
        node = child
    node[last] = value


def build_config(
    data: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "config"
) -> Config:
    """Decode a config mapping (a parsed TOML file) with flag overrides on top."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    flagged: set[str] = set()
    for dotted, value in (overrides or {}).items():
        set_path(merged, dotted, value)
        flagged.add(dotted)
    _fill_model_entries(merged, flagged, source)
    _old_spellings(merged)
    try:
        cfg = msgspec.convert(merged, Config, strict=True)
    except msgspec.ValidationError as e:
        key = _error_key(e)
        # A bad value that came from a flag: say so, the file is not to blame.
        raise _explain(e, "flag" if key in flagged else source, merged) from None
    _check(cfg, source, flagged)
    for key, problems in (
        ("server.host", _host_problems(cfg.server.host)),
        ("server.cors_origins", _origin_problems(cfg.server.cors_origins)),
    ):
        if problems:  # the first; a value that came from a flag: say so
            raise ConfigError(f"{'flag' if key in flagged else source}: {problems[0]}")
    return cfg


def _fill_model_entries(merged: dict[str, Any], flagged: set[str], source: str) -> None:
    """[[models]] entries take what they leave out from [model]; a flagged model.path
    (a single --model PATH) replaces the file's list, as a flag overrides the file."""
    entries = merged.get("models")
    if not isinstance(entries, list) or not entries:
        return
    base = merged.get("model")
    base = base if isinstance(base, dict) else {}
    if (base.get("path") or base.get("alias")) and "models" not in flagged:
        if "model.path" in flagged:
            merged["models"] = []
            return
        raise ConfigError(
            f"{source}: [model] path/alias and [[models]] both name models; list every model in [[models]] "
            "([model] then only gives defaults for the entries)"
        )
    shared = ModelSettings.__struct_fields__
    defaults = {k: v for k, v in base.items() if k in shared}
    merged["models"] = [{**defaults, **e} if isinstance(e, dict) else e for e in entries]


def _old_spellings(merged: dict[str, Any]) -> None:
    """Values an older schema took, as the current one spells them: flash_attn true/false."""
    entries = merged.get("models")
    for section in [merged.get("model"), *(entries if isinstance(entries, list) else [])]:
        if isinstance(section, dict) and isinstance(section.get("flash_attn"), bool):
            section["flash_attn"] = "on" if section["flash_attn"] else "off"


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML file (None: defaults only), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            with open(p, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return build_config(data, overrides, source)


# --- resolved values (the few defaults that depend on the environment) -------------------


def _entry_from_section(m: ModelSection, id_: str, path: str) -> ModelEntry:
    return ModelEntry(id=id_, path=path, **{k: getattr(m, k) for k in ModelSettings.__struct_fields__})


def resolved_models(cfg: Config, default_path: typing.Callable[[], str] | None = None) -> list[ModelEntry]:
    """Every model this configuration serves, in order (the first answers requests without
    a "model" field). The single [model] is the list of one; its id is the alias or the file
    stem (``default_path`` names the embedded default model when path is empty)."""
    out = list(cfg.models)
    if cfg.models_dir:
        d = Path(cfg.models_dir)
        if not d.is_dir():
            raise ConfigError(f"models_dir: {d} is not a directory")
        for f in sorted(d.glob("*.gguf")):
            out.append(_entry_from_section(cfg.model, f.stem, str(f)))
    if not out:
        path = cfg.model.path
        stem = Path(path or (default_path() if default_path else "model")).stem
        out.append(_entry_from_section(cfg.model, cfg.model.alias or stem, path))
    ids = [m.id for m in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"models: id {', '.join(map(repr, dup))} is used twice (models_dir names them by file stem)")
    return out



def resolved_worker_command(cfg: Config) -> list[str]:
    return list(cfg.worker.command) or [sys.executable, "-m", "worker"]


def resolved_cache_dir(cfg: Config, environ: typing.Mapping[str, str] | None = None) -> Path:
    """Where the prompt cache's disk tier keeps its files (one directory per model)."""
    env = os.environ if environ is None else environ
    if cfg.server.cache_dir:
        return Path(cfg.server.cache_dir)
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0]) / "prompt-cache"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "vram-llm" / "prompt-cache"


def model_cache_dir(cfg: Config, model_id: str) -> Path:
    """A model's directory in the cache dir: its id made safe as a file name, plus a hash
    of the id (two ids never share one; a restart or a swap of the model finds its own)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in model_id)[:48]
    return resolved_cache_dir(cfg) / f"{safe}-{hashlib.sha1(model_id.encode()).hexdigest()[:8]}"


def resolved_runtime_dir(cfg: Config, environ: typing.Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    for candidate in (cfg.server.runtime_dir, env.get("RUNTIME_DIRECTORY", ""), env.get("XDG_RUNTIME_DIR", "")):
        if candidate:
            # systemd may pass several directories separated by ':'; the first is ours.
            return Path(candidate.split(":")[0])
    return Path(tempfile.gettempdir())
