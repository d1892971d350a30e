"""Length-prefixed msgpack frames: the pipe protocol between the daemon and its worker processes."""

from __future__ import annotations

import asyncio
import struct
from typing import IO, Any

import msgpack

__all__ = ["MAX_FRAME", "pack_frame", "read_frame", "read_frame_sync"]

MAX_FRAME = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")


def pack_frame(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return _HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader, max_size: int = MAX_FRAME) -> Any:
    """Read one frame; raises ``asyncio.IncompleteReadError`` when the other side is gone and
    ``ValueError`` for a frame over ``max_size`` or one that is not msgpack."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > max_size:
        raise ValueError(f"frame of {size} bytes exceeds the {max_size} byte limit")
    return msgpack.unpackb(await reader.readexactly(size), raw=False)


def read_frame_sync(stream: IO[bytes]) -> Any:
    """Blocking read for the worker side; returns None at end of input."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return msgpack.unpackb(data, raw=False)
