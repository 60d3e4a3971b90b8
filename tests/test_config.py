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
    listen_hosts,
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
        if isinstance(keys, dict):  # tables; models is a list, models_dir a value
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
        ('[[models]]\nid = "a"\npath = "/a"\n[[models]]\nid = "a"\npath = "/b"\n', ["id 'a' is used twice"]),
        ('[[models]]\nid = "a b"\npath = "/a"\n', ["models.id"]),
        ('[[models]]\nid = "a"\npath = "/a"\nbogus = 1\n', ["unknown key", "bogus"]),
        ('[[models]]\nid = "a"\npath = "/a"\nwhen_no_room = "pray"\n', ["when_no_room"]),
        # issue 22: the entry is named and its own keys are listed (the list was empty).
        ('[[models]]\nid = "a"\npath = "/a"\n[[models]]\nid = "b"\npath = "/b"\nbogus = 1\n',
         ["unknown key 'models.bogus' in [[models]] entry 2 (id 'b'); allowed: id, path, pinned",
          "ctx_size", "parallel", "when_no_room"]),
        ('[[models]]\npath = "/a"\nbogus = 1\n', ["in [[models]] entry 1; allowed: id, path"]),
        ('[[models]]\nid = "a"\npath = "/a"\n[[models]]\nid = "b"\npath = "/b"\nparallel = 0\n',
         ["models.parallel ([[models]] entry 2 (id 'b')): Expected `int` >= 1"]),
        ('[model]\npath = "/x"\n[[models]]\nid = "a"\npath = "/a"\n', ["both name models"]),
        ("[model]\nparallel = 600\n", ["model: parallel (600) must be <= n_batch (512)"]),
        ('[[models]]\nid = "a"\npath = "/a"\nparallel = 8\nn_batch = 4\n', ["models (a): parallel (8) must be <= n_batch (4)"]),
        # issue 25: several listen addresses, CORS origins.
        ("[server]\nhost = []\n", ["server.host: give at least one address"]),
        ("[server]\nhost = ''\n", ["server.host must not be empty"]),
        ("[server]\nhost = ['127.0.0.1', '']\n", ["server.host[1] must not be empty"]),
        ("[server]\nhost = ['127.0.0.1', '127.0.0.1']\n", ["server.host lists an address twice"]),
        ("[server]\nhost = '127.0.0.1:8080'\n", ["server.host: '127.0.0.1:8080' is not an IP address", "server.port"]),
        ("[server]\nhost = ['::1', 'a b']\n", ["server.host[1]: 'a b' is not an IP address or host name"]),
        ("[server]\nhost = 5\n", ["server.host", "Expected `str | array`"]),
        ("[server]\nhost = [5]\n", ["server.host", "Expected `str`"]),
        ("[server]\ncors_origins = 'https://a.example'\n", ["server.cors_origins", "Expected `array`"]),
        ("[server]\ncors_origins = ['*', 'https://a.example']\n", ['server.cors_origins: "*" (any origin) stands alone']),
        ("[server]\ncors_origins = ['https://a.example/']\n", ["server.cors_origins[0]: 'https://a.example/' is not an origin", "trailing"]),
        ("[server]\ncors_origins = ['x', 'a.example']\n", ["server.cors_origins[0]: 'x' is not an origin", "scheme://host[:port]"]),
        ("[server]\ncors_origins = ['https://A.example']\n", ["server.cors_origins[0]", "lower case"]),
        ("[server]\ncors_origins = ['https://a.example/app']\n", ["server.cors_origins[0]", "no path"]),
        ("[server]\ncors_origins = ['null']\n", ["server.cors_origins[0]: the origin 'null'"]),
        ("[server]\ncors_origins = ['http://a.example', 'http://a.example']\n", ["server.cors_origins lists an origin twice"]),
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


@pytest.mark.parametrize(
    ("host", "hosts"),
    [
        ("0.0.0.0", ["0.0.0.0"]),
        (["127.0.0.1", "::1"], ["127.0.0.1", "::1"]),
        (["[::1]", "localhost", "gpu-box.lan"], ["::1", "localhost", "gpu-box.lan"]),  # brackets as in a URL
    ],
)
def test_listen_hosts(host: str | list[str], hosts: list[str]) -> None:
    assert listen_hosts(build_config({"server": {"host": host}})) == hosts


def test_cors_origins_accepted() -> None:
    for origins in ([], ["*"], ["https://app.example", "http://localhost:3000", "http://[::1]:8080", "tauri://localhost"]):
        assert build_config({"server": {"cors_origins": origins}}).server.cors_origins == origins


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


# --- several models ([[models]], --model ID=PATH, --models-dir) ----------------------------


def _example_models_block() -> str:
    text = EXAMPLE.read_text()
    block = text.split("# BEGIN [[models]] example\n", 1)[1].split("# END [[models]] example", 1)[0]
    return "\n".join(line.removeprefix("# ").removeprefix("#") for line in block.splitlines())


def test_the_example_models_block_decodes_with_every_entry_key() -> None:
    from supervisor.config import ModelEntry, build_config

    data = tomllib.loads(_example_models_block())
    assert data["models"][0].keys() == set(ModelEntry.__struct_fields__)
    cfg = build_config(data)
    assert [m.id for m in cfg.models] == ["chat", "coder"]
    assert cfg.models[0].pinned and cfg.models[0].preload and cfg.models[1].ttl_s == 600


