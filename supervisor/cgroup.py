"""Host OOM kills, told by the worker's memory cgroup counter instead of the kernel log.

Why: our systemd unit sets ProtectKernelLogs=yes, so /dev/kmsg cannot be read there and a
worker killed by the kernel's OOM killer looked like a plain crash (the OOM ladder never
ran). The memory cgroup's own counter stays readable (ProtectControlGroups= only makes
/sys/fs/cgroup read-only):

- cgroup v2: ``memory.events``, line ``oom_kill N`` (hierarchical: kills in child cgroups
  count too), at /sys/fs/cgroup/<path> or, on a hybrid layout, /sys/fs/cgroup/unified/<path>;
- cgroup v1: ``memory.oom_control``, line ``oom_kill N`` (kernel 4.13+), at
  /sys/fs/cgroup/memory/<path>.

The kernel counts a kill in the victim's cgroup before the victim dies, so by the time
the supervisor reaps a SIGKILLed worker, a rise since the worker started says "OOM".
Under systemd the cgroup is the service's (supervisor and worker only); a rise there
while the supervisor lives means one of the worker's processes was killed.

Rules: reading only, never writing; any unreadable or unparsable file means "cannot
tell" (None), and the caller falls back to the exit code and the worker's CUDA log lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_ROOT = Path("/proc")


def parse_oom_kill(text: str) -> int | None:
    """The ``oom_kill N`` value of a memory.events / memory.oom_control file."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def counter_files(proc_cgroup: str, cgroup_root: Path = CGROUP_ROOT) -> list[Path]:
    """Candidate counter files for a process, from the text of its /proc/PID/cgroup."""
    out: list[Path] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":  # the v2 hierarchy
            out.append(cgroup_root / rel / "memory.events")
            out.append(cgroup_root / "unified" / rel / "memory.events")
        elif "memory" in controllers.split(","):
            out.append(cgroup_root / "memory" / rel / "memory.oom_control")
    return out


def _read(path: Path) -> int | None:
    try:
        return parse_oom_kill(path.read_text())
    except OSError:
        return None


@dataclass(frozen=True)
class OomWatch:
    """The OOM-kill counters of a worker's cgroup(s), as they were when it started."""

    baseline: tuple[tuple[Path, int], ...]

    @classmethod
    def of(cls, pid: int, proc_root: Path = PROC_ROOT, cgroup_root: Path = CGROUP_ROOT) -> OomWatch:
        try:
            text = (proc_root / str(pid) / "cgroup").read_text()
        except OSError:
            return cls(())
        found: list[tuple[Path, int]] = []
        for path in counter_files(text, cgroup_root):
            value = _read(path)
            if value is not None:
                found.append((path, value))
        return cls(tuple(found))

    def killed(self) -> bool | None:
        """True if an OOM kill was counted since the start; None if no counter can be read."""
        readable = False
        for path, before in self.baseline:
            now = _read(path)
            if now is None:
                continue
            readable = True
            if now > before:
                return True
        return False if readable else None
