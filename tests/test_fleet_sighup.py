"""SIGHUP applies the model list: process tests with the fake worker on simulated GPUs.

A model added to `[[models]]` gets a manager and is routable; a removed one is refused at
once (404 model_not_found) while the requests it answers finish, then its worker and its
socket directory go; a bad new list keeps the old one entirely.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.config import ModelEntry
from supervisor.fleet import ListChange, list_change
from tests import test_fleet
from tests.supervisor_harness import Supervisor, notify_listener, poll
from tests.test_fleet import ROOM_FOR_TWO, chat, models_state, models_toml, remember_pids

fleet = test_fleet.fleet  # the fixture (tests/test_fleet.py), used by name


def entries(*specs: str) -> dict[str, ModelEntry]:
    """"a" or "a:2048" (id, ctx_size) -> entries in that order."""
    out = {}
    for spec in specs:
        mid, _, ctx = spec.partition(":")
        out[mid] = ModelEntry(id=mid, path=f"/m/{mid}.gguf", ctx_size=int(ctx or 4096))
    return out


# old list, new list, shared settings unchanged, loaded, failed -> added, removed, restarted
LIST_CHANGES = [
    # The list unchanged: every loaded model restarts, as a SIGHUP always did.
    (("a", "b"), ("a", "b"), True, {"a", "b"}, set(), ((), (), ("a", "b"))),
    (("a", "b"), ("a", "b:2048"), True, {"a"}, set(), ((), (), ("a",))),  # b parked: loads with it later
    # Models come or go: only the loaded ones whose settings changed restart.
    (("a",), ("a", "b"), True, {"a"}, set(), (("b",), (), ())),
    (("a", "b"), ("a",), True, {"a", "b"}, set(), ((), ("b",), ())),
    (("a", "b"), ("a:2048", "c"), True, {"a", "b"}, set(), (("c",), ("b",), ("a",))),
    (("a", "b"), ("b", "a", "c"), True, {"a", "b"}, set(), (("c",), (), ())),  # order alone changes nothing
    (("a", "b"), ("a", "b", "c"), False, {"a", "b"}, set(), (("c",), (), ("a", "b"))),  # shared settings
    (("a", "b"), ("a", "b", "c"), True, {"a", "b"}, {"b"}, (("c",), (), ("b",))),  # a failed one is retried
    (("a",), ("b",), True, {"a"}, set(), (("b",), ("a",), ())),  # one model replaced by another
]


@pytest.mark.parametrize(("old", "new", "shared_same", "loaded", "failed", "want"), LIST_CHANGES)
def test_list_change(
    old: tuple[str, ...], new: tuple[str, ...], shared_same: bool, loaded: set[str], failed: set[str],
    want: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
) -> None:
    got = list_change(entries(*old), entries(*new), shared_same=shared_same, loaded=loaded, failed=failed)
    assert got == ListChange(*want)


def sighup_with_models(s: Supervisor, models: list[Any]) -> None:
    """Rewrite the [[models]] tables of the supervisor's config file and send SIGHUP."""
    text = s.config_path.read_text()
    head = text[: text.index("[[models]]")] if "[[models]]" in text else text
    s.config_path.write_text(head + models_toml(models))
    s.proc.send_signal(signal.SIGHUP)


def model_ids(s: Supervisor) -> list[str]:
    code, body = s.get("/v1/models")
    assert code == 200, body
    return [m["id"] for m in body["data"]]


def worker_of(s: Supervisor, model: str) -> psutil.Process | None:
    """The live worker process of ``model`` (its spec file is in the model's socket dir)."""
    for c in psutil.Process(s.proc.pid).children(recursive=True):
        try:
            if any(f"/{model}/worker-" in a for a in c.cmdline()):
                return c
        except psutil.Error:
            continue
    return None