def test_one_model_section_is_a_list_of_one() -> None:
    from supervisor.config import resolved_models

    cfg = load_config(None, {"model.path": "/m/tiny-q8.gguf", "model.ctx_size": 2048})
    (m,) = resolved_models(cfg)
    assert (m.id, m.path, m.ctx_size, m.pinned, m.ttl_s) == ("tiny-q8", "/m/tiny-q8.gguf", 2048, False, 0.0)
    (m,) = resolved_models(load_config(None, {"model.alias": "chat"}), lambda: "/x/smol.gguf")
    assert (m.id, m.path) == ("chat", "")
    (m,) = resolved_models(Config(), lambda: "/x/smol.gguf")
    assert m.id == "smol"


def test_entries_take_what_they_leave_out_from_the_model_section(tmp_path: Path) -> None:
    from supervisor.config import resolved_models

    f = tmp_path / "c.toml"
    f.write_text(
        '[model]\nctx_size = 1024\n\n[[models]]\nid = "a"\npath = "/a.gguf"\n\n'
        '[[models]]\nid = "b"\npath = "/b.gguf"\nctx_size = 8192\npinned = true\n'
    )
    a, b = resolved_models(load_config(f))
    assert (a.ctx_size, b.ctx_size, a.pinned, b.pinned) == (1024, 8192, False, True)
    # A single --model PATH replaces the file's list, as flags override the file.
    (m,) = resolved_models(load_config(f, {"model.path": "/c.gguf"}))
    assert m.path == "/c.gguf" and m.ctx_size == 1024


def test_model_flags_and_models_dir(tmp_path: Path) -> None:
    from supervisor.cli import build_parser, load_config as cli_load
    from supervisor.config import resolved_models

    for name in ("b.gguf", "a.gguf", "notes.txt"):
        (tmp_path / name).write_text("x")
    args = build_parser().parse_args(["plan", "--model", "/m/one.gguf"])
    cfg = cli_load(args)
    assert cfg.model.path == "/m/one.gguf" and cfg.models == []
    args = build_parser().parse_args(["plan", "--model", "chat=/m/one.gguf", "--model", "/m/two.gguf"])
    assert [(m.id, m.path) for m in resolved_models(cli_load(args))] == [("chat", "/m/one.gguf"), ("two", "/m/two.gguf")]
    args = build_parser().parse_args(["plan", "--models-dir", str(tmp_path)])
    assert [m.id for m in resolved_models(cli_load(args))] == ["a", "b"]
    args = build_parser().parse_args(["plan", "--models-dir", str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="not a directory"):
        resolved_models(cli_load(args))


def test_a_setting_has_one_default() -> None:
    """issue 22: the config schema holds each setting's default; the planner takes it from
    there and the worker's launch spec requires it (the worker cannot import the schema)."""
    from supervisor.config import GpuSection, ModelEntry, ModelSection, ModelSettings
    from supervisor.planner import PlanSettings
    from worker.protocol import AppliedParams, LaunchSpec

    m, g, s = ModelSettings(), GpuSection(), PlanSettings()
    assert (s.n_ctx, s.n_batch, s.parallel) == (m.ctx_size, m.n_batch, m.parallel)
    assert s.flash_attn == (m.flash_attn != "off")  # the estimate's reading of the setting
    assert (s.reserve_mib, s.device_order, s.split_mode) == (g.reserve_mib, g.device_order, g.split_mode)
    required = {f.name for f in msgspec.structs.fields(LaunchSpec) if f.required}
    assert {"n_ctx", "n_batch", "parallel", "prefill_chunk", "cache_ram_mib", "split_mode", "flash_attn",
            "strict_params", "embeddings"} <= required
    assert {"parallel", "prefill_chunk"} <= {f.name for f in msgspec.structs.fields(AppliedParams) if f.required}
    # The fields a model has are declared once, for [model] and [[models]] alike.
    shared = set(ModelSettings.__struct_fields__)
    assert shared < set(ModelSection.__struct_fields__) and shared < set(ModelEntry.__struct_fields__)
    for cls in (ModelSection, ModelEntry):
        assert not shared & set(vars(cls).get("__annotations__", {})), cls


def test_flash_attn_auto_on_off_and_the_old_booleans() -> None:
    from supervisor.cli import build_parser, load_config as cli_load

    assert Config().model.flash_attn == "auto"  # llama.cpp's and llama-server's default
    cfg = build_config({"model": {"flash_attn": True},
                        "models": [{"id": "a", "path": "/m/a.gguf"}, {"id": "b", "path": "/m/b.gguf", "flash_attn": False}]})
    assert (cfg.model.flash_attn, [m.flash_attn for m in cfg.models]) == ("on", ["on", "off"])
    assert cli_load(build_parser().parse_args(["plan", "--flash-attn", "off"])).model.flash_attn == "off"
    with pytest.raises(ConfigError, match="auto | on | off"):
        build_config({"model": {"flash_attn": "sometimes"}})
