"""Write GGUF files of given shapes with the ``gguf`` package, for planner tests.

Only the header is real: tensor infos carry true shapes, types and offsets, and the file
is then extended sparsely to its full size (``truncate``), so a "40 GB" model costs no disk
and proves the reader never touches tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

ALIGN = 32


@dataclass(frozen=True)
class Shape:
    arch: str = "llama"
    name: str = "factory model"
    n_layers: int = 30
    n_embd: int = 576
    n_ff: int = 1536
    n_head: int = 9
    n_head_kv: int = 3
    vocab: int = 49152
    n_ctx_train: int = 8192
    ttype: GGMLQuantizationType = GGMLQuantizationType.Q4_0
    tied: bool = False  # no output.weight: llama.cpp reuses token_embd
    chat_template: bool = True
    write_tokens: bool = True  # a tokenizer.ggml.tokens array of `vocab` strings
    head_dim: int | None = None  # explicit key/value length (default n_embd // n_head)


def tensor_nbytes(shape: tuple[int, ...], ttype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[ttype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def tensors_of(s: Shape) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, numpy-order shape, type) of a llama-like model."""
    f32 = GGMLQuantizationType.F32
    hd = s.head_dim or s.n_embd // s.n_head
    q_out, kv_out = s.n_head * hd, s.n_head_kv * hd
    out: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [
        ("token_embd.weight", (s.vocab, s.n_embd), s.ttype)
    ]
    for i in range(s.n_layers):
        out += [
            (f"blk.{i}.attn_norm.weight", (s.n_embd,), f32),
            (f"blk.{i}.attn_q.weight", (q_out, s.n_embd), s.ttype),
            (f"blk.{i}.attn_k.weight", (kv_out, s.n_embd), s.ttype),
            (f"blk.{i}.attn_v.weight", (kv_out, s.n_embd), s.ttype),
            (f"blk.{i}.attn_output.weight", (s.n_embd, q_out), s.ttype),
            (f"blk.{i}.ffn_norm.weight", (s.n_embd,), f32),
            (f"blk.{i}.ffn_gate.weight", (s.n_ff, s.n_embd), s.ttype),
            (f"blk.{i}.ffn_up.weight", (s.n_ff, s.n_embd), s.ttype),
            (f"blk.{i}.ffn_down.weight", (s.n_embd, s.n_ff), s.ttype),
        ]
    out.append(("output_norm.weight", (s.n_embd,), f32))
    if not s.tied:
        out.append(("output.weight", (s.vocab, s.n_embd), s.ttype))
    return out


def write_model(path: Path, s: Shape = Shape()) -> Path:
    w = GGUFWriter(path, s.arch)
    w.add_name(s.name)
    w.add_block_count(s.n_layers)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    if s.head_dim:
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    w.add_vocab_size(s.vocab)
    if s.write_tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(s.vocab)])
    if s.chat_template:
        w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    total = 0
    for name, shape, ttype in tensors_of(s):
        nb = tensor_nbytes(shape, ttype)
        w.add_tensor_info(name, shape, np.dtype(np.float32), nb, raw_dtype=ttype)
        total += GGUFWriter.ggml_pad(nb, ALIGN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    header = path.stat().st_size
    # Sparse: the data region exists (the reader checks the size) but holds no blocks.
    with open(path, "r+b") as f:
        f.truncate(GGUFWriter.ggml_pad(header, ALIGN) + total)
    return path
