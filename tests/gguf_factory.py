"""Write GGUF files of given shapes with the ``gguf`` package, for planner and fleet tests.

``write_model``: only the header is real: tensor infos carry true shapes, types and offsets,
and the file is then extended sparsely to its full size (``truncate``), so a "40 GB" model
costs no disk and proves the reader never touches tensor data.

``write_loadable``: a model llama.cpp really loads and runs: the llama architecture with
SmolLM2's tokenizer (vocabulary, merges, special ids, chat template) copied from the
embedded model's metadata and random weights, a few MB, so models of different sizes load
in well under a second. The text it writes is garbage; its tokens are real.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

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


def add_hparams(w: GGUFWriter, s: Shape) -> None:
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


def write_model(path: Path, s: Shape = Shape()) -> Path:
    w = GGUFWriter(path, s.arch)
    add_hparams(w, s)
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


@functools.lru_cache(maxsize=4)
def tokenizer_fields(source: Path) -> tuple[tuple[str, object, GGUFValueType, GGUFValueType | None], ...]:
    """Every ``tokenizer.*`` key of a GGUF file as (key, value, type, array item type).

    Cached: GGUFReader takes ~2 s to decode SmolLM2's 49152 tokens and 48900 merges."""
    out: list[tuple[str, object, GGUFValueType, GGUFValueType | None]] = []
    for key, field in GGUFReader(source).fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    return tuple(out)


def write_loadable(
    path: Path,
    n_layers: int = 2,
    n_embd: int = 64,
    n_ff: int | None = None,
    n_head: int = 2,
    n_head_kv: int = 1,
    ttype: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
    name: str = "factory loadable",
    tokenizer_from: Path | None = None,
    seed: int = 0,
) -> Path:
    """A real llama GGUF with random weights and SmolLM2's tokenizer (see the module doc).

    Tied embeddings (no output.weight): the 49152-row token_embd dominates the weights, so
    the default (n_embd 64, Q8_0) is ~5 MB, of which ~2 MB is the tokenizer; n_layers 4 and
    n_embd 128 is ~9.5 MB. Sizes (and the planner's footprints) grow with both. Writing
    costs ~0.5 s after the first call (which reads the tokenizer, ~2 s).
    """
    if tokenizer_from is None:
        from supervisor.default_model import default_model_path

        tokenizer_from = default_model_path()
    fields = tokenizer_fields(tokenizer_from)
    vocab = len(next(v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens"))  # type: ignore[arg-type]
    s = Shape(name=name, n_layers=n_layers, n_embd=n_embd, n_ff=n_ff or 4 * n_embd, n_head=n_head,
              n_head_kv=n_head_kv, vocab=vocab, n_ctx_train=8192, ttype=ttype, tied=True)
    w = GGUFWriter(path, s.arch)
    add_hparams(w, s)
    w.add_rope_dimension_count(s.n_embd // s.n_head)
    w.add_rope_freq_base(100000.0)  # SmolLM2's
    w.add_layer_norm_rms_eps(1e-5)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)
    for tname, shape, tt in tensors_of(s):
        if tname.endswith("norm.weight"):
            data = np.ones(shape, dtype=np.float32)
        else:
            data = rng.normal(0.0, 0.05, size=shape).astype(np.float32)
        if tt == GGMLQuantizationType.F32:
            w.add_tensor(tname, data)
        elif tt == GGMLQuantizationType.F16:
            w.add_tensor(tname, data.astype(np.float16))
        else:
            w.add_tensor(tname, quantize(data, tt), raw_dtype=tt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_reranker(path: Path, n_layers: int = 2, n_embd: int = 32, n_head: int = 2, n_ctx_train: int = 1024,
                   seed: int = 0) -> Path:
    """A reranker llama.cpp really loads: the BERT architecture with a classification head
    (``cls``, ``cls.output``: one output), RANK pooling, SmolLM2's tokenizer (told to add
    BOS and EOS, so a pair reads BOS query EOS document EOS) and random weights (~7 MB,
    F32). Its scores are garbage; their shape and order are real."""
    from gguf.constants import PoolingType

    fields = tokenizer_fields(default_tokenizer_source())
    vocab = len(next(v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens"))  # type: ignore[arg-type]
    n_ff = 4 * n_embd
    w = GGUFWriter(path, "bert")
    w.add_name("factory reranker")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_block_count(n_layers)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_token_type_count(2)
    w.add_pooling_type(PoolingType.RANK)
    special = {"tokenizer.chat_template", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}
    for key, value, vtype, sub in fields:
        if key not in special:
            w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    rng = np.random.default_rng(seed)

    def tensor(name: str, shape: tuple[int, ...], fill: float | None = None) -> None:
        data = np.full(shape, fill, np.float32) if fill is not None else rng.normal(0.0, 0.05, size=shape).astype(np.float32)
        w.add_tensor(name, data)

    def norm(name: str) -> None:
        tensor(f"{name}.weight", (n_embd,), 1.0)
        tensor(f"{name}.bias", (n_embd,), 0.0)

    def linear(name: str, n_out: int, n_in: int) -> None:
        tensor(f"{name}.weight", (n_out, n_in))
        tensor(f"{name}.bias", (n_out,), 0.0)

    tensor("token_embd.weight", (vocab, n_embd))
    tensor("token_types.weight", (2, n_embd))
    tensor("position_embd.weight", (n_ctx_train, n_embd))
    norm("token_embd_norm")
    for i in range(n_layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            linear(f"blk.{i}.{name}", n_embd, n_embd)
        norm(f"blk.{i}.attn_output_norm")
        norm(f"blk.{i}.layer_output_norm")
        linear(f"blk.{i}.ffn_up", n_ff, n_embd)
        linear(f"blk.{i}.ffn_down", n_embd, n_ff)
    linear("cls", n_embd, n_embd)
    linear("cls.output", 1, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def default_tokenizer_source() -> Path:
    from supervisor.default_model import default_model_path

    return default_model_path()
