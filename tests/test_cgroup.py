"""Host OOM detection from cgroup counters (supervisor/cgroup.py): the file formats as
tables, then a real kernel OOM kill of the fake worker inside a small memory cgroup."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.cgroup import OomWatch, counter_files, parse_oom_kill
from tests.supervisor_harness import Supervisor, poll

V2_EVENTS = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n"
V1_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"


@pytest.mark.parametrize(
    ("text", "value"),
    [(V2_EVENTS, 2), (V1_CONTROL, 5), ("oom 1\n", None), ("oom_kill x\n", None), ("", None)],
)
def test_parse_oom_kill(text: str, value: int | None) -> None:
    assert parse_oom_kill(text) == value


def test_counter_files_for_v2_hybrid_and_v1_lines() -> None:
    root = Path("/cg")
    text = "12:memory:/system.slice/vram-llm.service\n4:cpu,cpuacct:/x\n0::/system.slice/vram-llm.service\n"
    assert counter_files(text, root) == [
        root / "memory/system.slice/vram-llm.service/memory.oom_control",
        root / "system.slice/vram-llm.service/memory.events",
        root / "unified/system.slice/vram-llm.service/memory.events",
    ]


def test_watch_says_killed_only_when_the_counter_rose(tmp_path: Path) -> None:
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("0::/svc\n")
    events = cg / "svc" / "memory.events"
    events.parent.mkdir(parents=True)
    events.write_text(V2_EVENTS)
    watch = OomWatch.of(42, proc_root=proc, cgroup_root=cg)
    assert watch.killed() is False
    events.write_text(V2_EVENTS.replace("oom_kill 2", "oom_kill 3"))
    assert watch.killed() is True
    events.unlink()
    assert watch.killed() is None  # cannot tell: the caller falls back to the kernel log
    assert OomWatch.of(43, proc_root=proc, cgroup_root=cg).killed() is None  # no such process


# --- a real OOM kill ----------------------------------------------------------------------------

LIMIT = 400 << 20  # the supervisor (~80 MiB) and an idle fake worker (~40 MiB) fit; 1 GiB more does not


def _own_cgroup_path(controller: str) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller == "" and controllers == "") or (controller and controller in controllers.split(",")):
            return path.lstrip("/")
    return None


def _try_child(parent: Path, limits: dict[str, str]) -> Path | None:
    """A child cgroup with memory limits, or None if this machine does not let us make one."""
    child = parent / f"vram-llm-test-{os.getpid()}"
    try:
        child.mkdir()
    except OSError:
        return None
    try:
        for name, value in limits.items():
            f = child / name
            if f.exists():
                f.write_text(value)
        return child
    except OSError:
        child.rmdir()
        return None


@pytest.fixture
def small_memory_cgroup() -> Iterator[Path]:
    child = None
    v1 = _own_cgroup_path("memory")
    if v1 is not None and (Path("/sys/fs/cgroup/memory") / v1 / "memory.oom_control").exists():
        # memsw too: with swap the kernel would swap instead of killing.
        child = _try_child(Path("/sys/fs/cgroup/memory") / v1,
                           {"memory.limit_in_bytes": str(LIMIT), "memory.memsw.limit_in_bytes": str(LIMIT)})
    v2 = _own_cgroup_path("")
    if child is None and v2 is not None:
        parent = Path("/sys/fs/cgroup") / v2
        if "memory" in (parent / "cgroup.subtree_control").read_text(errors="replace").split() if (
            parent / "cgroup.subtree_control"
        ).exists() else False:
            child = _try_child(parent, {"memory.max": str(LIMIT), "memory.swap.max": "0"})
    if child is None:
        pytest.skip("cannot create a memory cgroup with a small limit here (needs root and a writable "
                    "v1 memory hierarchy, or a v2 cgroup with the memory controller delegated)")
    try:
        yield child
    finally:
        def removed() -> bool:
            with contextlib.suppress(FileNotFoundError):
                child.rmdir()  # EBUSY until the last process in it is reaped
            return not child.exists()

        poll(removed, 20, f"{child} to be removable")


def test_a_kernel_oom_kill_is_classified_as_oom(tmp_path: Path, small_memory_cgroup: Path) -> None:
    procs = small_memory_cgroup / "cgroup.procs"
    sims = tmp_path / "gpus.json"
    sims.write_text(json.dumps([{"index": 0, "uuid": "GPU-12345678-aaaa-bbbb-cccc-000000000000", "name": "Sim",
                                 "total_mib": 24576, "free_mib": 23000}]))
    state = tmp_path / "fake-state"
    state.mkdir()

    def join_cgroup() -> None:  # in the child, before exec: the worker inherits it
        procs.write_text(str(os.getpid()))

    s = Supervisor(
        tmp_path,
        {
            "gpu": {"simulate_gpus": str(sims)},
            "worker": {"health_interval_s": 0.2, "health_timeout_s": 2.0, "stop_timeout_s": 3.0},
            "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.4, "oom_settle_timeout_s": 1.0},
        },
        env={"FAKE_WORKER_ALLOCATE_MIB": "1024", "FAKE_WORKER_STATE_DIR": str(state)},
        fake_worker=True,
        preexec=join_cgroup,
    )
    try:
        st = s.wait_state("ready", 90, pred=lambda st: st["restarts"] >= 1)
        first = st["restart_history"][0]
        assert first["kind"] == "oom", st["restart_history"]
        assert "host OOM killer" in first["reason"]
        assert st["oom_adjustment"]  # the OOM ladder ran
        counter = next(f for f in (small_memory_cgroup / "memory.oom_control", small_memory_cgroup / "memory.events")
                       if f.exists())
        assert (parse_oom_kill(counter.read_text()) or 0) >= 1  # the kernel did kill, in our cgroup
        assert s.stop() == 0
    finally:
        s.kill_hard()
