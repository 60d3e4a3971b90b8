"""``vram-llm``: argparse -> Config -> plan / serve / status.

Rules for this module:
- The flags are declared ONCE, in ``FLAGS``: each maps to a dotted key of the Config
  schema (supervisor/config.py) and is decoded through that schema, so a flag and its
  config key cannot disagree about types or allowed values.
- This is the only module that configures logging (``configure_logging``).
- Errors a user can fix are one line on stderr, ``vram-llm: error: ...``, exit status 2;
  never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from supervisor.config import Config, ConfigError, key_choices, key_default
from supervisor.config import load_config as load_config_file
from supervisor.gpus import GpuProbeError
from supervisor.model import ModelError
from supervisor.planning import make_plan  # noqa: F401 - tests plan through the CLI's import

PROG = "vram-llm"
EXIT_USAGE = 2


def _devices(value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip() != ""]
    except ValueError:
        out = []
    if not out or any(d < 0 for d in out):
        raise ConfigError(f"--devices: expected comma-separated NVML GPU indices like 0,2, got {value!r}")
    return out


def _command(value: str) -> list[str]:
    try:
        argv = shlex.split(value)
    except ValueError as e:
        raise ConfigError(f"--worker-command: {e}") from None
    if not argv:
        raise ConfigError("--worker-command must not be empty")
    return argv


def _hosts(values: list[str]) -> str | list[str]:
    """--host, repeated and/or comma-separated (llama-server's form): one address stays a
    string, several are server.host's list (checked by the schema, naming the entry)."""
    hosts = [h.strip() for v in values for h in v.split(",")]
    return hosts[0] if len(hosts) == 1 else hosts


def _replicas(value: str) -> int | str:
    """--replicas: a number, or "auto" (the schema checks both)."""
    return int(value) if value.strip().isdigit() else value.strip()


def _origins(value: str) -> list[str]:
    """--cors-origins: a comma list of origins, or "*"."""
    return [o.strip() for o in value.split(",") if o.strip()]


@dataclass(frozen=True)
class Flag:
    name: str
    key: str  # dotted Config path
    help: str  # "{default}" is replaced by the schema's default
    metavar: str | None = None
    # str (a repeated flag: the list of them) -> value before schema decoding
    convert: Callable[[Any], Any] | None = None
    const: bool | None = None  # a switch: sets the key to this value
    repeat: bool = False  # may be given several times: the key gets the list of values

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The schema's allowed values when the key is a Literal (declared there, once)."""
        return key_choices(self.key)

    @property
    def help_text(self) -> str:
        return self.help.replace("{default}", str(key_default(self.key)))


FLAGS: tuple[Flag, ...] = (
    Flag("--model", "model.path", "GGUF model file (default: the embedded SmolLM2-135M-Instruct); repeat it, "
         "as PATH or ID=PATH, to serve several models", "[ID=]PATH", repeat=True),
    Flag("--models-dir", "models_dir", "serve every .gguf file in this directory (id = file stem)", "DIR"),
    Flag("--host", "server.host", "address to listen on (default {default}); several: a comma list "
         "(127.0.0.1,::1) or the flag repeated", "HOST", _hosts, repeat=True),
    Flag("--port", "server.port", "port to listen on (default {default})", "PORT", int),
    Flag("--reserve-mib", "gpu.reserve_mib", "VRAM left free on every GPU (default {default})", "MIB", int),
    Flag("--device-order", "gpu.device_order", "order of GPUs in the split (default {default})"),
    Flag("--split-mode", "gpu.split_mode", "llama.cpp split mode (default {default})"),
    Flag("--no-set-cuda-visible-devices", "gpu.set_cuda_visible_devices",
         "keep the inherited CUDA_VISIBLE_DEVICES; the split follows its order", const=False),
    Flag("--devices", "gpu.devices", "only these NVML GPU indices, e.g. 0,2", "LIST", _devices),
    Flag("--use-fit-params", "gpu.use_fit_params", "take the layer split from llama.cpp's llama-fit-params",
         const=True),
    Flag("--ctx-size", "model.ctx_size", "context size in tokens (default {default})", "N", int),
    Flag("--parallel", "model.parallel", "requests generated at once, sharing the context (default {default})",
         "N", int),
    Flag("--placement", "model.placement", "GPUs a model gets: spread over every usable one, or pack on "
         "the fewest that hold it (default {default})"),
    Flag("--replicas", "model.replicas", "workers of the model, each on GPUs of its own, or auto: one per "
         "GPU it fits on that no other model needs (default {default})", "N|auto", _replicas),
    Flag("--chat-template", "model.chat_template", "chat template instead of the GGUF's: a Jinja file or "
         "a llama.cpp built-in name (chatml, llama3, ...)", "FILE|NAME"),
    Flag("--token-gap-ms", "model.token_gap_ms", "running streams' inter-token gap kept while new prompts "
         "are read (default {default})", "MS", int),
    Flag("--flash-attn", "model.flash_attn", "flash attention: on, off, or auto (llama.cpp decides per "
         "device; default {default})"),
    Flag("--draft-max", "model.draft_max", "tokens drafted from the context per step, 0: none "
         "(default {default})", "N", int),
    Flag("--simulate-gpus", "gpu.simulate_gpus", "plan for the GPUs listed in this JSON file", "FILE"),
    Flag("--rpc", "rpc", "a llama.cpp rpc-server whose devices may hold layers the local GPUs cannot "
         "(repeatable; no authentication: private networks only)", "HOST:PORT",
         lambda values: [{"endpoint": v} for v in values], repeat=True),
    Flag("--worker-command", "worker.command", "worker command line, shell-quoted (tests)", "CMD", _command),
    Flag("--cors-origins", "server.cors_origins", "browser origins allowed to call the API (CORS), a comma "
         "list of scheme://host[:port], or * for any (default: none, no CORS headers)", "ORIGINS", _origins),
    Flag("--api-key", "server.api_keys", "an admin API key clients must send (repeatable; prefer "
         "server.api_keys_file, which `ps` does not show)", "KEY", repeat=True),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other usage error of ours (argparse prints usage too).
        sys.stderr.write(f"{PROG}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="config.toml (see config.example.toml)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="text lines, or one JSON object per line (time, level, logger, message, request fields)")
    for f in FLAGS:
        dest = f.key.replace(".", "__")
        if f.const is not None:
            p.add_argument(f.name, dest=dest, action="store_const", const=f.const, default=None, help=f.help_text)
        elif f.repeat:
            p.add_argument(f.name, dest=dest, metavar=f.metavar, action="append", default=None, help=f.help_text)
        else:
            p.add_argument(f.name, dest=dest, metavar=f.metavar, choices=f.choices, default=None, help=f.help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Serve a GGUF model with llama.cpp, split across GPUs by free VRAM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("plan", help="show where the model's layers would go, then exit")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_cmd_plan)
    s = sub.add_parser("serve", help="run the supervisor and serve the OpenAI API")
    _add_common(s)
    s.set_defaults(handler=_cmd_serve)
    st = sub.add_parser("status", help="ask a running vram-llm for its state")
    _add_common(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(handler=_cmd_status)
    for action, text in (("load", "load a model now (several models)"), ("unload", "unload a model now")):
        lp = sub.add_parser(action, help=text)
        _add_common(lp)
        lp.add_argument("id", help="the model's id (as in /v1/models)")
        lp.set_defaults(handler=_cmd_load if action == "load" else _cmd_unload)
    return parser


_ID_EQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._:@+-]*)=(.+)$")


def model_flags(values: list[str]) -> tuple[str, Any]:
    """--model given once as a plain PATH is today's model.path; given several times, or as
    ID=PATH, it is the [[models]] list (replacing the file's)."""
    if len(values) == 1 and not _ID_EQ.match(values[0]):
        return "model.path", values[0]
    entries: list[dict[str, str]] = []
    for v in values:
        m = _ID_EQ.match(v)
        path = m.group(2) if m else v
        entries.append({"id": m.group(1) if m else Path(v).stem, "path": path})
    return "models", entries


def load_config(args: argparse.Namespace) -> Config:
    """The config file (if any) with the given flags on top; ConfigError if wrong."""
    overrides: dict[str, Any] = {}
    for f in FLAGS:
        value = getattr(args, f.key.replace(".", "__"), None)
        if value is None:
            continue
        if f.convert is not None and f.const is None:
            try:
                value = f.convert(value)
            except ValueError:
                raise ConfigError(f"{f.name}: expected a number, got {value!r}") from None
        overrides[f.key] = value
    if "model.path" in overrides:
        key, value = model_flags(overrides.pop("model.path"))
        overrides[key] = value
    try:
        return load_config_file(args.config, overrides)
    except ConfigError as e:
        # Name the flag the user typed, not the config key behind it.
        msg = str(e)
        for f in FLAGS:
            if msg.startswith(f"flag: {f.key}:"):
                raise ConfigError(f"{f.name}{msg[len('flag: ' + f.key):]}") from None
            if msg.startswith(f"flag: {f.key}"):  # an entry of a list ("server.host[1] ...")
                raise ConfigError(f"{f.name}: {msg[len('flag: '):]}") from None
        raise


def configure_logging(level: str | int = "INFO", fmt: str = "text", environ: Mapping[str, str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from supervisor.access_log import JsonFormatter

        handler.setFormatter(JsonFormatter())
    elif (os.environ if environ is None else environ).get("JOURNAL_STREAM"):
        # Under systemd, stderr goes to the journal, which stamps every line itself.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


# --- subcommands ----------------------------------------------------------------------------


def _cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    from supervisor.plan_report import fleet_json, plan_json, render_fleet, render_plan
    from supervisor.planning import place_fleet

    # Every configured model, placed as the fleet places them (one model: a fleet of one).
    placements = place_fleet(cfg)
    if len(placements) == 1 and placements[0].plan is not None:
        p = placements[0].plan
        sys.stdout.write(plan_json(p) + "\n" if args.json else render_plan(p))
    else:
        sys.stdout.write(fleet_json(placements) + "\n" if args.json else render_fleet(placements))
    return 0


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """The one place that chooses the event loop: uvloop where available."""
    try:
        import uvloop
    except ImportError:  # not on this platform: the default loop works too
        return asyncio.run(main)
    return uvloop.run(main)


def _cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    from supervisor import app  # lazy: plan must not need the serving stack

    return run_loop(app.serve(cfg, reload_config=lambda: load_config(args)))


def _cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    from supervisor import status_cli

    return int(status_cli.run(cfg, args))


def _cmd_load(cfg: Config, args: argparse.Namespace) -> int:
    from supervisor import status_cli

    return status_cli.model_command(cfg, args, "load")


def _cmd_unload(cfg: Config, args: argparse.Namespace) -> int:
    from supervisor import status_cli

    return status_cli.model_command(cfg, args, "unload")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args)
        return int(args.handler(cfg, args))
    except (ConfigError, ModelError, GpuProbeError) as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `vram-llm plan | head`: the reader went away; not an error worth a traceback.
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
