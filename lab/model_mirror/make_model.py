#!/usr/bin/env python3
"""Write the lab's test model: SIZE bytes of a sha256 counter stream, so its digest never changes.

Usage: make_model.py PATH SIZE_BYTES. Writes PATH.tmp, then renames it into place.
"""

import hashlib
import os
import sys

SEED = b"llorch-lab-model"


def model_bytes(size: int) -> bytes:
    blocks = (size + 31) // 32
    stream = b"".join(hashlib.sha256(SEED + n.to_bytes(8, "big")).digest() for n in range(blocks))
    return stream[:size]


def main() -> None:
    path, size = sys.argv[1], int(sys.argv[2])
    tmp_path = path + ".tmp"
    with open(tmp_path, "wb") as handle:
        handle.write(model_bytes(size))
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp_path, 0o644)
    os.replace(tmp_path, path)


if __name__ == "__main__":
    main()
