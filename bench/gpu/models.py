"""GGUF models for the GPU check, written with the ``gguf`` package, weights all zero.

Only the header is written; the tensor data is a sparse extension of the file
(``truncate``), so a 2 GB model takes milliseconds to write and no disk. All-zero bytes are
a valid block of every ggml type (Q8_0/Q4_1 scales 0.0, not NaN), so llama.cpp loads the
model and computes finite (meaningless) logits: enough to measure memory.

- ``smollm2_clone``: the default model's exact shape (metadata incl. tokenizer and chat
  template, tensor names/shapes/types) from a JSON dump made by extract_meta.py.
- ``llama_model``: a llama-architecture model of any shape, reusing that tokenizer.
"""

from __future__ import annotations

import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

_DUMMY = np.dtype(np.float32)  # add_tensor_info wants a dtype; raw_dtype is what counts


def load_meta(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    meta: dict[str, Any] = json.loads(data)
    return meta


def nbytes_of(ne: list[int], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in ne:
        n *= d
    if ne[0] % block:
        raise ValueError(f"row of {ne[0]} elements is not a multiple of the {qtype.name} block ({block})")
    return n // block * size


def write_gguf(
    path: Path,
    fields: list[tuple[str, GGUFValueType, GGUFValueType | None, Any]],
    tensors: list[tuple[str, list[int], GGMLQuantizationType]],
    arch: str = "llama",
) -> int:
    """Write header + tensor table, then extend the file sparsely; returns the file size."""
    w = GGUFWriter(path, arch)
    for key, vtype, sub, value in fields:
        if key == "general.architecture":
            continue  # GGUFWriter adds it
        w.add_key_value(key, value, vtype, sub)
    data_bytes = 0
    for name, ne, qtype in tensors:
        nb = nbytes_of(ne, qtype)
        # numpy order (slowest first): the writer reverses it back to ggml's ne.
        w.add_tensor_info(name, list(reversed(ne)), _DUMMY, nb, raw_dtype=qtype)
        data_bytes += GGUFWriter.ggml_pad(nb, w.data_alignment)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    start = GGUFWriter.ggml_pad(fout.tell(), w.data_alignment)
    fout.truncate(start + data_bytes)  # zeros: padding and every tensor's data
    w.close()
    return start + data_bytes


def _fields_of(meta: dict[str, Any]) -> list[tuple[str, GGUFValueType, GGUFValueType | None, Any]]:
    out = []
    for f in meta["fields"]:
        sub = GGUFValueType[f["sub_type"]] if f["sub_type"] else None
        out.append((f["key"], GGUFValueType[f["type"]], sub, f["value"]))
    return out


def smollm2_clone(meta: dict[str, Any], path: Path) -> int:
    tensors = [(t["name"], list(t["ne"]), GGMLQuantizationType[t["type"]]) for t in meta["tensors"]]
    return write_gguf(path, _fields_of(meta), tensors)


@dataclass(frozen=True)
class LlamaShape:
    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    qtype: GGMLQuantizationType = GGMLQuantizationType.Q8_0
    tied: bool = False  # no output.weight: llama.cpp reuses token_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


_FILE_TYPE = {GGMLQuantizationType.Q8_0: 7, GGMLQuantizationType.F16: 1, GGMLQuantizationType.Q4_0: 2}


def llama_model(meta: dict[str, Any], shape: LlamaShape, path: Path) -> int:
    """A llama model of ``shape`` with the tokenizer (and chat template) of ``meta``."""
    tok = [f for f in _fields_of(meta) if f[0].startswith("tokenizer.")]
    n_vocab = next(len(v) for k, _, _, v in tok if k == "tokenizer.ggml.tokens")
    s, U32, F32 = shape, GGUFValueType.UINT32, GGUFValueType.FLOAT32
    fields: list[tuple[str, GGUFValueType, GGUFValueType | None, Any]] = [
        ("general.type", GGUFValueType.STRING, None, "model"),
        ("general.name", GGUFValueType.STRING, None, s.name),
        ("llama.block_count", U32, None, s.n_layer),
        ("llama.context_length", U32, None, s.n_ctx_train),
        ("llama.embedding_length", U32, None, s.n_embd),
        ("llama.feed_forward_length", U32, None, s.n_ff),
        ("llama.attention.head_count", U32, None, s.n_head),
        ("llama.attention.head_count_kv", U32, None, s.n_head_kv),
        ("llama.rope.freq_base", F32, None, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32, None, 1e-5),
        ("general.file_type", U32, None, _FILE_TYPE.get(s.qtype, 7)),
        ("llama.vocab_size", U32, None, n_vocab),
        ("llama.rope.dimension_count", U32, None, s.head_dim),
        *tok,
        ("general.quantization_version", U32, None, 2),
    ]
    q, f32 = s.qtype, GGMLQuantizationType.F32
    kv = s.n_head_kv * s.head_dim
    tensors: list[tuple[str, list[int], GGMLQuantizationType]] = [("token_embd.weight", [s.n_embd, n_vocab], q)]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", [s.n_embd], f32),
            (b + "attn_q.weight", [s.n_embd, s.n_embd], q),
            (b + "attn_k.weight", [s.n_embd, kv], q),
            (b + "attn_v.weight", [s.n_embd, kv], q),
            (b + "attn_output.weight", [s.n_embd, s.n_embd], q),
            (b + "ffn_norm.weight", [s.n_embd], f32),
            (b + "ffn_gate.weight", [s.n_embd, s.n_ff], q),
            (b + "ffn_up.weight", [s.n_embd, s.n_ff], q),
            (b + "ffn_down.weight", [s.n_ff, s.n_embd], q),
        ]
    tensors.append(("output_norm.weight", [s.n_embd], f32))
    if not s.tied:
        tensors.append(("output.weight", [s.n_embd, n_vocab], q))
    return write_gguf(path, fields, tensors)
