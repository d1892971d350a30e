"""Results waiting for a board's acknowledgement, kept on disk so a restart loses none.

A finished task's signed result is written here (atomically, fsynced) before the daemon tries to
deliver it, and deleted only after the board answered ``accepted``, ``duplicate`` or a definitive
rejection. After a crash or a long outage the agent delivers what is left.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import msgpack

from security.errors import BadRequest
from security.records import SignedRecord

__all__ = ["Outbox"]

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, root: Path, board_url: str) -> None:
        self.dir = root / hashlib.sha256(board_url.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.result"

    def save(self, key: str, record: SignedRecord) -> None:
        """Persist a result under ``key`` (task and lease id) before any delivery attempt."""
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgpack.packb(record.to_wire(), use_bin_type=True))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def remove(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def load(self) -> list[SignedRecord]:
        records = []
        for path in sorted(self.dir.glob("*.result")):
            try:
                records.append(SignedRecord.from_wire(msgpack.unpackb(path.read_bytes(), raw=False)))
            except (ValueError, msgpack.ExtraData, msgpack.UnpackException, BadRequest):
                log.warning("dropping unreadable outbox entry %s", path)
                path.unlink(missing_ok=True)
        return records

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*.result"))
