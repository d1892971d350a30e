"""The trust store: submitter public keys whose work this agent runs on a LAN.

A small YAML file (mode 0600, written atomically) listing ``{id, key, name, added}`` entries.
Ids are key fingerprints (:attr:`PublicKey.id`), so a key can be trusted only once.
"""

from __future__ import annotations

import builtins
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from security.errors import BadRequest, Conflict, NotFound
from security.identity import PublicKey

__all__ = ["TrustStore", "TrustedKey"]

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrustedKey:
    id: str
    key: str  # ``ed25519:<base64>``
    name: str | None = None
    added: float = 0.0  # epoch seconds
    #: also run this submitter's own code (sandboxed kinds such as ``python``), not only catalog kinds
    code: bool = False

    def public_key(self) -> PublicKey:
        return PublicKey.parse(self.key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrustStore:
    """Trusted submitter keys in one file. Every method re-reads the file, so several processes
    (the daemon and the CLI) see each other's changes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def list(self) -> builtins.list[TrustedKey]:
        return self._load()

    def is_trusted(self, key_id: str) -> bool:
        return any(k.id == key_id for k in self._load())

    def code_ids(self) -> builtins.list[str]:
        """Ids of the keys whose code this agent runs (``panal trust add KEY --code``)."""
        return [k.id for k in self._load() if k.code]

    def get(self, ref: str) -> TrustedKey:
        """The entry whose id or name is ``ref``; :class:`NotFound` otherwise."""
        matches = [k for k in self._load() if ref in (k.id, k.name)]
        if not matches:
            raise NotFound(f"no trusted key with id or name {ref!r} in {self.path}")
        return matches[0]

    def add(self, key: str | PublicKey, *, name: str | None = None, code: bool = False) -> TrustedKey:
        """Trust ``key``: a :class:`PublicKey`, its text ``ed25519:...``, or a path to a file holding it;
        ``code``: run its own code too. Adding ``code`` to a key already trusted without it upgrades it.

        Raises :class:`BadRequest` for a malformed key or name, :class:`Conflict` for a key or name
        already present."""
        public = key if isinstance(key, PublicKey) else _parse_key(key)
        if name is not None:
            name = name.strip()
            if not name or any(c.isspace() for c in name):
                raise BadRequest(f"a key name is one word, got {name!r}")
        keys = self._load()
        for existing in keys:
            if existing.id == public.id and code and not existing.code:
                upgraded = TrustedKey(existing.id, existing.key, existing.name, existing.added, code=True)
                self._save([upgraded if k.id == existing.id else k for k in keys])
                return upgraded
            if existing.id == public.id:
                label = f" as {existing.name!r}" if existing.name else ""
                raise Conflict(f"key {public.id} is already trusted{label}", details={"id": public.id})
            if name is not None and (existing.name == name or existing.id == name):
                raise Conflict(f"the name {name!r} is already used by key {existing.id}")
        entry = TrustedKey(public.id, public.text(), name, round(time.time(), 3), code=code)
        self._save([*keys, entry])
        return entry

    def remove(self, ref: str) -> TrustedKey:
        """Stop trusting the key whose id or name is ``ref``; :class:`NotFound` if there is none."""
        entry = self.get(ref)
        self._save([k for k in self._load() if k.id != entry.id])
        return entry

    def _load(self) -> builtins.list[TrustedKey]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        try:
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise TypeError("not a mapping")
            entries = data.get("keys") or []
            if not isinstance(entries, list):
                raise TypeError("'keys' is not a list")
            keys = [TrustedKey(**entry) for entry in entries]
            for k in keys:
                if k.public_key().id != k.id:
                    raise ValueError(f"id {k.id} does not match its key")
        except (yaml.YAMLError, TypeError, ValueError, BadRequest) as exc:
            raise BadRequest(f"{self.path}: corrupt trust store: {exc}") from exc
        return keys

    def _save(self, keys: builtins.list[TrustedKey]) -> None:
        data = {"version": _FORMAT_VERSION, "keys": [k.to_dict() for k in keys]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(data, fh, sort_keys=False)
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by umask and ignored for an existing file
        os.replace(tmp, self.path)


def _parse_key(text: str) -> PublicKey:
    """Key text, or the path of a file containing it (e.g. a submitter's ``submitter.pub``)."""
    candidate = text.strip()
    if not candidate.startswith("ed25519:") and ("/" in candidate or Path(candidate).is_file()):
        path = Path(candidate).expanduser()
        try:
            candidate = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise BadRequest(f"cannot read key file {path}: {exc.strerror}") from exc
    try:
        return PublicKey.parse(candidate)
    except BadRequest as exc:
        raise BadRequest(f"not an Ed25519 public key (expected ed25519:<base64>): {text[:60]!r}") from exc
