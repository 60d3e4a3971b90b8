"""The dependency directions of STYLE.md, checked on the source itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
            if node.module == "worker":
                out.update(f"worker.{a.name}" for a in node.names)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("worker."):
            out.add(node.module)
    return out


def test_worker_never_imports_the_supervisor() -> None:
    for f in (REPO / "worker").rglob("*.py"):
        assert "supervisor" not in imports_of(f), f


def test_supervisor_uses_only_the_worker_protocol() -> None:
    for f in (REPO / "supervisor").glob("*.py"):
        worker_mods = {m for m in imports_of(f) if m.startswith("worker")}
        assert worker_mods <= {"worker", "worker.protocol"}, (f, worker_mods)


def test_one_module_each_imports_llama_cpp_and_pynvml() -> None:
    llama = {f.relative_to(REPO).as_posix() for f in REPO.glob("*/**/*.py") if "llama_cpp" in imports_of(f)}
    nvml = {f.relative_to(REPO).as_posix() for f in REPO.glob("*/**/*.py") if "pynvml" in imports_of(f)}
    # bench/ and tests/ use llama_cpp directly on purpose; in the product only the engine
    # package does (one module per seam: loading, prompts, sampling, the batch loop...).
    product = {p for p in llama if p.startswith(("supervisor/", "worker/"))}
    assert product and all(p.startswith("worker/engine/") for p in product), product
    assert {p for p in nvml if p.startswith(("supervisor/", "worker/"))} == {"supervisor/nvml.py"}


def test_plan_runs_without_the_serving_stack(tmp_path: Path) -> None:
    # issue 22: `vram-llm plan` (one model, and several placed together) plans without
    # aiohttp or psutil: it imports nothing of the serving stack (planning.py's rule).
    from supervisor.default_model import default_model_path

    model = default_model_path()
    cfg = tmp_path / "c.toml"
    cfg.write_text("".join(f'[[models]]\nid = "{m}"\npath = "{model}"\n' for m in ("a", "b", "c")))
    sim = REPO / "tests" / "sim" / "one_gpu.json"
    code = (
        "import sys, json, io, contextlib\n"
        "for m in ('aiohttp', 'psutil', 'llama_cpp', 'uvloop', 'prometheus_client'):\n"
        "    sys.modules[m] = None\n"
        "import supervisor.cli\n"
        "assert supervisor.cli.main(['plan']) == 0\n"
        "out = io.StringIO()\n"
        f"with contextlib.redirect_stdout(out):\n"
        f"    assert supervisor.cli.main(['plan', '--json', '--config', {str(cfg)!r}, '--simulate-gpus', {str(sim)!r}]) == 0\n"
        "assert list(json.loads(out.getvalue())) == ['a', 'b', 'c']\n"
        "assert 'aiohttp' not in sys.modules or sys.modules['aiohttp'] is None\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_supervisor_starts_without_llama_cpp() -> None:
    # A None entry in sys.modules makes `import llama_cpp` fail, as if not installed.
    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "import supervisor.cli, supervisor.app, supervisor.worker_process, supervisor.proxy\n"
        "assert supervisor.cli.main(['plan', '--json']) == 0\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---- one owner per piece of state (issue 22) ------------------------------------------------

# The request counters and admission's own state: written in supervisor/admission.py only.
REQUEST_COUNTERS = frozenset({"in_flight", "waiting", "served", "ended", "generating", "last_used", "_held",
                              "_refusal", "_closed"})


def _assigned_attributes(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute):
                    out.append((node.lineno, sub.attr))
    return out


def test_only_admission_writes_request_counters() -> None:
    for f in sorted((REPO / "supervisor").glob("*.py")):
        if f.name == "admission.py":
            continue
        wrote = [(line, a) for line, a in _assigned_attributes(ast.parse(f.read_text())) if a in REQUEST_COUNTERS]
        assert not wrote, f"{f.name} assigns request counters (only admission.py may): {wrote}"


def _polling_loops(tree: ast.AST) -> list[tuple[str, int]]:
    """``while ...:`` loops whose body sleeps: (enclosing function, line)."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for loop in ast.walk(fn):
            if isinstance(loop, ast.While) and any(
                isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "sleep"
                for c in ast.walk(loop)
            ):
                found.append((fn.name, loop.lineno))
    return found


# Polling loops the fleet may keep, each with its reason.
FLEET_POLLS_ALLOWED = {
    "wait_freed": "reads NVML, an outside reading no task of ours owns or could announce",
}


def test_the_fleet_awaits_answers_and_never_polls() -> None:
    for f in sorted((REPO / "supervisor").glob("fleet*.py")):
        loops = [(fn, line) for fn, line in _polling_loops(ast.parse(f.read_text())) if fn not in FLEET_POLLS_ALLOWED]
        assert not loops, f"{f.name}: polling loops (await the owner's answer or event instead): {loops}"


MAX_CLASS_LINES = 300
# Classes allowed to be longer, each with its reason (none now: worker/server.py went into
# worker/api/, the batch loop's saved states into worker/engine/saved.py).
LONG_CLASSES_ALLOWED: dict[tuple[str, str], str] = {}


def test_no_class_is_longer_than_about_300_lines() -> None:
    long = []
    for f in sorted([*(REPO / "supervisor").rglob("*.py"), *(REPO / "worker").rglob("*.py")]):
        rel = f.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CLASS_LINES and (rel, node.name) not in LONG_CLASSES_ALLOWED:
                    long.append(f"{rel}:{node.name} ({n} lines)")
    assert not long, long


def test_only_the_process_adapter_reads_the_os_about_processes() -> None:
    # spawn.py is the process adapter (start, probe, stop, RSS/CPU, descendants); /status and
    # /metrics shape its readings through status_view, never with psutil of their own.
    users = {f.name for f in (REPO / "supervisor").glob("*.py") if "psutil" in imports_of(f)}
    assert users == {"spawn.py"}, users
