"""Model facts from a GGUF file's header: what the planner needs, nothing more.

Rules for this module:
- Header only. We parse the GGUF header ourselves over an ``mmap`` and never touch the
  tensor data pages, so a 40 GB file plans as fast as a 100 MB one. (``gguf.GGUFReader``
  is not used here: it decodes every metadata array element in Python, which takes seconds
  for a 49k-token vocabulary.)
- Every failure is a ``ModelError`` with one line a person can act on.

GGUF layout (little-endian, versions 2 and 3): magic ``GGUF``, u32 version, u64 tensor
count, u64 metadata count, the metadata key/values, the tensor infos (name, dims, type,
offset), padding to ``general.alignment``, then the data.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

# ggml tensor type id -> (elements per block, bytes per block). Type ids are part of the
# GGUF file format and never change meaning; tests cross-check this table against
# gguf.constants.GGML_QUANT_SIZES so a new type shows up as a test failure, not a guess.
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}

# GGUF metadata value types -> struct format of a scalar (8 = string, 9 = array).
_SCALAR_FORMATS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
# Numeric arrays up to this length are kept (some architectures give per-layer head
# counts as arrays); longer arrays (token scores, types) only keep their length.
_MAX_KEPT_ARRAY = 4096
_BLOCK_RE = re.compile(r"blk\.(\d+)\.")


class ModelError(Exception):
    """The model file cannot be planned for; the message is one line for a person."""


@dataclass(frozen=True)
class ModelFacts:
    path: str
    file_size: int
    architecture: str
    name: str
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_ff: int  # largest feed-forward width (0 if the header does not say)
    n_head: int
    n_head_kv: int
    key_length: int  # per-head K dimension
    value_length: int  # per-head V dimension
    vocab_size: int
    layer_bytes: tuple[int, ...]  # bytes of blk.N.* per repeating layer N
    embd_bytes: int  # token_embd.*: llama.cpp keeps the input layer on the CPU
    # Bytes of the output layer (output.weight + output_norm). With tied embeddings
    # (no output.weight) llama.cpp duplicates token_embd as the output matrix, so its
    # bytes are counted here too.
    output_bytes: int
    tied_embeddings: bool
    other_bytes: int  # every other tensor (rope factors, extra layers, ...)
    chat_template: bool
    gguf_version: int

    @property
    def weights_bytes(self) -> int:
        """Bytes of all tensors in the file (tied output counted once)."""
        tied_dup = self.embd_bytes_of_output if self.tied_embeddings else 0
        return sum(self.layer_bytes) + self.embd_bytes + self.output_bytes + self.other_bytes - tied_dup

    @property
    def embd_bytes_of_output(self) -> int:
        # The share of output_bytes that duplicates token_embd when embeddings are tied.
        return self.embd_bytes if self.tied_embeddings else 0


class _Header:
    """A cursor over the mapped header. Bounds-checked: a truncated file is a ModelError."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelError("the GGUF header is truncated or corrupt")

    def scalar(self, fmt: str) -> int | float | bool:
        n = struct.calcsize(fmt)
        self._need(n)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        n = self.u64()
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        # A string array (the vocabulary) is walked by lengths only; nothing is decoded.
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise ModelError("the GGUF header is truncated or corrupt")
            (n,) = unpack("<Q", buf, pos)
            pos += 8 + n
        if pos > size:
            raise ModelError("the GGUF header is truncated or corrupt")
        self.pos = pos

    def value(self, vtype: int) -> object:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.u32()
            count = self.u64()
            if etype == _STRING:
                self.skip_strings(count)
                return _ArrayLen(count)
            if etype == _ARRAY:
                raise ModelError("nested arrays in GGUF metadata are not supported")
            fmt = _SCALAR_FORMATS.get(etype)
            if fmt is None:
                raise ModelError(f"unknown GGUF metadata type {etype}")
            width = struct.calcsize(fmt)
            self._need(width * count)
            if count <= _MAX_KEPT_ARRAY:
                vals = struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos)
                self.pos += width * count
                return list(vals)
            self.pos += width * count
            return _ArrayLen(count)
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ModelError(f"unknown GGUF metadata type {vtype}")
        return self.scalar(fmt)


@dataclass(frozen=True)
class _ArrayLen:
    """A metadata array we skipped; only its length is known."""

    count: int


