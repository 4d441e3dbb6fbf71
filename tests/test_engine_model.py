"""The tiny model for the engine: a real two-layer llama GGUF whose bytes are a function of its seed."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from gguf import GGUFReader
from support_engine import BUILD_TIMEOUT_S, MODEL_GENERATOR, make_tiny_model, vocab_file

# The default seed's digest. It moves only when the generator, the vocab file or the pinned gguf/numpy
# change; a model list that pins the lab model's sha256 must move with it.
TINY_MODEL_SHA256 = "a33e6dee685d96df6c83e31a368fb92c57233d5633042908a796ff610a904bf7"

# The first test may fetch the 76 MB sdist that holds the vocab file (once per machine).
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S)


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_seed_gives_the_same_bytes_and_the_pinned_digest(tmp_path):
    first = make_tiny_model(tmp_path / "first.gguf")
    second = make_tiny_model(tmp_path / "second.gguf")
    assert sha256_of(first) == sha256_of(second) == TINY_MODEL_SHA256


def test_another_seed_gives_other_weights(tmp_path):
    other = make_tiny_model(tmp_path / "other.gguf", seed=7)
    assert sha256_of(other) != TINY_MODEL_SHA256


def test_the_model_is_a_two_layer_llama_with_the_real_tokenizer(tmp_path):
    model = make_tiny_model(tmp_path / "tiny.gguf")
    fields = GGUFReader(model).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.embedding_length"].contents() == 64
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 32000 and tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    vocab = GGUFReader(vocab_file()).fields
    assert tokens == vocab["tokenizer.ggml.tokens"].contents()
    assert 16_000_000 < model.stat().st_size < 19_000_000


def test_a_vocab_that_is_no_gguf_fails_in_one_line_and_leaves_no_file(tmp_path):
    not_gguf = tmp_path / "vocab.gguf"
    not_gguf.write_bytes(b"\x00" * 4096)
    target = tmp_path / "tiny.gguf"
    answer = subprocess.run(
        [sys.executable, str(MODEL_GENERATOR), "--vocab", str(not_gguf), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert answer.returncode == 1
    assert answer.stderr.strip().count("\n") == 0
    assert answer.stderr.startswith(f"make_gguf: {not_gguf} is not a readable GGUF file")
    assert list(tmp_path.iterdir()) == [not_gguf]
