"""A hub's directory: its settings, identity, TLS certificate and database, in one place."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml

from hub.config import HubConfig
from security.errors import BadRequest
from security.identity import Identity
from security.tls import BoardAddress, cert_dns_names, cert_fingerprint, make_self_signed

__all__ = ["HubHome"]


class HubHome:
    """``hub.yaml``, ``hub.key`` (0600), ``tls/cert.pem`` + ``tls/key.pem`` (0600), ``board.db``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "hub.yaml"
        self.key_path = root / "hub.key"
        self.cert_path = root / "tls" / "cert.pem"
        self.tls_key_path = root / "tls" / "key.pem"
        self.db_path = root / "board.db"
        self.serve_path = root / "serve.url"   # written by a running hub: its actual URL

    @property
    def initialised(self) -> bool:
        return self.config_path.exists() and self.key_path.exists()

    def init(self, host: str | None = None, port: int | None = None, tls: bool | None = None,
             publish_hostname: bool = True) -> HubConfig:
        """Create what is missing (never overwrites keys, certs or settings; None: the default);
        return the settings. ``publish_hostname=False`` (a volunteer's LAN board) keeps the machine's
        hostname out of the certificate, replacing one an older version made with it."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        Identity.load_or_create(self.key_path)
        if not self.config_path.exists():
            default = HubConfig()
            settings = {"host": host or default.host, "port": default.port if port is None else port,
                        "tls": default.tls if tls is None else tls}
            self._write_settings(settings)
        config = self.config()
        if config.tls and self.cert_path.exists() and not publish_hostname \
                and socket.gethostname() in cert_dns_names(self.cert_path):
            self.cert_path.unlink()
        if config.tls and not self.cert_path.exists():
            make_self_signed(self.cert_path, self.tls_key_path, [config.host], include_hostname=publish_hostname)
        return config

    def configure(self, **settings: Any) -> dict[str, tuple[Any, Any]]:
        """Set ``settings`` (None: leave as is) in ``hub.yaml``, keeping its other keys; return what
        changed, as name -> (old, new). Keys and certificate stay: clients pin the certificate's
        fingerprint, not its host names, so a join URL with a new host or port still trusts it."""
        data = self._read_settings()
        current = HubConfig.load(None, env={}, **data)
        changes = {name: (getattr(current, name), value) for name, value in settings.items()
                   if value is not None and getattr(current, name, None) != value}
        if changes:
            data.update({name: new for name, (_, new) in changes.items()})
            HubConfig.load(None, env={}, **data)  # a bad value is refused before the file changes
            self._write_settings(data)
        return changes

    def _read_settings(self) -> dict[str, Any]:
        data = yaml.safe_load(self.config_path.read_text()) or {}
        if not isinstance(data, dict):
            raise BadRequest(f"{self.config_path}: expected a map of settings")
        return data

    def _write_settings(self, settings: dict[str, Any]) -> None:
        self.config_path.write_text("# panal hub settings; every key of HubConfig may be set here.\n"
                                    + yaml.safe_dump(settings, sort_keys=False))

    def config(self, **overrides: Any) -> HubConfig:
        return HubConfig.load(self.config_path, **overrides)

    def identity(self) -> Identity:
        return Identity.load(self.key_path)

    def address(self, config: HubConfig, port: int | None = None) -> BoardAddress:
        scheme = "https" if config.tls else "http"
        fingerprint = cert_fingerprint(self.cert_path) if config.tls else None
        return BoardAddress(f"{scheme}://{_host(config.host)}:{port or config.port}", fingerprint)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
