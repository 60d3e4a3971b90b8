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
