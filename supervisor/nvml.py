"""The only module that imports pynvml.

Every function here degrades to "nothing known" when NVML is missing (no driver, no
libnvidia-ml.so.1, no GPU, a container without the device): callers get an empty answer
and a one-line reason, never an exception, because a CPU-only box is a supported setup.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from supervisor.inventory import GpuInfo, Inventory

_MIB = 1024 * 1024


def _text(v: bytes | str) -> str:
    # Old pynvml returns bytes, new returns str.
    return v.decode() if isinstance(v, bytes) else v


class NvmlUnavailable(Exception):
    pass


@contextmanager
def _session() -> Iterator[Any]:
    """nvmlInit/nvmlShutdown around a block; NvmlUnavailable with the reason if it fails."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("the nvidia-ml-py package is not installed") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        reason = str(e)
        if getattr(e, "value", None) == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
            reason = "libnvidia-ml.so.1 not found"
        raise NvmlUnavailable(reason) from None
    except OSError as e:  # a broken library that fails to load
        raise NvmlUnavailable(str(e)) from None
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def read_inventory() -> Inventory:
    """Every GPU NVML sees, in NVML (PCI bus) order."""
    try:
        with _session() as nv:
            count = nv.nvmlDeviceGetCount()
            gpus = []
            skipped: list[str] = []
            for i in range(count):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    mem = nv.nvmlDeviceGetMemoryInfo(h)
                    gpus.append(
                        GpuInfo(
                            index=i,
                            uuid=_text(nv.nvmlDeviceGetUUID(h)),
                            name=_text(nv.nvmlDeviceGetName(h)),
                            pci_bus_id=_text(nv.nvmlDeviceGetPciInfo(h).busId),
                            total_mib=int(mem.total) // _MIB,
                            free_mib=int(mem.free) // _MIB,
                            used_mib=int(mem.used) // _MIB,
                        )
                    )
                except nv.NVMLError as e:
                    # A GPU that cannot be queried (fallen off the bus, ...) is left out, loudly.
                    skipped.append(f"GPU {i}: {e}")
    except NvmlUnavailable as e:
        return Inventory((), f"NVML not available: {e}; planning for CPU only")
    note = None
    if skipped:
        note = "some GPUs could not be read and were left out: " + "; ".join(skipped)
    elif not gpus:
        note = "NVML reports no GPU; planning for CPU only"
    return Inventory(tuple(gpus), note)


def process_gpu_memory(pids: Iterable[int]) -> dict[str, int]:
    """MiB of GPU memory used by the given processes, per GPU UUID ({} without NVML).

    Compute and graphics processes are both counted; a GPU where the processes use
    nothing is absent from the answer.
    """
    wanted = set(pids)
    out: dict[str, int] = {}
    try:
        with _session() as nv:
            for i in range(nv.nvmlDeviceGetCount()):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    uuid = _text(nv.nvmlDeviceGetUUID(h))
                    procs = list(nv.nvmlDeviceGetComputeRunningProcesses(h))
                    procs += list(nv.nvmlDeviceGetGraphicsRunningProcesses(h))
                except nv.NVMLError:
                    continue
                seen: set[int] = set()
                for p in procs:
                    used = getattr(p, "usedGpuMemory", None)
                    # A process can be listed as compute and graphics; count it once.
                    if p.pid in wanted and p.pid not in seen and used:
                        seen.add(p.pid)
                        out[uuid] = out.get(uuid, 0) + int(used) // _MIB
    except NvmlUnavailable:
        return {}
    return out
