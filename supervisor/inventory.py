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


@dataclass(frozen=True)
class RemoteDevice:
    """One device of a llama.cpp rpc-server (another host's GPU, or its CPU), as the server
    reported it (supervisor/rpc.py) or a simulated inventory describes it."""

    endpoint: str  # host:port
    device: int  # the server's device index
    total_mib: int
    free_mib: int
    max_mib: int | None = None  # the most the plan may put there ([[rpc]] max_mib); None: no cap

    @property
    def key(self) -> str:
        """How the plan names it (and reserve_overrides may): rpc:host:port/device."""
        return f"rpc:{self.endpoint}/{self.device}"


@dataclass(frozen=True)
class RemoteInventory:
    devices: tuple[RemoteDevice, ...] = ()
    unreachable: tuple[tuple[str, str], ...] = ()  # (endpoint, why it is left out)


class RemoteProbe(Protocol):
    def read(self) -> RemoteInventory: ...
