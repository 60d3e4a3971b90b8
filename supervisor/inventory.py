"""GPU inventory types: what a probe answers, shared by the probes, the planner and placement.

Its own module so that the probes (supervisor/gpus.py: simulated and NVML, supervisor/nvml.py:
the pynvml calls) and the pure deciders (planner.py, placement.py) import these types without
importing each other. Pure data: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class GpuProbeError(Exception):
    """A GPU inventory source is unusable (a bad simulated inventory file, ...)."""


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML index == PCI bus order
    uuid: str
    name: str
    pci_bus_id: str
    total_mib: int
    free_mib: int
    used_mib: int


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GpuInfo, ...]
    note: str | None = None  # why the inventory is empty or partial, for a person


class GpuProbe(Protocol):
    def read(self) -> Inventory: ...