def _as_int(v: object, default: int = 0) -> int:
    """A scalar, or the largest element of a per-layer array (what sizes the worst layer)."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, list) and v:
        return max(int(x) for x in v)
    return default


def _tensor_bytes(name: str, dims: list[int], ttype: int) -> int:
    sizes = GGML_TYPE_SIZES.get(ttype)
    if sizes is None:
        raise ModelError(f"tensor {name!r} has unknown ggml type {ttype} (newer GGUF than this reader?)")
    block, type_size = sizes
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def read_model_facts(path: str | os.PathLike[str]) -> ModelFacts:
    """Read a GGUF header. Touches only the header pages of the file."""
    p = Path(path)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise ModelError(f"model file not found: {p}") from None
    except IsADirectoryError:
        raise ModelError(f"model path is a directory, not a GGUF file: {p}") from None
    except OSError as e:
        raise ModelError(f"cannot open model file {p}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ModelError(f"not a GGUF file (too short): {p}")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot map model file {p}: {e}") from None
        try:
            return _parse(buf, size, p)
        except ModelError as e:
            raise ModelError(f"{e}: {p}") from None
        finally:
            buf.close()


def _parse(buf: mmap.mmap, size: int, p: Path) -> ModelFacts:
    h = _Header(buf, size)
    if buf[:4] != b"GGUF":
        raise ModelError("not a GGUF file (bad magic)")
    h.pos = 4
    version = h.u32()
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version != 0:
            raise ModelError("big-endian GGUF files are not supported")
        raise ModelError(f"unsupported GGUF version {version} (2 and 3 are supported)")
    n_tensors = h.u64()
    n_kv = h.u64()
    # Sanity bounds before looping: a corrupt count must not make us spin.
    if n_tensors > size // 16 or n_kv > size // 16:
        raise ModelError("the GGUF header is truncated or corrupt")
    meta: dict[str, object] = {}
    for _ in range(n_kv):
        name_ = h.string()
        vtype = h.u32()
        meta[name_] = h.value(vtype)

    layer_bytes: dict[int, int] = {}
    embd = out_w = out_norm = other = 0
    has_output = False
    max_end = 0
    embd_shape: list[int] = []
    for _ in range(n_tensors):
        name = h.string()
        n_dims = h.u32()
        if n_dims > 8:
            raise ModelError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [h.u64() for _ in range(n_dims)]
        ttype = h.u32()
        offset = h.u64()
        nbytes = _tensor_bytes(name, dims, ttype)
        max_end = max(max_end, offset + nbytes)
        m = _BLOCK_RE.match(name)
        if m:
            idx = int(m.group(1))
            layer_bytes[idx] = layer_bytes.get(idx, 0) + nbytes
        elif name.startswith("token_embd"):
            embd += nbytes
            if name == "token_embd.weight":
                embd_shape = dims
        elif name == "output.weight":
            out_w += nbytes
            has_output = True
        elif name.startswith("output_norm"):
            out_norm += nbytes
        else:
            other += nbytes

    alignment = _as_int(meta.get("general.alignment"), 32) or 32
    data_start = (h.pos + alignment - 1) // alignment * alignment
    if n_tensors and data_start + max_end > size:
        raise ModelError(
            f"the file is truncated: tensors need {data_start + max_end} bytes, the file has {size}"
        )

    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError("GGUF metadata has no general.architecture")

    def key(k: str) -> object:
        return meta.get(f"{arch}.{k}")

    n_layers = _as_int(key("block_count"))
    if n_layers <= 0:
        raise ModelError(f"GGUF metadata has no {arch}.block_count")
    n_embd = _as_int(key("embedding_length"))
    n_head = _as_int(key("attention.head_count"))
    n_head_kv = _as_int(key("attention.head_count_kv"), n_head) or n_head
    head_dim = n_embd // n_head if n_head else 0
    key_length = _as_int(key("attention.key_length"), head_dim) or head_dim
    value_length = _as_int(key("attention.value_length"), head_dim) or head_dim
    vocab = _as_int(key("vocab_size"))
    if not vocab:
        toks = meta.get("tokenizer.ggml.tokens")
        if isinstance(toks, _ArrayLen):
            vocab = toks.count
        elif len(embd_shape) == 2:
            vocab = embd_shape[1]

    # Blocks past block_count (e.g. next-token-prediction layers) are not repeating
    # layers llama.cpp splits by tensor_split; count them as "other".
    per_layer = tuple(layer_bytes.get(i, 0) for i in range(n_layers))
    other += sum(b for i, b in layer_bytes.items() if i >= n_layers)
    output_bytes = out_norm + (out_w if has_output else embd)
    gname = meta.get("general.name")
    return ModelFacts(
        path=str(p),
        file_size=size,
        architecture=arch,
        name=gname if isinstance(gname, str) else p.stem,
        n_layers=n_layers,
        n_ctx_train=_as_int(key("context_length")),
        n_embd=n_embd,
        n_ff=_as_int(key("feed_forward_length")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=key_length,
        value_length=value_length,
        vocab_size=vocab,
        layer_bytes=per_layer,
        embd_bytes=embd,
        output_bytes=output_bytes,
        tied_embeddings=not has_output,
        other_bytes=other,
        chat_template=isinstance(meta.get("tokenizer.chat_template"), str),
        gguf_version=version,
    )
