"""A hub's directory: its settings, identity, TLS certificate and database, in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hub.config import HubConfig
from security.identity import Identity
from security.tls import BoardAddress, cert_fingerprint, make_self_signed

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

    def init(self, host: str, port: int, tls: bool = True) -> HubConfig:
        """Create what is missing (never overwrites keys or certs); return the settings."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        Identity.load_or_create(self.key_path)
        if not self.config_path.exists():
            settings = {"host": host, "port": port, "tls": tls}
            self.config_path.write_text("# panal hub settings; every key of HubConfig may be set here.\n"
                                        + yaml.safe_dump(settings, sort_keys=False))
        config = self.config()
        if config.tls and not self.cert_path.exists():
            make_self_signed(self.cert_path, self.tls_key_path, [config.host])
        return config

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
