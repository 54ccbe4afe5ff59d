"""File helpers shared by the dataset store, the sources and checkpoints."""

import hashlib
from pathlib import Path


def file_digests(path: Path, *algorithms: str) -> tuple[str, ...]:
    """Hex digests of a file (e.g. "md5", "sha256") in one pass, read in chunks so large files never sit in memory."""
    hashes = [hashlib.new(a) for a in algorithms]
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            for h in hashes:
                h.update(chunk)
    return tuple(h.hexdigest() for h in hashes)


def file_sha256(path: Path) -> str:
    return file_digests(path, "sha256")[0]
