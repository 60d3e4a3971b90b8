"""GGUF header reading: facts match what the gguf package sees, errors are one line."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from supervisor.default_model import default_model_path
from supervisor.model import GGML_TYPE_SIZES, ModelError, read_model_facts
from tests.gguf_factory import GGMLQuantizationType, Shape, write_model


def test_type_table_matches_gguf_package() -> None:
    # A new ggml type in a newer gguf package shows up here rather than as a wrong size.
    assert {int(t): v for t, v in gguf.GGML_QUANT_SIZES.items()} == GGML_TYPE_SIZES


def test_smollm2_facts() -> None:
    m = read_model_facts(default_model_path())
    assert (m.architecture, m.n_layers, m.n_ctx_train, m.n_embd, m.n_ff) == ("llama", 30, 8192, 576, 1536)
    assert (m.n_head, m.n_head_kv, m.key_length, m.value_length, m.vocab_size) == (9, 3, 64, 64, 49152)
    assert m.tied_embeddings and m.chat_template
    assert len(set(m.layer_bytes)) == 1 and m.layer_bytes[0] > 0


@pytest.mark.parametrize(
    "shape",
    [
        Shape(),
        Shape(tied=True, chat_template=False),
        Shape(n_layers=3, n_embd=512, n_ff=1024, n_head=8, n_head_kv=2, vocab=1000,
              ttype=GGMLQuantizationType.Q6_K, head_dim=96),
    ],
    ids=["default", "tied", "explicit-head-dim"],
)
def test_facts_match_gguf_reader(tmp_path: Path, shape: Shape) -> None:
    path = write_model(tmp_path / "m.gguf", shape)
    m = read_model_facts(path)
    r = gguf.GGUFReader(path)
    per_layer: dict[int, int] = {}
    total = 0
    for t in r.tensors:
        total += int(t.n_bytes)
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            per_layer[i] = per_layer.get(i, 0) + int(t.n_bytes)
    assert m.layer_bytes == tuple(per_layer[i] for i in range(shape.n_layers))
    assert m.weights_bytes == total
    assert m.tied_embeddings == shape.tied
    assert m.chat_template == shape.chat_template
    assert m.n_head_kv == shape.n_head_kv
    assert m.key_length == (shape.head_dim or shape.n_embd // shape.n_head)
    assert m.vocab_size == shape.vocab and m.n_ctx_train == shape.n_ctx_train
    if shape.tied:
        assert m.output_bytes > m.embd_bytes  # the duplicated token_embd + output_norm


def test_vocab_from_tokens_when_no_vocab_size_key(tmp_path: Path) -> None:
    # Many GGUF files have no <arch>.vocab_size; the token list's length is the vocabulary.
    w = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_token_list([f"t{i}" for i in range(777)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    m = read_model_facts(tmp_path / "v.gguf")
    assert m.vocab_size == 777 and m.n_head_kv == 4 and m.key_length == 16


def _gguf_head(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "too short"),
        (b"hello world, this is not a model at all", "bad magic"),
        (_gguf_head(version=1), "unsupported GGUF version 1"),
        (_gguf_head(version=3 << 24), "big-endian"),
        (_gguf_head(n_kv=5), "truncated or corrupt"),
        (_gguf_head(), "no general.architecture"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, content: bytes, needle: str) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(ModelError) as e:
        read_model_facts(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        read_model_facts(tmp_path / "nope.gguf")
    with pytest.raises(ModelError, match="directory"):
        read_model_facts(tmp_path)


def test_truncated_data_region(tmp_path: Path) -> None:
    p = write_model(tmp_path / "m.gguf", Shape(n_layers=2, vocab=1000, write_tokens=False))
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 1000)
    with pytest.raises(ModelError, match="truncated"):
        read_model_facts(p)


def test_huge_sparse_file_reads_only_the_header(tmp_path: Path) -> None:
    # ~70 GB on paper, a few MB on disk: the reader maps the file and stops at the header.
    shape = Shape(n_layers=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=128256,
                  ttype=GGMLQuantizationType.Q8_0, write_tokens=False)
    p = write_model(tmp_path / "big.gguf", shape)
    m = read_model_facts(p)
    assert m.file_size > 65 * 2**30 and m.n_layers == 80
    assert p.stat().st_blocks * 512 < 64 * 2**20
