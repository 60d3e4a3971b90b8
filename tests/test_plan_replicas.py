"""pack and replicas as `vram-llm plan` shows them, the flags, and `vram-llm status`'s
replica rows (issue 28)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.cli import build_parser, load_config
from supervisor.config import ConfigError
from supervisor.default_model import default_model_path
from supervisor.status_cli import render
from tests.test_plan_cli import plan_json, run, sim


def test_plan_packs_and_says_why() -> None:
    out = plan_json("--simulate-gpus", sim("four_24"), "--placement", "pack")
    used = [g["index"] for g in out["gpus"] if g["excluded_reason"] is None]
    assert used == [0]
    assert {g["excluded_reason"] for g in out["gpus"] if g["index"] != 0} == {"left out by placement pack"}
    assert any(n.startswith("placement pack: GPU 0 alone holds") for n in out["notes"]), out["notes"]
    spread = plan_json("--simulate-gpus", sim("four_24"))
    assert any(n.startswith("placement spread") for n in spread["notes"])


def test_plan_lays_out_auto_replicas_one_per_gpu() -> None:
    out = plan_json("--simulate-gpus", sim("four_24"), "--replicas", "auto")
    assert "replicas: 4 (as many packed copies as fit on GPUs no other model needs): GPU 0 | GPU 1 | GPU 2 | GPU 3" \
        in out["notes"], out["notes"]


def test_plan_of_several_models_shares_the_gpus_out(tmp_path: Path) -> None:
    model = default_model_path()
    cfg = tmp_path / "c.toml"
    cfg.write_text("".join(f'[[models]]\nid = "{m}"\npath = "{model}"\nreplicas = "auto"\n' for m in ("a", "b")))
    r = run("plan", "--json", "--config", str(cfg), "--simulate-gpus", sim("four_24"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["a"]["placement"]["replicas"] == [[0], [2]]
    assert out["b"]["placement"]["replicas"] == [[1], [3]]


@pytest.mark.parametrize("argv, key, value", [
    (["--replicas", "3"], "replicas", 3), (["--replicas", "auto"], "replicas", "auto"),
    (["--placement", "pack"], "placement", "pack"), ([], "replicas", 1), ([], "placement", "spread"),
])
def test_the_flags(argv: list[str], key: str, value: object) -> None:
    cfg = load_config(build_parser().parse_args(["plan", *argv]))
    assert getattr(cfg.model, key) == value


@pytest.mark.parametrize("argv, needle", [(["--replicas", "0"], "replicas"), (["--replicas", "many"], "replicas")])
def test_bad_replicas_name_the_key(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(build_parser().parse_args(["plan", *argv]))


def test_bad_placement_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--placement", "scatter"])


def test_status_shows_each_replica() -> None:
    row = {"state": "ready", "reason": "", "pid": 11, "planned_mib": {"GPU-a": 1264}, "slots": 4, "generating": 2,
           "waiting": 0, "served": 30, "restarts": 0, "cache_hits": 7, "cache_tokens_reused": 900}
    st = {"state": "ready", "reason": "",
          "gpus_now": [{"index": 0, "uuid": "GPU-a", "name": "x", "total_mib": 1, "free_mib": 1, "used_mib": 0},
                       {"index": 1, "uuid": "GPU-b", "name": "x", "total_mib": 1, "free_mib": 1, "used_mib": 0}],
          "replicas": [{**row, "replica": 1},
                       {**row, "replica": 2, "state": "backoff", "pid": None, "planned_mib": {}, "slots": 0,
                        "restarts": 1}]}
    lines = render(st, "http://127.0.0.1:8080/status").splitlines()
    i = lines.index("replicas: 2")
    assert lines[i + 1].split() == ["REPLICA", "STATE", "PID", "GPUS", "PLANNED", "MiB", "SLOTS", "GENERATING",
                                    "WAITING", "SERVED", "CACHE", "HITS", "RESTARTS"]
    assert lines[i + 2].split() == ["1", "ready", "11", "0", "1264", "4", "2", "0", "30", "7", "0"]
    assert lines[i + 3].split() == ["2", "backoff", "-", "-", "-", "0", "2", "0", "30", "7", "1"]