def open_stream(s: Supervisor, model: str, max_tokens: int = 100) -> Any:
    """A streamed chat completion (read it with readline/read, in a with block)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True}
    req = urllib.request.Request(
        s.base + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=60)


def model_dirs(s: Supervisor) -> set[str]:
    (rt,) = [p for p in s.runtime.iterdir() if p.is_dir()]  # vram-llm-XXXX, this server's
    return {p.name for p in rt.iterdir() if p.is_dir()}


def metrics(s: Supervisor) -> str:
    with urllib.request.urlopen(s.base + "/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_sighup_adds_a_model_to_a_single_model_server(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a"])
    st = s.wait_ready(60)
    pid_a = st["worker"]["pid"]
    # One model: any "model" is served by it, as before.
    code, body = chat(s, "gpt-4o")
    assert code == 200 and body["model"] == "a"
    sighup_with_models(s, ["a", "b"])
    poll(lambda: model_ids(s) == ["a", "b"], 30, "b listed")
    assert models_state(s) == {"a": "ready", "b": "unloaded"}  # added: parked until asked for
    code, body = chat(s, "b")
    assert code == 200 and body["model"] == "b"
    remember_pids(s)
    assert chat(s, "gpt-4o")[1]["error"]["code"] == "model_not_found"  # several models: ids count
    assert chat(s, None)[1]["model"] == "a"
    st = s.status()
    assert st["worker"]["pid"] == pid_a and st["restarts"] == 0  # a kept its worker
    assert {m["id"] for m in st["models"]} == {"a", "b"}
    assert 'vram_llm_slots_busy{model="b"}' in metrics(s)


def test_sighup_removes_a_model_while_it_streams(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b", "c"], env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"})
    assert chat(s, "b")[0] == 200
    remember_pids(s)
    worker_b = worker_of(s, "b")
    assert worker_b is not None and "b" in model_dirs(s)
    with open_stream(s, "b") as r:
        first = r.readline()
        assert first.startswith(b"data: ")
        sighup_with_models(s, ["a", "c"])
        poll(lambda: model_ids(s) == ["a", "c"], 30, "b no longer listed")
        # New requests for b are refused at once while its stream goes on.
        code, body = chat(s, "b")
        assert code == 404 and body["error"]["code"] == "model_not_found"
        row = next(m for m in s.status()["models"] if m["id"] == "b")
        assert row["state"] == "stopping" and row["in_flight"] == 1, row
        assert worker_b.is_running()
        rest = r.read()
    events = [first] + [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1].strip() == b"data: [DONE]" and not any(b'"error"' in e for e in events)
    assert len(events) >= 100
    # Then its worker stops, its sockets go, and it leaves /status and the metrics.
    worker_b.wait(30)
    poll(lambda: "b" not in model_dirs(s), 30, "b's socket dir removed")
    poll(lambda: [m["id"] for m in s.status()["models"]] == ["a", "c"], 30, "b gone from /status")
    assert 'model="b"' not in metrics(s).split("vram_llm_queue_depth", 1)[1]
    assert chat(s, "b")[0] == 404
    assert s.status()["restarts"] == 0  # a kept its worker


def test_sighup_changes_the_first_model_and_drops_to_one(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b"])
    poll(lambda: models_state(s)["a"] == "ready", 60, "a ready")
    sighup_with_models(s, ["b"])
    # The new first model loads as at start and answers requests without "model".
    poll(lambda: chat(s, None)[1]["model"] == "b", 60, "b loaded as the first")
    assert s.get("/health")[0] == 200 and s.status()["state"] == "ready"
    remember_pids(s)
    # One model left: it answers whatever "model" a request names, as a server started with
    # one, except the id of a model that was removed: a 404, not a silent stand-in.
    code, body = chat(s, "gpt-4o")
    assert code == 200 and body["model"] == "b"
    code, body = chat(s, "a")
    assert code == 404 and body["error"]["code"] == "model_not_found", body
    poll(lambda: worker_of(s, "a") is None and "a" not in model_dirs(s), 30, "a's worker and sockets gone")
    # Back to several: the old single one keeps serving, the added one loads on demand.
    sighup_with_models(s, ["b", "a"])
    poll(lambda: model_ids(s) == ["b", "a"], 30, "a listed again")
    assert models_state(s) == {"b": "ready", "a": "unloaded"}
    code, body = chat(s, "a")
    assert code == 200 and body["model"] == "a"
    remember_pids(s)


def test_sighup_with_a_bad_model_list_keeps_the_old_one(fleet: Any, tmp_path: Path) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b"])
    poll(lambda: models_state(s)["a"] == "ready", 60, "a ready")
    gen = s.status()["worker"]["generation"]
    sighup_with_models(s, ["a", {"id": "c", "path": str(tmp_path / "missing.gguf")}])
    # Nothing changed: b is still there, c is not; a restarted with its old settings, as a
    # SIGHUP with a bad configuration always did.
    st = s.wait_state("ready", 60, lambda st: st["worker"]["generation"] > gen)
    assert models_state(s) == {"a": "ready", "b": "unloaded"}
    assert chat(s, "b")[0] == 200 and chat(s, "c")[0] == 404
    remember_pids(s)
    sighup_with_models(s, ["a", "a"])  # an id twice
    s.wait_state("ready", 60, lambda st2: st2["worker"]["generation"] > st["worker"]["generation"])
    assert set(models_state(s)) == {"a", "b"}


def test_sighup_while_requests_stream_to_kept_models_drops_none(fleet: Any) -> None:
    """Clients on a and b while c is added and b's settings change: every answer is whole."""
    s = fleet(ROOM_FOR_TWO, ["a", "b"], env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.01"})
    assert chat(s, "b")[0] == 200
    worker_a = worker_of(s, "a")
    results: list[tuple[str, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(model: str) -> None:
        while not stop.is_set():
            code, _ = chat(s, model, max_tokens=20)
            with lock:
                results.append((model, code))

    threads = [threading.Thread(target=client, args=(m,)) for m in ("a", "b")]
    for t in threads:
        t.start()
    try:
        poll(lambda: len(results) >= 4, 30, "clients running")
        sighup_with_models(s, ["a", {"id": "b", "ctx_size": 2048}, "c"])
        poll(lambda: status_ctx(s, "b") == 2048, 60, "b restarted with its new ctx_size")
        n = len(results)
        poll(lambda: len(results) >= n + 4, 30, "more answers after the reload")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    remember_pids(s)
    assert all(code == 200 for _, code in results), results
    assert worker_of(s, "a") == worker_a  # a's settings did not change: it kept its worker
    assert chat(s, "c")[0] == 200
    remember_pids(s)


def status_ctx(s: Supervisor, model: str) -> int | None:
    """n_ctx of the model's current worker, from its spec file (the fake worker echoes it)."""
    p = worker_of(s, model)
    if p is None:
        return None
    spec = next(a for a in p.cmdline() if a.endswith(".spec.json"))
    return int(json.loads(Path(spec).read_text())["n_ctx"])


def test_a_model_listed_again_while_it_drains_comes_back_after(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b", "c"], env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"})
    assert chat(s, "b")[0] == 200
    remember_pids(s)
    old_b = worker_of(s, "b")
    with open_stream(s, "b") as r:
        r.readline()
        sighup_with_models(s, ["a", "c"])
        poll(lambda: model_ids(s) == ["a", "c"], 30, "b removed")
        sighup_with_models(s, ["a", "b", "c"])
        poll(lambda: model_ids(s) == ["a", "b", "c"], 30, "b listed again")
        rest = r.read()
    assert rest.rstrip().endswith(b"data: [DONE]") and b'"error"' not in rest
    # The drained worker goes; b then gets a new manager and serves again.
    poll(lambda: chat(s, "b")[0] == 200, 60, "b served again")
    remember_pids(s)
    assert old_b is not None and not old_b.is_running()
    assert worker_of(s, "b") not in (None, old_b)


def test_sighup_ends_with_ready_for_systemd(fleet: Any, tmp_path: Path) -> None:
    """RELOADING=1 must be followed by READY=1, or `systemctl reload` waits for its timeout."""
    path = str(tmp_path / "notify.sock")
    with notify_listener(path) as msgs:
        s = fleet(ROOM_FOR_TWO, ["a"], env={"NOTIFY_SOCKET": path})
        poll(lambda: any("READY=1" in m for m in msgs), 60, "READY=1 at start")
        sighup_with_models(s, ["a", "b"])
        poll(lambda: model_ids(s) == ["a", "b"], 30, "b listed")

        def ready_after_reloading() -> bool:
            seen = [m for m in list(msgs) if "READY=1" in m or "RELOADING=1" in m]
            return any("RELOADING=1" in m for m in seen) and "READY=1" in seen[-1]

        poll(ready_after_reloading, 10, "READY=1 after RELOADING=1")


def test_sighup_with_a_new_model_path_serves_the_new_file(tmp_path: Path) -> None:
    """One [model] whose path changes: its id (the file stem) changes with it, so the old
    model drains and goes and the new one is served, from the same runtime dir."""
    from supervisor.default_model import default_model_path

    other = tmp_path / "other.gguf"
    other.symlink_to(default_model_path())
    s = Supervisor(tmp_path, {"model": {"path": str(default_model_path())}}, fake_worker=True,
                   env={"FAKE_WORKER_LOAD_S": "0.2"})
    try:
        old = s.wait_ready(60)["worker"]["pid"]
        text = s.config_path.read_text().replace(json.dumps(str(default_model_path())), json.dumps(str(other)))
        s.config_path.write_text(text)
        s.proc.send_signal(signal.SIGHUP)
        st = s.wait_state("ready", 60, lambda st: st["supervisor"]["model"] == str(other))
        assert st["worker"]["pid"] != old
        code, body = chat(s, None)
        assert code == 200 and body["model"] == "other"
        poll(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE, 30,
             "the old worker gone")
        (rt,) = [p for p in s.runtime.iterdir() if p.is_dir()]
        poll(lambda: not list(rt.glob("worker-*")), 30, "the old worker's socket and spec removed")
        assert s.stop() == 0
    finally:
        s.kill_hard()


def test_a_request_waiting_for_a_removed_model_is_answered_at_once(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b", "c"], env={"FAKE_WORKER_LOAD_S": "3"})
    got: list[tuple[int, Any]] = []
    t = threading.Thread(target=lambda: got.append(chat(s, "b")))
    t.start()
    poll(lambda: models_state(s)["b"] in ("starting", "loading"), 30, "b loading for the request")
    sighup_with_models(s, ["a", "c"])
    t.join(10)  # well before b's load would have ended
    assert got and got[0][0] == 503 and "removed from the configuration" in got[0][1]["error"]["message"], got
    remember_pids(s)
    poll(lambda: worker_of(s, "b") is None and "b" not in model_dirs(s), 30, "b's worker and sockets gone")
