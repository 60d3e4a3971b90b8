"""`vram-llm plan` end to end (a real subprocess of the console script) and --use-fit-params
against a fake llama-fit-params written into tmp_path."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli import main, make_plan
from supervisor.config import build_config
from supervisor.default_model import default_model_path
from supervisor.fit_params import parse_output

SIM = Path(__file__).parent / "sim"
_SCRIPT = Path(sys.executable).parent / "vram-llm"
# The console script when the package is installed (bootstrap does `pip install -e`).
VRAM_LLM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "supervisor.cli"]


REPO = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # The console script's own sys.path would find the editable install's checkout (which may
    # be another worktree): put this checkout first.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [*VRAM_LLM, *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )


def plan_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = run("plan", "--model", str(default_model_path()), "--json", *args, env=env)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    for key in ("env", "tensor_split", "n_gpu_layers", "split_mode", "main_gpu", "n_ctx", "gpus"):
        assert key in out
    for g in out["gpus"]:
        for key in ("index", "uuid", "free_mib", "reserve_mib", "usable_mib", "planned_mib", "layers",
                    "excluded_reason"):
            assert key in g
        assert g["planned_mib"] <= g["usable_mib"]
    if out["tensor_split"]:
        assert sum(out["tensor_split"]) == pytest.approx(1.0, abs=1e-5)
    return out


def sim(name: str) -> str:
    return str(SIM / f"{name}.json")


def test_one_gpu() -> None:
    out = plan_json("--simulate-gpus", sim("one_gpu"))
    assert out["n_gpu_layers"] == -1 and out["tensor_split"] == [1.0]
    assert out["env"] == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                          "CUDA_VISIBLE_DEVICES": "GPU-11111111-0000-0000-0000-000000000000"}


def test_two_equal() -> None:
    out = plan_json("--simulate-gpus", sim("two_equal"))
    assert out["tensor_split"] == [0.5, 0.5] and [g["index"] for g in out["gpus"]] == [0, 1]


def test_mix_free_order_vs_pci_order() -> None:
    free = plan_json("--simulate-gpus", sim("mix_24_12_4"))
    assert [g["index"] for g in free["gpus"]] == [1, 2, 0]
    assert free["env"]["CUDA_VISIBLE_DEVICES"].startswith("GPU-24242424")
    pci = plan_json("--simulate-gpus", sim("mix_24_12_4"), "--device-order", "pci")
    assert [g["index"] for g in pci["gpus"]] == [0, 1, 2]
    # The display GPU comes first on the bus but is not needed (issue 17): the 3090 is CUDA 0.
    assert pci["env"]["CUDA_VISIBLE_DEVICES"].startswith("GPU-24242424")
    assert pci["gpus"][0]["excluded_reason"].startswith("not needed")


def test_below_reserve_and_reserve_flag() -> None:
    out = plan_json("--simulate-gpus", sim("below_reserve"))
    busy = next(g for g in out["gpus"] if g["index"] == 0)
    assert "below the reserve" in busy["excluded_reason"]
    out = plan_json("--simulate-gpus", sim("below_reserve"), "--reserve-mib", "0", "--split-mode", "none")
    assert out["gpus"][0]["reserve_mib"] == 0


def test_devices_subset_and_split_none() -> None:
    out = plan_json("--simulate-gpus", sim("mix_24_12_4"), "--devices", "0,2")
    assert [g["index"] for g in out["gpus"] if g["excluded_reason"] is None] == [2, 0]
    out = plan_json("--simulate-gpus", sim("mix_24_12_4"), "--split-mode", "none")
    assert out["split_mode"] == "none" and out["main_gpu"] == 0
    assert out["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-24242424-0000-0000-0000-000000000000"


def test_partial_offload() -> None:
    out = plan_json("--simulate-gpus", sim("tiny"))
    assert 0 < out["n_gpu_layers"] < 30 and out["offloaded_layers"] == out["n_gpu_layers"] - 1 and out["output_on_gpu"]


def test_no_gpu_in_inventory() -> None:
    out = plan_json("--simulate-gpus", sim("no_gpu"))
    assert out["cpu_only"] and out["n_gpu_layers"] == 0 and out["gpus"] == []


def test_keep_cuda_visible_devices() -> None:
    out = plan_json("--simulate-gpus", sim("mix_24_12_4"), "--no-set-cuda-visible-devices",
                    env={"CUDA_VISIBLE_DEVICES": "2,0"})
    assert "CUDA_VISIBLE_DEVICES" not in out["env"]
    assert {g["index"]: g["cuda_index"] for g in out["gpus"]} == {2: 0, 0: 1, 1: None}


def test_gpu_not_needed_is_left_out_in_json_and_table() -> None:
    # issue 17: at 8k context the display GPU would get no layer; it is not made visible.
    out = plan_json("--simulate-gpus", sim("mix_24_12_4"), "--ctx-size", "8192")
    display = next(g for g in out["gpus"] if g["index"] == 0)
    assert display["excluded_reason"] == "not needed: the model fits on the others"
    assert display["cuda_index"] is None and display["layers"] == 0 and display["share"] == 0.0
    assert out["env"]["CUDA_VISIBLE_DEVICES"] == (
        "GPU-24242424-0000-0000-0000-000000000000,GPU-12121212-0000-0000-0000-000000000000"
    )
    assert len(out["tensor_split"]) == 2 and out["main_gpu"] == 0
    r = run("plan", "--model", str(default_model_path()), "--simulate-gpus", sim("mix_24_12_4"),
            "--ctx-size", "8192")
    assert r.returncode == 0, r.stderr
    assert "GPU 0: not used: not needed: the model fits on the others" in r.stdout
    assert "GPU-d15p1a70" not in r.stdout.split("worker env:")[1]


def test_this_machine_plans_and_exits_0() -> None:
    # No --simulate-gpus: the real NVML probe. Without a GPU that is a CPU-only plan.
    r = run("plan", "--model", str(default_model_path()))
    assert r.returncode == 0, r.stderr
    assert "plan (" in r.stdout and "llama.cpp: n_gpu_layers=" in r.stdout


def test_table_output_names_every_gpu_and_reasons() -> None:
    r = run("plan", "--model", str(default_model_path()), "--simulate-gpus", sim("below_reserve"))
    assert r.returncode == 0
    assert "GPU-f0110000" in r.stdout and "below the reserve" in r.stdout
    assert "CUDA_VISIBLE_DEVICES=GPU-e0e00000" in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--devices", "0,x"], "--devices"),
        (["--devices", ""], "--devices"),
        (["--devices", "7", "--simulate-gpus", str(SIM / "two_equal.json")], "no GPU with NVML index 7"),
        (["--model", "/nonexistent/model.gguf"], "model file not found"),
        (["--model", __file__], "not a GGUF file"),
        (["--port", "0"], "--port"),
        (["--device-order", "fastest"], "invalid choice"),
        (["--simulate-gpus", "/nonexistent.json"], "simulated GPU file"),
        (["--config", "/nonexistent.toml"], "config file not found"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: list[str], needle: str) -> None:
    base = ["--model", str(default_model_path())] if "--model" not in args else []
    r = run("plan", *base, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vram-llm: error: ") and needle in lines[0], r.stderr
    assert r.stdout == ""


def test_bad_config_key_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[gpu]\nreserve = 10\n")
    r = run("plan", "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "unknown key 'gpu.reserve'" in r.stderr and "reserve_mib" in r.stderr


def test_bad_simulated_file_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "gpus.json"
    bad.write_text('[{"index": 0, "uuid": "GPU-x", "name": "x", "total_mib": 100, "free_mib": 200}]')
    r = run("plan", "--model", str(default_model_path()), "--simulate-gpus", str(bad))
    assert r.returncode == 2 and "free_mib <= total_mib" in r.stderr
    bad.write_text('[{"index": 0, "uuid": "GPU-x", "name": "x", "total_mib": 100}]')
    r = run("plan", "--model", str(default_model_path()), "--simulate-gpus", str(bad))
    assert r.returncode == 2 and "free_mib" in r.stderr


def test_main_in_process_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "/nonexistent.gguf"]) == 2
    assert capsys.readouterr().err.startswith("vram-llm: error: model file not found")


# --- --use-fit-params -------------------------------------------------------------------


def fake_fit_params(tmp_path: Path, body: str) -> Path:
    """A stand-in llama-fit-params: records its argv and CUDA env, then runs ``body``."""
    script = tmp_path / "llama-fit-params"
    record = tmp_path / "record.json"
    script.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import json, os, sys
            with open({str(record)!r}, "w") as f:
                json.dump({{"argv": sys.argv[1:], "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                           "order": os.environ.get("CUDA_DEVICE_ORDER")}}, f)
            print("llama_params_fit: fitting params to free memory ...", file=sys.stderr)
            """
        )
        + textwrap.dedent(body)
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def fit_config(script: Path | str, **gpu: Any) -> Any:
    return build_config({
        "model": {"path": str(default_model_path()), "ctx_size": 4096},
        "gpu": {"simulate_gpus": str(SIM / "two_equal.json"), "use_fit_params": True,
                "fit_params_command": str(script), "reserve_mib": 900, **gpu},
    })


