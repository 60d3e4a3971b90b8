"""Time of one placement decision with 8 GPUs and 20 models (a benchmark, not a test).

The issue's budget is under 10 ms. Cases: the model fits beside the others (no eviction),
one idle model must go (the least recently used), several must go, and only busy models
stand in the way (the answer is to wait). Models are synthetic 8B-class and 70B-class
headers (tests/test_placement.py's facts), so only the decision is timed.

    .venv/bin/python bench/placement_time.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.inventory import GpuInfo  # noqa: E402
from supervisor.placement import ModelInfo, Resident, place  # noqa: E402
from supervisor.planner import PlanSettings  # noqa: E402
from tests.test_placement import facts  # noqa: E402

N_GPUS = 8
N_MODELS = 20
TOTAL_MIB = 24 * 1024
REPEAT = 200


def scenario(resident_count: int, busy: bool, want_layers: int) -> tuple[list[GpuInfo], dict[str, ModelInfo], list[Resident], str]:
    one_slot = PlanSettings(parallel=1)
    models = {
        f"m{i}": ModelInfo(f"m{i}", facts(32, 220, f"m{i}"), one_slot, pinned=False, refuse_when_no_room=False,
                           placement="spread", replicas=1)
        for i in range(N_MODELS - 1)
    }
    models["want"] = ModelInfo("want", facts(want_layers, 450, "want"), one_slot, pinned=False, refuse_when_no_room=False,
                           placement="spread", replicas=1)
    residents = []
    used = [0] * N_GPUS
    for i in range(resident_count):
        g = i % N_GPUS
        residents.append(Resident(f"m{i}", {f"GPU-{g}": 8200}, last_used=float(i), busy=busy))
        used[g] += 8200
    gpus = [
        GpuInfo(i, f"GPU-{i}", "sim", f"00000000:{i + 1:02X}:00.0", TOTAL_MIB, max(TOTAL_MIB - used[i], 0), used[i])
        for i in range(N_GPUS)
    ]
    return gpus, models, residents, "want"


def main() -> None:
    cases = {
        "fits beside the others": scenario(8, False, 20),
        "evict a few (LRU)": scenario(16, False, 130),
        "evict several": scenario(19, False, 100),
        "only busy ones in the way": scenario(19, True, 100),
    }
    print(f"{N_GPUS} GPUs x {TOTAL_MIB} MiB, {N_MODELS} models; best / median of {REPEAT}")
    print(f"{'case':<28} {'evict':>5} {'wait':>5} {'best ms':>8} {'p50 ms':>8}")
    for name, (gpus, models, residents, want) in cases.items():
        times = []
        for _ in range(REPEAT):
            t0 = time.perf_counter()
            d = place(gpus, models, residents, want)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"{name:<28} {len(d.evict):>5} {len(d.wait_for):>5} {min(times):>8.2f} {statistics.median(times):>8.2f}")


if __name__ == "__main__":
    main()
