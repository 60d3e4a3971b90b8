"""The prompt cache's disk tier (worker/engine/diskcache.py).

Pure file tests (format, checksum, budget, safety) with a temp directory, then the real
worker on SmolLM2: a conversation's next turn after ``kill -9`` of its worker is served
from disk (the cache counters say so, not the clock).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, WorkerProcess, default_model, short_tmpdir, wait_until, worker_spec
from tests.test_fleet import fleet
from worker.engine.diskcache import MIN_DISK_REUSE, DiskCache, UnsafeDirectory, checked_dir, settings_key

__all__ = ["fleet"]  # the fixture, imported to be used

KEY = b"k" * 32
T = list(range(100, 100 + 40))  # a 40-token "conversation"


@pytest.fixture
def cache_dir() -> Iterator[Path]:
    d = short_tmpdir("vram-llm-disk-")
    try:
        yield checked_dir(d / "m")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_state_round_trips_and_survives_a_new_index(cache_dir: Path) -> None:
    disk = DiskCache(cache_dir, KEY, 10 * 2**20)
    assert disk.put(T, b"state" * 100)
    again = DiskCache(cache_dir, KEY, 10 * 2**20)  # a restarted worker
    again.scan()
    found = again.best(T + [7, 8])
    assert found is not None and found[0] == len(T)
    assert again.load(found[1]) == bytearray(b"state" * 100)
    assert again.best(T[: MIN_DISK_REUSE - 1]) is None  # too short to be worth a read
    assert (again.stats.entries, again.stats.errors) == (1, 0)


def test_a_longer_state_replaces_its_prefix_and_the_budget_drops_the_oldest(cache_dir: Path) -> None:
    disk = DiskCache(cache_dir, KEY, 3000)
    assert disk.put(T[:20], b"a" * 900)
    assert disk.put(T, b"b" * 900)  # covers the first: it replaces it
    assert disk.stats.entries == 1
    other = [5] * 30
    assert disk.put(other, b"c" * 900)
    assert disk.put([6] * 30, b"d" * 900)  # over 3000 bytes with headers: the oldest goes
    assert disk.best(T) is None and disk.best(other) is not None
    assert len(list(cache_dir.glob("*.kv"))) == disk.stats.entries == 2
    assert not disk.put([9] * 30, b"e" * 5000)  # bigger than the whole budget


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_a_damaged_or_foreign_file_is_skipped_and_deleted(cache_dir: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    disk = DiskCache(cache_dir, KEY, 2**20)
    assert disk.put(T, b"x" * 1000)
    (f,) = cache_dir.glob("*.kv")
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[-10] ^= 0xFF  # same length: only the checksum can tell
    elif damage == "truncate":
        raw = raw[:-10]
    f.write_bytes(bytes(raw))
    reader = DiskCache(cache_dir, b"o" * 32 if damage == "foreign" else KEY, 2**20)
    reader.scan()
    found = reader.best(T)
    if found is not None:  # a flipped byte passes the header check: the read catches it
        assert reader.load(found[1]) is None
    assert reader.best(T) is None
    assert not f.exists()
    assert reader.stats.errors == 1
    assert any("damaged or foreign" in r.getMessage() for r in caplog.records)


def test_a_directory_others_can_write_to_is_refused(cache_dir: Path) -> None:
    os.chmod(cache_dir, 0o777)
    with pytest.raises(UnsafeDirectory, match="writable by other users"):
        checked_dir(cache_dir)


def test_the_key_changes_with_every_setting_that_changes_the_state(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    base = settings_key(str(model), 1024, False, "0.3.36")
    assert settings_key(str(model), 1024, False, "0.3.36") == base
    assert settings_key(str(model), 2048, False, "0.3.36") != base  # another context size
    assert settings_key(str(model), 1024, True, "0.3.36") != base  # V laid out for flash attention
    assert settings_key(str(model), 1024, False, "0.3.37") != base  # another llama.cpp
    model.write_bytes(b"GGUF" + b"\1" * 101)  # the file rewritten in place
    assert settings_key(str(model), 1024, False, "0.3.36") != base


def test_a_full_disk_turns_the_tier_off_with_a_warning(cache_dir: Path) -> None:
    # A file size limit makes writes fail the way a full disk does (EFBIG instead of
    # ENOSPC), in a child process so the limit stays there.
    code = f"""
