"""The config schema: the example file is honest, errors name the key and what is allowed."""

from __future__ import annotations

import sys

from pathlib import Path

import msgspec
import pytest

from supervisor.config import (
    Config,
    ConfigError,
    build_config,
    tomllib,
    load_config,
    resolved_runtime_dir,
    resolved_worker_command,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_decodes_to_the_defaults() -> None:
    assert load_config(EXAMPLE) == Config()


def test_example_documents_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    schema = msgspec.to_builtins(Config())
    assert data.keys() == schema.keys()
    for section, keys in schema.items():
        assert data[section].keys() == keys.keys(), section


def test_no_file_means_defaults() -> None:
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[model]\nbogus = 1\n", ["unknown key 'model.bogus'", "allowed: path, alias, ctx_size"]),
        ("nonsense = 1\n", ["unknown key 'nonsense'", "allowed: model, server, gpu"]),
        ("[gpu]\ndevice_order = 'fast'\n", ["gpu.device_order", "allowed: free_desc | pci"]),
        ("[gpu]\nsplit_mode = 'cols'\n", ["gpu.split_mode", "allowed: layer | row | none"]),
        ("[server]\nport = 70000\n", ["server.port", "<= 65535"]),
        ("[server]\nport = 0\n", ["server.port", ">= 1"]),
        ("[gpu]\nreserve_mib = -1\n", ["gpu.reserve_mib", ">= 0"]),
        ("[worker]\nstop_timeout_s = 0\n", ["worker.stop_timeout_s", "> 0"]),
        ("[gpu]\nreserve_overrides = { x = 1 }\n", ["reserve_overrides key 'x'"]),
        ("[gpu]\nreserve_overrides = { \"0\" = -5 }\n", ["gpu.reserve_overrides", ">= 0"]),
        ("[gpu]\ndevices = [0, 0]\n", ["gpu.devices lists an index twice"]),
        ("[restart]\nbackoff_initial_s = 10.0\nbackoff_max_s = 5.0\n", ["backoff_max_s"]),
        ("[model]\nctx_size = 'big'\n", ["model.ctx_size", "Expected `int`"]),
        ("[model\n", ["not valid TOML"]),
    ],
)
def test_errors_name_the_key(tmp_path: Path, toml: str, needles: list[str]) -> None:
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[server]\nport = 9000\nhost = '0.0.0.0'\n[gpu]\nreserve_overrides = { \"1\" = 10 }\n")
    cfg = load_config(p, {"server.port": 9100, "gpu.devices": [1, 2]})
    assert (cfg.server.port, cfg.server.host, cfg.gpu.devices) == (9100, "0.0.0.0", [1, 2])
    assert cfg.gpu.reserve_overrides == {"1": 10}


def test_bad_override_blames_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^flag: server.port"):
        build_config({}, {"server.port": 0})


def test_resolved_defaults(tmp_path: Path) -> None:
    cfg = Config()
    assert resolved_worker_command(cfg) == [sys.executable, "-m", "worker"]
    assert resolved_runtime_dir(cfg, {"RUNTIME_DIRECTORY": "/run/a:/run/b", "XDG_RUNTIME_DIR": "/x"}) == Path("/run/a")
    assert resolved_runtime_dir(cfg, {"XDG_RUNTIME_DIR": "/x"}) == Path("/x")
    explicit = build_config({"server": {"runtime_dir": str(tmp_path)}})
    assert resolved_runtime_dir(explicit, {"XDG_RUNTIME_DIR": "/x"}) == tmp_path
