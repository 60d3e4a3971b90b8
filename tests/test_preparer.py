"""The Preparer's GPU inventory for /status: read through the probe, reused for a moment."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from supervisor.config import build_config
from supervisor.launch import Preparer
from tests.gguf_factory import write_model


def _sims(path: Path, free_mib: int) -> None:
    path.write_text(json.dumps([
        {"index": 0, "uuid": "GPU-00000000-0000-0000-0000-000000000001", "name": "Sim", "total_mib": 8192, "free_mib": free_mib}
    ]))


def test_gpus_now_reuses_a_recent_read_and_rereads_after_the_ttl(tmp_path: Path) -> None:
    sims = tmp_path / "gpus.json"
    _sims(sims, 8000)
    model = write_model(tmp_path / "m.gguf")
    prep = Preparer(build_config({"model": {"path": str(model)}, "gpu": {"simulate_gpus": str(sims)}}))

    async def free_now() -> int:
        return (await prep.gpus_now())[0].free_mib

    async def scenario() -> tuple[int, int, int]:
        first = await free_now()
        _sims(sims, 5000)  # the GPU's memory moved
        prep.gpus_now_ttl_s = 3600.0
        cached = await free_now()
        prep.gpus_now_ttl_s = 0.0
        fresh = await free_now()
        return first, cached, fresh

    assert asyncio.run(scenario()) == (8000, 8000, 5000)


def test_launch_spec_carries_server_settings_the_worker_applies(tmp_path: Path) -> None:
    sims = tmp_path / "gpus.json"
    _sims(sims, 8000)
    model = write_model(tmp_path / "m.gguf")
    for strict in (False, True):
        prep = Preparer(build_config({
            "model": {"path": str(model)}, "gpu": {"simulate_gpus": str(sims)},
            "server": {"strict_params": strict},
        }))
        launch = asyncio.run(prep(None, str(tmp_path / "w.sock")))
        assert launch.spec.strict_params is strict