import logging, resource, signal, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from worker.engine.diskcache import DiskCache
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
logging.basicConfig(level=logging.WARNING, format="%(message)s")
disk = DiskCache(Path({str(cache_dir)!r}), b"k" * 32, 2**20)
assert disk.put(list(range(30)), b"s" * 1000)
assert not disk.put(list(range(50, 80)), b"s" * 10000)
assert not disk.writable
assert not disk.put(list(range(90, 120)), b"s" * 10)  # off from now on
print("entries", disk.stats.entries, "errors", disk.stats.errors)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "entries 1 errors 1" in r.stdout
    assert "prompt cache on disk turned off (the file size limit is reached" in r.stderr
    assert not list(cache_dir.glob("*.tmp"))  # the half-written file is gone


def test_disk_writes_never_run_on_the_batch_loop_thread(tmp_path: Path) -> None:
    from supervisor.launch import default_spec
    from worker.engine import Engine, LlamaLog, Sampling

    threads: set[str] = set()
    real_put = DiskCache.put

    def put(self: DiskCache, tokens: list[int], data: bytes) -> bool:
        threads.add(threading.current_thread().name)
        return real_put(self, tokens, data)

    spec = default_spec(str(default_model()), "/nonexistent.sock", n_ctx=512, n_threads=2,
                        parallel=1, cache_ram_mib=0, cache_disk_mib=64, cache_dir=str(tmp_path / "cache"))
    log = LlamaLog(io.StringIO())
    log.install()
    eng = Engine(spec, log)
    eng.load(lambda _v: None)
    DiskCache.put = put  # type: ignore[method-assign]
    try:
        prompt = "The history of lighthouses, their keepers and the sea, told slowly. " * 3
        text = "".join(eng.generation(eng.prepare_completion(prompt, Sampling(max_tokens=4, temperature=0.0)),
                                      threading.Event()))
        assert eng.loop is not None and eng.loop.io is not None and eng.loop.io.disk is not None
        disk = eng.loop.io.disk
        wait_until(lambda: disk.stats.writes >= 1, 60, "the idle loop to save the conversation")
        assert threads == {"prompt-cache"}
        assert eng.loop.stats.snapshots >= 1  # what the loop itself did: one copy out of the KV cache
        assert text
    finally:
        DiskCache.put = real_put  # type: ignore[method-assign]
        eng.close()


SYSTEM = ("You are a careful assistant for a lighthouse museum. Answer questions about lighthouses, "
          "their keepers, lenses, foghorns and the ships they guided, in plain words. ") * 4