def test_fit_params_answer_becomes_the_plan(tmp_path: Path) -> None:
    script = fake_fit_params(tmp_path, 'print("-c 4096 -ngl 31 -ts 20,11")\n')
    p, _, _ = make_plan(fit_config(script))
    assert p.source == "llama-fit-params" and p.n_gpu_layers == -1
    assert p.tensor_split == pytest.approx((20 / 31, 11 / 31), abs=1e-5)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["cvd"] == p.env["CUDA_VISIBLE_DEVICES"] and rec["order"] == "PCI_BUS_ID"
    argv = rec["argv"]
    assert argv[argv.index("--fit-target") + 1] == "900,900"
    assert argv[argv.index("-m") + 1] == str(default_model_path())
    assert argv[argv.index("-c") + 1] == "4096"


def test_fit_params_sees_every_usable_gpu_and_its_zero_is_left_out(tmp_path: Path) -> None:
    # Our own plan leaves the display GPU out; the tool still gets to choose among all three,
    # and the GPU it gives nothing is not made visible to the worker.
    script = fake_fit_params(tmp_path, 'print("-c 4096 -ngl 31 -ts 20,11,0")\n')
    p, _, _ = make_plan(fit_config(script, simulate_gpus=str(SIM / "mix_24_12_4.json")))
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["cvd"].split(",") == [
        "GPU-24242424-0000-0000-0000-000000000000", "GPU-12121212-0000-0000-0000-000000000000",
        "GPU-d15p1a70-0000-0000-0000-000000000000",
    ]
    argv = rec["argv"]
    assert argv[argv.index("--fit-target") + 1] == "900,900,900"
    assert p.source == "llama-fit-params"
    assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(rec["cvd"].split(",")[:2])
    assert p.tensor_split == pytest.approx((20 / 31, 11 / 31), abs=1e-5)
    display = next(g for g in p.gpus if g.index == 0)
    assert display.excluded_reason == "not needed: the model fits on the others" and display.cuda_index is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('print("failed to fit", file=sys.stderr); sys.exit(1)\n', "exited with status 1: failed to fit"),
        ('print("garbage")\n', "unparsable output"),
        ('print("-ngl 3 -ts 1,2")\n', "lacks -c or -ngl"),
        ("pass\n", "printed nothing"),
    ],
)
def test_fit_params_failure_falls_back_with_a_note(tmp_path: Path, body: str, needle: str) -> None:
    script = fake_fit_params(tmp_path, body)
    p, _, _ = make_plan(fit_config(script))
    assert p.source == "vram-llm" and p.n_gpu_layers == -1
    assert any(needle in n and "using vram-llm's own plan" in n for n in p.notes), p.notes


