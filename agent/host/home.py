"""The user's panal directory: identities, joined boards, the result outbox, caches.

``PANAL_HOME`` overrides the platform default (platformdirs), so tests, services and several
agents on one machine each get their own directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import platformdirs
import yaml

from security.errors import BadRequest, NotFound
from security.identity import Identity
from security.tls import BoardAddress

__all__ = ["AgentHome", "default_home"]


def default_home() -> Path:
    env = os.environ.get("PANAL_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("panal", appauthor=False))


class AgentHome:
    """Layout: ``agent.key`` (this machine as a volunteer), ``user.key`` (you as a submitter),
    ``client.yaml`` (default board), ``boards.yaml`` (boards the agent joined), ``outbox/``, ``work/``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else default_home()
        self.agent_key = self.root / "agent.key"
        self.user_key = self.root / "user.key"
        self.client_path = self.root / "client.yaml"
        self.boards_path = self.root / "boards.yaml"
        self.outbox = self.root / "outbox"
        self.work = self.root / "work"
        self.local_board = self.root / "local-board.url"   # written by `panal up` while it runs
        self.lan_board = self.root / "lan-board.url"       # written by `panal agent run` in LAN mode

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)

    def agent_identity(self) -> Identity:
        self.ensure()
        return Identity.load_or_create(self.agent_key)

    def user_identity(self) -> Identity:
        self.ensure()
        return Identity.load_or_create(self.user_key)

    # -- boards ---------------------------------------------------------------------------------
    def boards(self) -> list[BoardAddress]:
        data = _read_yaml(self.boards_path, [])
        if not isinstance(data, list):
            raise BadRequest(f"{self.boards_path}: expected a list of boards")
        return [BoardAddress(str(b["url"]), b.get("fingerprint"), _also(b.get("also"))) for b in data]

    def add_board(self, address: BoardAddress, *, allow_code: bool = False) -> None:
        """Remember a joined board; ``allow_code``: run code from its submitters (joined ``--allow-code``)."""
        code = self.code_boards() - {address.url} | ({address.url} if allow_code else set())
        boards = [b for b in self.boards() if b.url != address.url] + [address]
        self.ensure()
        self.boards_path.write_text(yaml.safe_dump(
            [{"url": b.url, "fingerprint": b.fingerprint, **({"allow_code": True} if b.url in code else {}),
              **({"also": [{"url": o.url, "fingerprint": o.fingerprint} for o in b.alternates]}
                 if b.alternates else {})}
             for b in boards], sort_keys=False))

    def code_boards(self) -> set[str]:
        """URLs of the joined boards whose submitters' code this agent runs (``--allow-code``)."""
        data = _read_yaml(self.boards_path, [])
        return {str(b["url"]) for b in data if isinstance(b, dict) and b.get("allow_code") is True} \
            if isinstance(data, list) else set()

    # -- client settings ------------------------------------------------------------------------
    def client_settings(self) -> dict[str, Any]:
        data = _read_yaml(self.client_path, {})
        if not isinstance(data, dict):
            raise BadRequest(f"{self.client_path}: expected a map of settings")
        return data

    def set_client(self, key: str, value: str) -> None:
        settings = self.client_settings()
        settings[key] = value
        self.ensure()
        self.client_path.write_text(yaml.safe_dump(settings, sort_keys=False))

    def default_board(self, flag: str | None = None) -> BoardAddress:
        """Where client commands go: --hub flag > PANAL_HUB > client.yaml > `panal up` > the running
        agent's LAN board > joined board."""
        text = flag or os.environ.get("PANAL_HUB") or self.client_settings().get("hub")
        if text:
            return BoardAddress.parse(str(text))
        if self.local_board.exists():
            return BoardAddress.parse(self.local_board.read_text().strip())
        if self.lan_board.exists():
            return BoardAddress.parse(self.lan_board.read_text().strip())
        boards = self.boards()
        if boards:
            return boards[0]
        raise NotFound("no board configured: pass --hub JOIN_URL, run `panal config set hub JOIN_URL`, "
                       "or start one on this machine with `panal up` (or `panal agent run` in LAN mode)",
                       code="no_board")


def _read_yaml(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return yaml.safe_load(path.read_text()) or default
    except yaml.YAMLError as exc:
        raise BadRequest(f"{path}: not valid YAML: {exc}") from exc


def _also(value: object) -> tuple[BoardAddress, ...]:
    """A joined board's other hubs (``also:`` in boards.yaml: the standbys of a board, each pinned)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, dict) and isinstance(v.get("url"), str) for v in value):
        raise BadRequest("boards.yaml: also: expected a list of {url, fingerprint}")
    return tuple(BoardAddress(str(v["url"]), v.get("fingerprint")) for v in value)