def _chat(c: httpx.Client, turns: list[dict[str, str]]) -> dict[str, object]:
    r = c.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_the_next_turn_after_kill_9_is_served_from_disk() -> None:
    workdir = short_tmpdir()
    spec = worker_spec(workdir, cache_disk_mib=256, cache_dir=str(workdir / "cache"), parallel=2)
    first = WorkerProcess(workdir, spec)
    second: WorkerProcess | None = None
    try:
        first.wait_ready(timeout=180)
        turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who kept the lights?"}]
        with first.client() as c:
            answer = _chat(c, turns)

        def saved() -> bool:
            r = first.health()
            return r is not None and r.json().get("disk_cache_entries", 0) >= 1

        wait_until(saved, 60, "the conversation to be saved to disk while the worker is idle")
        first.proc.kill()  # kill -9: nothing is flushed on the way out
        first.wait_exit()
        first.stop()

        second = WorkerProcess(workdir, spec)
        second.wait_ready(timeout=180)
        wait_until(lambda: (h := second.health()) is not None and h.json().get("disk_cache_entries", 0) >= 1,
                   60, "the new worker to index the saved states")
        msg = answer["choices"][0]["message"]  # type: ignore[index]
        turns += [{"role": "assistant", "content": msg["content"]}, {"role": "user", "content": "And the lenses?"}]
        with second.client() as c:
            _chat(c, turns)
        h = second.health()
        assert h is not None
        body = h.json()
        assert body["disk_cache_hits"] == 1
        assert body["disk_cache_tokens_saved"] > 150  # the system prompt and the first turn
    finally:
        first.stop()
        if second is not None:
            second.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_swapped_out_model_serves_its_next_turn_from_disk(fleet: Any, tmp_path: Path) -> None:
    # Two ids of SmolLM2 on one simulated GPU with room for one: asking for b unloads a;
    # a's next turn loads it again, and its conversation comes back from disk.
    from supervisor.default_model import default_model_path
    from tests.supervisor_harness import poll
    from tests.test_fleet_real import REAL_WORKER, SETTINGS, planned_mib

    mib = planned_mib(default_model_path(), tmp_path)
    sections = {**REAL_WORKER, "server": {"cache_dir": str(tmp_path / "cache")}}
    s = fleet(mib + 10 + 1024, [{"id": "a", **SETTINGS, "cache_disk_mib": 64}, {"id": "b", **SETTINGS}],
              sections=sections)
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who kept the lights?"}]
    code, first = s.post("/v1/chat/completions", {"model": "a", "messages": turns, "max_tokens": 8,
                                                  "temperature": 0}, timeout=180)
    assert code == 200, first

    def disk_of_a() -> dict[str, Any] | None:
        w = s.status().get("worker") or {}  # the first model's worker: a
        return w.get("disk_cache")

    poll(lambda: (d := disk_of_a()) is not None and d["entries"] >= 1, 60, "a's conversation saved to disk")
    code, body = s.post("/v1/chat/completions", {"model": "b", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2}, timeout=180)
    assert code == 200, body
    assert status_of(s)["a"]["state"] == "unloaded"  # swapped out to make room for b
    turns += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
              {"role": "user", "content": "And the lenses?"}]
    code, body = s.post("/v1/chat/completions", {"model": "a", "messages": turns, "max_tokens": 8,
                                                 "temperature": 0}, timeout=180)
    assert code == 200, body
    # /status shows the worker's last health reading (every health_interval_s).
    poll(lambda: (d := disk_of_a()) is not None and d["hits"] >= 1, 60, "a's /status to show the disk hit")
    d = disk_of_a()
    assert d is not None and d["hits"] == 1 and d["tokens_saved"] > 150
    row = status_of(s)["a"]
    assert row["swaps_in"] == 1
    assert row["disk_cache"]["hits"] == 1 and row["disk_cache"]["dir"] == d["dir"]  # per model in /status too


def status_of(s: Any) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in s.status()["models"]}


def test_a_shared_budget_drops_the_least_recently_used_state_of_any_model(tmp_path: Path) -> None:
    root = checked_dir(tmp_path / "cache")
    a = DiskCache(checked_dir(root / "model-a" / "k"), KEY, 2**20, root, 2500)
    b = DiskCache(checked_dir(root / "model-b" / "k"), KEY, 2**20, root, 2500)
    assert a.put(T, b"a" * 1000)
    os.utime(next(a.dir.glob("*.kv")), ns=(1, 1))  # the oldest state of all
    assert b.put([5] * 30, b"b" * 1000)
    assert b.put([6] * 30, b"c" * 1000)  # over 2500 bytes for both models: a's state goes
    assert not list(a.dir.glob("*.kv")) and len(list(b.dir.glob("*.kv"))) == 2
    found = a.best(T)  # a's index still lists it: reading it is a miss, and it is forgotten
    assert found is not None and a.load(found[1]) is None
    assert a.best(T) is None and a.stats.entries == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40), st.integers(0, 40))
def test_common_prefix_agrees_with_counting_token_by_token(a: list[int], tail: list[int], cut: int) -> None:
    from worker.engine.slots import common_prefix

    b = a[:cut] + tail  # often a long shared head, as prompts of one conversation have
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert common_prefix(a, b) == common_prefix(b, a) == common_prefix(tuple(a), b) == n