def test_fit_params_missing_binary(tmp_path: Path) -> None:
    p, _, _ = make_plan(fit_config(tmp_path / "no-such-llama-fit-params"))
    assert p.source == "vram-llm" and any("not found" in n for n in p.notes)


def test_fit_params_via_cli(tmp_path: Path) -> None:
    script = fake_fit_params(tmp_path, 'print("-c 2048 -ngl 20 -ts 12,8")\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[gpu]\nfit_params_command = "{script}"\n')
    out = plan_json("--config", str(cfg), "--use-fit-params", "--simulate-gpus", sim("two_equal"))
    assert out["source"] == "llama-fit-params" and out["n_ctx"] == 2048 and out["n_gpu_layers"] == 20


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("-c 4096 -ngl 33\n", (4096, 33, ())),
        ("-c 8192 -ngl 41 -ts 20,21\n", (8192, 41, (20.0, 21.0))),
        ('-c 4096 -ngl 99 -ts 30,3 -ot "blk\\.1\\.ffn_.*=CPU"\n', (4096, 99, (30.0, 3.0))),
    ],
)
def test_parse_fit_params_output(stdout: str, expected: tuple[int, int, tuple[float, ...]]) -> None:
    r = parse_output(stdout)
    assert (r.n_ctx, r.n_gpu_layers, r.tensor_split) == expected


def test_nvml_probe_never_raises() -> None:
    # Without NVML (this CI) an empty inventory and a reason; with it, real GPUs in NVML order.
    from supervisor.gpus import NvmlProbe
    from supervisor.nvml import process_gpu_memory

    inv = NvmlProbe().read()
    if not inv.gpus:
        assert inv.note and "\n" not in inv.note
    assert [g.index for g in inv.gpus] == sorted(g.index for g in inv.gpus)
    assert isinstance(process_gpu_memory({os.getpid()}), dict)


def test_serve_with_an_unreadable_model_leaves_no_runtime_dir(tmp_path: Path) -> None:
    # The model is read after the runtime dir is made: an error there must not leave it.
    run_dir = tmp_path / "run"
    r = run("serve", "--model", __file__, "--port", "18999", "--config", str(_runtime_config(tmp_path, run_dir)))
    assert r.returncode == 2 and "not a GGUF file" in r.stderr, r.stderr
    assert list(run_dir.iterdir()) == []


