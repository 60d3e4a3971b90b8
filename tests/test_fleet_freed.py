"""An unloaded model's memory on real GPUs comes back a little after its worker exits: the
fleet waits for NVML to show it free before placing again (bounded). A stand-in for NVML
(a GpuProbe whose free memory rises over reads) drives it; nothing of ours is replaced."""

from __future__ import annotations

import asyncio
from pathlib import Path

from supervisor.config import build_config, resolved_models
from supervisor.default_model import default_model_path
from supervisor.fleet import Fleet
from supervisor.inventory import GpuInfo, Inventory

UUID = "GPU-00000000-0000-0000-0000-00000000aaaa"


class RisingProbe:
    """NVML as the driver frees memory: free grows by ``step`` MiB on each read."""

    def __init__(self, free: int, step: int) -> None:
        self.free, self.step, self.reads = free, step, 0

    def read(self) -> Inventory:
        self.reads += 1
        inv = Inventory((GpuInfo(0, UUID, "gpu", "0000:01:00.0", 24576, self.free, 24576 - self.free),))
        self.free = min(self.free + self.step, 24576)
        return inv


def fleet_on(probe: RisingProbe, tmp: Path) -> Fleet:
    cfg = build_config({"model": {"path": str(default_model_path())}})
    return Fleet(cfg, resolved_models(cfg), tmp, probe)


def test_waits_until_nvml_shows_the_memory_free(tmp_path: Path) -> None:
    probe = RisingProbe(free=1000, step=1000)
    fleet = fleet_on(probe, tmp_path)
    before = probe.read()  # free 1000
    asyncio.run(fleet.evictions.wait_freed("m", {UUID: 3000}, before, timeout_s=10))
    assert probe.reads >= 4 and probe.free >= 4000  # it read until ~3000 MiB more were free


def test_gives_up_after_its_bound(tmp_path: Path) -> None:
    probe = RisingProbe(free=1000, step=0)  # the memory never shows up
    fleet = fleet_on(probe, tmp_path)
    before = probe.read()

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await fleet.evictions.wait_freed("m", {UUID: 3000}, before, timeout_s=0.3)
        return loop.time() - t0

    assert 0.3 <= asyncio.run(timed()) < 5
