"""Row shards of a safetensors file, by byte offsets: split one file into shard files, read one row range.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, data offsets) and
the tensors' bytes, each row-major. So rows ``[a, b)`` of a tensor are one contiguous byte range, and a
shard is a new header plus, per tensor, that range copied: the whole file never has to be in memory
(``panal submit`` splits a data set bigger than its RAM), and a reader of one range maps only it.

Every tensor of a sharded file must have the same row count (its first dimension): a shard then holds
the same tensor names, each with that shard's rows, and is itself a valid safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.safeload import DTYPE_SIZES, TensorInfo, UnsafeInput, check_safetensors, read_metadata

__all__ = ["ShardFile", "file_rows", "read_rows", "split_rows"]

_COPY_BYTES = 4 * 1024 * 1024   # one read/write/hash step of a split: what a split holds in memory


@dataclass(frozen=True)
class ShardFile:
    """One shard written by :func:`split_rows`: its path, sha256, size and row range ``[start, end)``."""

    path: Path
    sha256: str
    size: int
    start: int
    end: int


def file_rows(path: Path) -> int:
    """The row count every tensor of ``path`` shares (its first dimension); a clear error otherwise."""
    return _rows(path, check_safetensors(path))


def _rows(path: Path, tensors: dict[str, TensorInfo]) -> int:
    if not tensors:
        raise UnsafeInput(path, "holds no tensors to shard by rows")
    counts = {name: (t.shape[0] if t.shape else None) for name, t in tensors.items()}
    scalar = sorted(n for n, c in counts.items() if c is None)
    if scalar:
        raise UnsafeInput(path, f"tensor {scalar[0]!r} is a scalar: every tensor of a sharded file needs rows")
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{n!r} has {c}" for n, c in sorted(counts.items())[:4])
        raise UnsafeInput(path, f"every tensor of a sharded file must have the same number of rows ({shown})")
    return int(next(iter(counts.values())) or 0)


def _data_start(path: Path) -> int:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + int(n)


def _header(tensors: dict[str, TensorInfo], rows: int, meta: dict[str, str]) -> tuple[bytes, list[tuple[str, int]]]:
    """A shard's header (padded to 8 bytes, as safetensors writes it) and its (name, byte length) list."""
    entries: dict[str, Any] = {"__metadata__": meta} if meta else {}
    layout = []
    offset = 0
    for name, t in sorted(tensors.items(), key=lambda kv: kv[1].start):
        nbytes = rows * _row_bytes(t)
        entries[name] = {"dtype": t.dtype, "shape": [rows, *t.shape[1:]], "data_offsets": [offset, offset + nbytes]}
        layout.append((name, nbytes))
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, layout


def _row_bytes(t: TensorInfo) -> int:
    per = DTYPE_SIZES[t.dtype]
    for d in t.shape[1:]:
        per *= d
    return per


def split_rows(path: Path, bounds: list[tuple[int, int]], out_dir: Path,
               progress: Callable[[int], None] | None = None) -> list[ShardFile]:
    """Write rows ``[start, end)`` of every tensor of ``path`` for each of ``bounds`` as its own file in
    ``out_dir``, hashing while writing; streamed in steps of a few MiB, never the whole file in memory.

    The shards keep the source's ``__metadata__``. ``progress`` gets the bytes written by each step.
    """
    tensors = check_safetensors(path)
    total = _rows(path, tensors)
    meta = read_metadata(path)
    base = _data_start(path)
    out: list[ShardFile] = []
    with path.open("rb") as src:
        for index, (start, end) in enumerate(bounds):
            if not 0 <= start <= end <= total:
                raise ValueError(f"shard rows {start}..{end} outside the {total} rows of {path.name}")
            head, _ = _header(tensors, end - start, meta)
            dest = out_dir / f"{path.stem}.shard{index:05d}.safetensors"
            digest = hashlib.sha256(head)
            size = len(head)
            with dest.open("wb") as f:
                f.write(head)
                for t in sorted(tensors.values(), key=lambda t: t.start):
                    per = _row_bytes(t)
                    src.seek(base + t.start + start * per)
                    left = (end - start) * per
                    while left:
                        chunk = src.read(min(_COPY_BYTES, left))
                        if not chunk:
                            raise UnsafeInput(path, "changed while it was being split")
                        f.write(chunk)
                        digest.update(chunk)
                        left -= len(chunk)
                        size += len(chunk)
                        if progress is not None:
                            progress(len(chunk))
            out.append(ShardFile(dest, digest.hexdigest(), size, start, end))
    return out


def read_rows(path: Path, key: str, start: int, end: int) -> Any:
    """Rows ``[start, end)`` of tensor ``key`` as a torch tensor, reading only those bytes (the header is
    checked first, then safetensors' own sliced reader maps just that range); what a task reads of its
    data, be it a shard or a whole file."""
    check_safetensors(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice(key)[start:end]
    except Exception as exc:  # the Rust reader raises its own error types
        raise UnsafeInput(path, f"safetensors could not read rows {start}..{end} of {key!r}: {exc}") from exc
