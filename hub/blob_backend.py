"""The blob backend interface: what the hub needs from wherever blobs live.

Blobs (models, inputs, outputs, checkpoints) are content-addressed by SHA-256. Today's one backend
is the filesystem (:class:`hub.blobs.BlobStore`); several hubs on one database (hub/election.py)
share it by mounting one directory (``blobs_dir`` in hub.yaml): a blob is renamed into place only once
its bytes match its name, so any hub may write or read it, and only the active hub collects garbage.
An S3-compatible backend can implement this protocol later (``path`` then becomes a reader).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import aiohttp

from hub.blobs import BlobStore
from hub.config import HubConfig
from security.errors import BadRequest, PayloadTooLarge

__all__ = ["BlobBackend", "blobs_dir", "create_blob_backend"]


class BlobBackend(Protocol):
    """Blobs by SHA-256 hex; every ``sha256_hex`` is checked (lowercase, 64 hex) before use."""

    max_blob_bytes: int

    def exists(self, sha256_hex: str) -> bool: ...
    def size(self, sha256_hex: str) -> int:
        """Bytes of a stored blob (NotFound if there is none)."""
    def touch(self, sha256_hex: str) -> None:
        """Renew the blob's GC grace period."""
    def path(self, sha256_hex: str) -> Path:
        """The file a download streams (the filesystem backend's reader)."""
    async def put(self, sha256_hex: str, stream: aiohttp.StreamReader | AsyncIterator[bytes],
                  expected_size: int | None = None) -> tuple[int, bool]:
        """Store the streamed bytes if they hash to ``sha256_hex``: (size, whether it is new)."""
    def part_path(self, sha256_hex: str) -> Path:
        """A fresh temp file for a resumable upload (hub/uploads.py), kept from GC until ``end_part``."""
    def end_part(self, path: Path) -> None: ...
    async def commit_part(self, sha256_hex: str, part: Path, size: int) -> bool:
        """Move a verified part into place; whether it is new."""
    async def reserve(self, nbytes: int, check_only: bool = False) -> None:
        """Hold space for an upload in progress (Unavailable when the store is full)."""
    def release(self, nbytes: int) -> None: ...
    def too_large(self, size: int | None = None) -> PayloadTooLarge: ...
    async def total_bytes(self) -> int: ...
    async def delete(self, sha256_hex: str) -> bool: ...
    async def gc(self, referenced: set[str], grace_s: float) -> list[str]:
        """Delete blobs not in ``referenced`` and older than ``grace_s``; the deleted digests."""


def blobs_dir(config: HubConfig, hub_dir: Path) -> Path:
    """``blobs_dir`` from hub.yaml: absolute, or relative to the hub directory; "" is ``hub_dir/blobs``."""
    if not config.blobs_dir:
        return hub_dir / "blobs"
    path = Path(config.blobs_dir)
    if "\x00" in config.blobs_dir:
        raise BadRequest("hub setting blobs_dir: not a path")
    return path if path.is_absolute() else hub_dir / path


def create_blob_backend(config: HubConfig, hub_dir: Path) -> BlobBackend:
    """The configured backend (the filesystem: the only one today)."""
    return BlobStore(blobs_dir(config, hub_dir), config.max_blob_bytes, config.max_blobs_total_bytes or None)
