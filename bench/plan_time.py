"""Planning time vs model file size (a benchmark, not a test).

Writes sparse GGUF files of growing size (tests/gguf_factory.py: real headers, no data
blocks on disk), then times read_model_facts + plan for each, plus the real SmolLM2 file.
Planning reads only the header, so the time follows the header (vocabulary, tensor count),
not the file size.

    .venv/bin/python bench/plan_time.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.default_model import default_model_path  # noqa: E402
from supervisor.gpus import SimulatedProbe  # noqa: E402
from supervisor.model import read_model_facts  # noqa: E402
from supervisor.planner import PlanSettings, plan  # noqa: E402
from tests.gguf_factory import GGMLQuantizationType as Q  # noqa: E402
from tests.gguf_factory import Shape, write_model  # noqa: E402

SHAPES = {
    "1B-class f16": Shape(n_layers=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, vocab=128256, ttype=Q.F16),
    "8B-class q4_k": Shape(n_layers=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, vocab=128256, ttype=Q.Q4_K),
    "70B-class q4_k": Shape(n_layers=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=128256, ttype=Q.Q4_K),
    "70B-class q8_0": Shape(n_layers=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=128256, ttype=Q.Q8_0),
    "120-layer f16": Shape(n_layers=120, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=256000, ttype=Q.F16),
}
REPEAT = 20


def time_plan(path: Path) -> tuple[float, float, int]:
    gpus = SimulatedProbe(REPO / "tests" / "sim" / "mix_24_12_4.json").read().gpus
    best_read = best_plan = float("inf")
    size = 0
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        facts = read_model_facts(path)
        t1 = time.perf_counter()
        plan(gpus, facts, PlanSettings())
        t2 = time.perf_counter()
        best_read, best_plan, size = min(best_read, t1 - t0), min(best_plan, t2 - t1), facts.file_size
    return best_read * 1000, best_plan * 1000, size


def main() -> None:
    rows = [("SmolLM2-135M q4_1 (real)", *time_plan(default_model_path()))]
    with tempfile.TemporaryDirectory() as d:
        for name, shape in SHAPES.items():
            p = write_model(Path(d) / f"{name.replace(' ', '_')}.gguf", shape)
            rows.append((name, *time_plan(p)))
            p.unlink()
    print(f"{'model':<26} {'file GiB':>9} {'header ms':>10} {'plan ms':>8} {'total ms':>9}")
    for name, read_ms, plan_ms, size in rows:
        print(f"{name:<26} {size / 2**30:>9.2f} {read_ms:>10.2f} {plan_ms:>8.2f} {read_ms + plan_ms:>9.2f}")
    print(f"(best of {REPEAT}; every file but the real one is sparse: a real header, no data blocks)")


if __name__ == "__main__":
    main()
