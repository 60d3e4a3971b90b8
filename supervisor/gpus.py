"""GPU inventory: a probe interface and its two implementations.

Rules for this module:
- GPU identity is the NVML index (PCI bus order) plus the UUID; never CUDA's default
  ("fastest first") order, which differs from NVML's on mixed boxes.
- ``NvmlProbe`` never raises for "no NVML library" or "no GPU": it returns an empty
  inventory with a one-line note, and the planner makes a CPU-only plan.
- ``SimulatedProbe`` is strict: a malformed file is a ``GpuProbeError`` naming the
  problem (never silently ignored GPU data).
- Only ``supervisor/nvml.py`` imports pynvml.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

# The inventory types live in supervisor/inventory.py; re-exported for existing importers.
from supervisor.inventory import GpuInfo, GpuProbe, GpuProbeError, Inventory, RemoteDevice, RemoteInventory

if TYPE_CHECKING:
    from supervisor.config import Config

__all__ = ["GpuInfo", "GpuProbe", "GpuProbeError", "Inventory", "NvmlProbe", "SimulatedProbe", "make_probe"]


class _SimGpu(msgspec.Struct, forbid_unknown_fields=True):
    index: int
    uuid: str
    name: str
    total_mib: int
    free_mib: int
    pci_bus_id: str | None = None
    used_mib: int | None = None


class _SimRemote(msgspec.Struct, forbid_unknown_fields=True):
    endpoint: str  # host:port of an rpc-server
    total_mib: int
    free_mib: int
    device: int = 0
    max_mib: int = 0  # as [[rpc]] max_mib
    unreachable: str | None = None  # a host that does not answer, and the reason the plan gives


class SimulatedProbe:
    """Reads a JSON list of {"index","uuid","name","total_mib","free_mib"} (plus optional
    "pci_bus_id" and "used_mib"). Answers "what would this box do with that model?".
    Entries with an "endpoint" describe remote devices instead (rpc-servers, ``read_remotes``):
    {"endpoint","total_mib","free_mib"} plus optional "device", "max_mib" and "unreachable"."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _entries(self) -> list[tuple[int, dict[str, Any]]]:
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise GpuProbeError(f"cannot read simulated GPU file {self.path}: {e.strerror}") from None
        try:
            return list(enumerate(msgspec.json.decode(raw, type=list[dict[str, Any]])))
        except msgspec.ValidationError as e:
            raise GpuProbeError(f"simulated GPU file {self.path}: {e}") from None
        except msgspec.DecodeError as e:
            raise GpuProbeError(f"simulated GPU file {self.path} is not valid JSON: {e}") from None

    def read_remotes(self) -> RemoteInventory:
        devices: list[RemoteDevice] = []
        gone: list[tuple[str, str]] = []
        for n, item in self._entries():
            if "endpoint" not in item:
                continue
            try:
                r = msgspec.convert(item, type=_SimRemote)
            except msgspec.ValidationError as e:
                raise GpuProbeError(f"simulated GPU file {self.path}: entry {n}: {e}") from None
            if r.unreachable is not None:
                gone.append((r.endpoint, r.unreachable))
            else:
                devices.append(RemoteDevice(r.endpoint, r.device, r.total_mib, r.free_mib, r.max_mib or None))
        return RemoteInventory(tuple(devices), tuple(gone))

    def read(self) -> Inventory:
        items: list[_SimGpu] = []
        for n, item in self._entries():
            if "endpoint" in item:
                continue  # a remote device: read_remotes
            try:
                items.append(msgspec.convert(item, type=_SimGpu))
            except msgspec.ValidationError as e:
                raise GpuProbeError(f"simulated GPU file {self.path}: entry {n}: {e}") from None
        gpus: list[GpuInfo] = []
        seen_idx: set[int] = set()
        seen_uuid: set[str] = set()
        for n, g in enumerate(items):
            where = f"simulated GPU file {self.path}: entry {n}"
            if g.index < 0 or g.index in seen_idx:
                raise GpuProbeError(f"{where}: index {g.index} is negative or repeated")
            if not g.uuid or g.uuid in seen_uuid:
                raise GpuProbeError(f"{where}: uuid {g.uuid!r} is empty or repeated")
            if g.total_mib <= 0 or not 0 <= g.free_mib <= g.total_mib:
                raise GpuProbeError(
                    f"{where}: need total_mib > 0 and 0 <= free_mib <= total_mib "
                    f"(got total {g.total_mib}, free {g.free_mib})"
                )
            seen_idx.add(g.index)
            seen_uuid.add(g.uuid)
            used = g.used_mib if g.used_mib is not None else g.total_mib - g.free_mib
            bus = g.pci_bus_id or f"00000000:{g.index + 1:02X}:00.0"
            gpus.append(GpuInfo(g.index, g.uuid, g.name, bus, g.total_mib, g.free_mib, used))
        gpus.sort(key=lambda g: g.index)
        return Inventory(tuple(gpus), None if gpus else f"simulated GPU file {self.path} lists no GPU")


class NvmlProbe:
    """The real inventory, read through NVML (supervisor/nvml.py)."""

    def read(self) -> Inventory:
        from supervisor import nvml

        return nvml.read_inventory()


def make_probe(config: Config) -> GpuProbe:
    if config.gpu.simulate_gpus:
        return SimulatedProbe(config.gpu.simulate_gpus)
    return NvmlProbe()
