#!/usr/bin/env python3
"""Write a tiny llama model that llama.cpp's llama-server really loads and runs.

Two layers, 64 dimensions, seeded random float32 weights, and the real 32k SentencePiece tokenizer copied
from a vocab-only GGUF of the llama.cpp tree (models/ggml-vocab-llama-spm.gguf, shipped in the
llama-cpp-python sdist that scripts/build-engine.sh builds from; `build-engine.sh --vocab` prints its path).
The weights are random, so the model answers gibberish, but every byte is a function of the seed and
the vocab file: the same inputs give the same sha256, which a model list can pin.

Usage: make_gguf.py --vocab VOCAB.gguf [--seed N] PATH. Writes PATH.tmp, then renames it into place.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

ARCHITECTURE = "llama"
MODEL_NAME = "llorch-lab-tiny-llama"
DEFAULT_SEED = 20240613
# Small enough to build and load in well under a second, big enough to have every tensor a llama
# graph uses; the vocab (32000 x 64 float32, twice: embeddings and output) is most of the ~17 MB.
EMBEDDING_LENGTH = 64
BLOCK_COUNT = 2
HEAD_COUNT = 4
FEED_FORWARD_LENGTH = 256
CONTEXT_LENGTH = 2048
RMS_EPSILON = 1e-5
WEIGHT_SCALE = 0.02
# general.file_type: every tensor is float32.
FILE_TYPE_ALL_F32 = 0


def tokenizer_fields(vocab_path: Path) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """The tokenizer.* key/values of a vocab GGUF, with their GGUF types, in file order."""
    try:
        reader = GGUFReader(vocab_path)
    except OSError:
        raise
    except Exception as error:  # gguf's parser raises whatever truncated or foreign bytes trip
        raise ValueError(f"{vocab_path} is not a readable GGUF file ({error})") from error
    fields = []
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        sub_type = field.types[1] if value_type == GGUFValueType.ARRAY else None
        fields.append((name, field.contents(), value_type, sub_type))
    if not any(name == "tokenizer.ggml.tokens" for name, *_ in fields):
        raise ValueError(f"{vocab_path} holds no tokenizer.ggml.tokens: not a vocab GGUF")
    return fields


def layer_tensors(rng: np.random.Generator, block: int) -> dict[str, np.ndarray]:
    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * WEIGHT_SCALE).astype(np.float32)

    norm = np.ones(EMBEDDING_LENGTH, dtype=np.float32)
    prefix = f"blk.{block}"
    # numpy shape (rows, cols) is GGUF's (cols, rows): a projection from n_embd to n_ff is (n_ff, n_embd).
    return {
        f"{prefix}.attn_norm.weight": norm,
        f"{prefix}.attn_q.weight": weight(EMBEDDING_LENGTH, EMBEDDING_LENGTH),
        f"{prefix}.attn_k.weight": weight(EMBEDDING_LENGTH, EMBEDDING_LENGTH),
        f"{prefix}.attn_v.weight": weight(EMBEDDING_LENGTH, EMBEDDING_LENGTH),
        f"{prefix}.attn_output.weight": weight(EMBEDDING_LENGTH, EMBEDDING_LENGTH),
        f"{prefix}.ffn_norm.weight": norm.copy(),
        f"{prefix}.ffn_gate.weight": weight(FEED_FORWARD_LENGTH, EMBEDDING_LENGTH),
        f"{prefix}.ffn_down.weight": weight(EMBEDDING_LENGTH, FEED_FORWARD_LENGTH),
        f"{prefix}.ffn_up.weight": weight(FEED_FORWARD_LENGTH, EMBEDDING_LENGTH),
    }


def write_model(path: Path, vocab_path: Path, seed: int) -> None:
    tokenizer = tokenizer_fields(vocab_path)
    vocab_size = next(len(value) for name, value, *_ in tokenizer if name == "tokenizer.ggml.tokens")
    rng = np.random.default_rng(seed)
    tensors = {
        "token_embd.weight": (
            rng.standard_normal((vocab_size, EMBEDDING_LENGTH), dtype=np.float32) * WEIGHT_SCALE
        ).astype(np.float32)
    }
    for block in range(BLOCK_COUNT):
        tensors.update(layer_tensors(rng, block))
    tensors["output_norm.weight"] = np.ones(EMBEDDING_LENGTH, dtype=np.float32)
    tensors["output.weight"] = (
        rng.standard_normal((vocab_size, EMBEDDING_LENGTH), dtype=np.float32) * WEIGHT_SCALE
    ).astype(np.float32)

    writer = GGUFWriter(path, ARCHITECTURE)
    writer.add_name(MODEL_NAME)
    writer.add_description(f"random weights (seed {seed}): a test model that answers gibberish")
    writer.add_file_type(FILE_TYPE_ALL_F32)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(EMBEDDING_LENGTH)
    writer.add_block_count(BLOCK_COUNT)
    writer.add_feed_forward_length(FEED_FORWARD_LENGTH)
    writer.add_head_count(HEAD_COUNT)
    writer.add_head_count_kv(HEAD_COUNT)
    writer.add_rope_dimension_count(EMBEDDING_LENGTH // HEAD_COUNT)
    writer.add_layer_norm_rms_eps(RMS_EPSILON)
    writer.add_vocab_size(vocab_size)
    for name, value, value_type, sub_type in tokenizer:
        writer.add_key_value(name, value, value_type, sub_type)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="where to write the GGUF")
    parser.add_argument("--vocab", type=Path, required=True, help="a vocab-only llama GGUF (SPM tokenizer)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the random weights")
    args = parser.parse_args()
    tmp_path = args.path.with_name(args.path.name + ".tmp")
    try:
        write_model(tmp_path, args.vocab, args.seed)
    except (OSError, ValueError) as error:
        tmp_path.unlink(missing_ok=True)
        sys.exit(f"make_gguf: {error}")
    with open(tmp_path, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp_path, 0o644)
    os.replace(tmp_path, args.path)


if __name__ == "__main__":
    main()
