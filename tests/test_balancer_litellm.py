"""Two vram-llm instances as two deployments of one model behind LiteLLM's proxy (issue 26),
with the README's configuration: least-busy routing, retries, cooldown of a failing
deployment.

LiteLLM is heavy (hundreds of MB), so it lives in a virtual environment of its own, made
once and reused: ``$VRAM_LLM_LITELLM_VENV``, else ``~/.cache/vram-llm/litellm-venv``
(.ci/run makes it; this test makes it when it can, else skips saying why).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.balancers import Pool, behind_balancer, kill_one_worker_under_load, sigterm_one_under_load

VENV = Path(os.environ.get("VRAM_LLM_LITELLM_VENV", Path.home() / ".cache" / "vram-llm" / "litellm-venv"))
MASTER_KEY = "sk-vram-llm-test-0123456789abcdef"  # LiteLLM's proxy refuses to start without one
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}
# The first run may install LiteLLM (minutes); later ones find it.
pytestmark = pytest.mark.timeout(1200)


def litellm_or_skip() -> Path:
    binary = VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    if os.environ.get("VRAM_LLM_NO_INSTALL"):
        pytest.skip(f"LiteLLM is not installed in {VENV} and VRAM_LLM_NO_INSTALL is set")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=120)
        done = subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
                              capture_output=True, timeout=800)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"LiteLLM could not be installed in {VENV}: {e}")
    if not binary.exists():
        pytest.skip(f"LiteLLM could not be installed in {VENV} (pip exit {done.returncode}: "
                    f"{done.stderr.decode(errors='replace')[-300:]})")
    return binary


def litellm_config(members: dict[str, int]) -> str:
    """The README's "Several boxes" LiteLLM recipe: one model name, one deployment per box."""
    deployments = "".join(f"""\
  - model_name: smol
    litellm_params:
      model: openai/smol
      api_base: http://127.0.0.1:{p}/v1
      api_key: none
""" for p in members.values())
    return f"""\
model_list:
{deployments}router_settings:
  routing_strategy: least-busy
  num_retries: 3
  retry_after: 0
  allowed_fails: 1
  cooldown_time: 10
litellm_settings:
  num_retries: 3
  request_timeout: 60
general_settings:
  master_key: {MASTER_KEY}
"""


@pytest.fixture
def litellm_pool(tmp_path: Path) -> Iterator[tuple[Pool, str]]:
    binary = litellm_or_skip()

    def start(pool: Pool, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
        cfg = tmp_path / "litellm.yaml"
        cfg.write_text(litellm_config({n: s.port for n, s in pool.members.items()}))
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
        return subprocess.Popen([str(binary), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)

    with behind_balancer(tmp_path, "litellm", start, headers=AUTH, model="smol", timeout=120) as got:
        yield got


def test_litellm_spreads_and_a_sigterm_loses_no_request(litellm_pool: tuple[Pool, str]) -> None:
    """4 looping clients through LiteLLM: both deployments serve; SIGTERM to one mid-load:
    LiteLLM retries what that one refuses (503 shutting_down, then a refused connection) on
    the other, and not one request fails."""
    sigterm_one_under_load(*litellm_pool, headers=AUTH, model="smol", timeout=120)


def test_litellm_keeps_serving_when_one_worker_is_killed(litellm_pool: tuple[Pool, str]) -> None:
    """kill -9 of instance b's worker under 4 looping clients: no request fails (b's
    supervisor resends what its dead worker held; LiteLLM retries anything b refuses)."""
    kill_one_worker_under_load(*litellm_pool, headers=AUTH, model="smol", timeout=120)