def _runtime_config(tmp: Path, run_dir: Path) -> Path:
    cfg = tmp / "c.toml"
    cfg.write_text(f'[server]\nruntime_dir = "{run_dir}"\n')
    return cfg


# --- issue 22: `plan` with any config plans every configured model, as the fleet places them ---


def _small_gpu(tmp_path: Path, free_mib: int) -> str:
    f = tmp_path / "gpu.json"
    f.write_text(json.dumps([{"index": 0, "uuid": "GPU-aaaa0000-0000-0000-0000-000000000000", "name": "small",
                              "total_mib": free_mib + 600, "free_mib": free_mib}]))
    return str(f)


def test_one_models_entry_plans_that_entrys_file(tmp_path: Path) -> None:
    from tests.gguf_factory import Shape, write_model

    path = write_model(tmp_path / "mine.gguf", Shape(n_layers=6, vocab=4096, name="mine"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[models]]\nid = "mine"\npath = "{path}"\nctx_size = 1024\n')
    out = json.loads(run("plan", "--json", "--config", str(cfg), "--simulate-gpus", sim("one_gpu")).stdout)
    assert out["model"]["path"] == str(path) and out["model"]["n_layers"] == 6 and out["n_ctx"] == 1024
    r = run("plan", "--config", str(cfg), "--simulate-gpus", sim("one_gpu"))
    assert r.returncode == 0 and str(path) in r.stdout and "SmolLM2" not in r.stdout, r.stdout + r.stderr


def test_several_models_show_where_each_goes_and_why(tmp_path: Path) -> None:
    model = default_model_path()
    # Room for about two of the three on the GPU: the first and the preloaded one load at
    # start; the third loads on demand and would unload the preloaded one (the first is pinned).
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[models]]\nid = "chat"\npath = "{model}"\npinned = true\n'
        f'[[models]]\nid = "coder"\npath = "{model}"\n'
        f'[[models]]\nid = "small"\npath = "{model}"\npreload = true\n'
        f'[[models]]\nid = "huge"\npath = "{model}"\nctx_size = 65536\nwhen_no_room = "refuse"\n'
    )
    gpus = _small_gpu(tmp_path, 4000)
    r = run("plan", "--json", "--config", str(cfg), "--simulate-gpus", gpus)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert list(out) == ["chat", "coder", "small", "huge"]
    placed = {m: v["placement"] for m, v in out.items()}
    assert (placed["chat"]["loads"], placed["chat"]["at_start_because"]) == ("at start", "first model")
    assert (placed["small"]["loads"], placed["small"]["at_start_because"]) == ("at start", "preload")
    assert out["chat"]["n_gpu_layers"] == -1 and out["small"]["n_gpu_layers"] == -1
    assert placed["coder"]["loads"] == "on demand" and placed["coder"]["evicts"] == ["small"]
    assert placed["huge"]["refusal"] and "n_gpu_layers" not in out["huge"]
    text = run("plan", "--config", str(cfg), "--simulate-gpus", gpus).stdout
    lines = {ln.split()[0]: ln for ln in text.splitlines()[1:5]}
    assert "at start (first model)" in lines["chat"] and "unloads small" in lines["coder"]
    assert "would not load" in lines["huge"] and "== model coder ==" in text


def test_a_model_loaded_at_start_may_unload_an_earlier_one(tmp_path: Path) -> None:
    # In process: place_fleet is what `plan` prints. The preloaded model needs the first
    # one's memory; the fleet unloads the first (not pinned) once it served its queue.
    from supervisor.planning import place_fleet

    model = default_model_path()
    cfg = build_config({
        "models": [{"id": "chat", "path": str(model)},
                   {"id": "big", "path": str(model), "ctx_size": 8192, "preload": True}],
        "gpu": {"simulate_gpus": _small_gpu(tmp_path, 3500)},
    })
    chat, big = place_fleet(cfg)
    assert (chat.at_start, chat.unloaded_for, chat.evict) == ("first model", "big", ())
    assert (big.at_start, big.evict, big.beside) == ("preload", ("chat",), ())
    assert big.plan is not None and big.plan.n_gpu_layers == -1 and big.plan.n_ctx == 8192
    # Pinned, the first stays: the preloaded one gets what is left (layers in host RAM).
    cfg = build_config({"models": [{"id": "chat", "path": str(model), "pinned": True},
                                   {"id": "big", "path": str(model), "ctx_size": 8192, "preload": True}],
                        "gpu": {"simulate_gpus": _small_gpu(tmp_path, 3500)}})
    chat, big = place_fleet(cfg)
    assert chat.unloaded_for == "" and big.evict == () and big.beside == ("chat",)
    assert big.plan is not None and big.plan.n_gpu_layers != -1 and "host RAM" in big.why
