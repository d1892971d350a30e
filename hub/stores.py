"""Stores by URL: the one place that turns the ``store`` setting into a :class:`~hub.store.Store`.

``sqlite:///board.db`` is a path relative to the hub directory, ``sqlite:////var/lib/panal/board.db``
an absolute one (SQLAlchemy's spelling). An empty URL is the hub's own default database file.
PostgreSQL (``postgresql://...``) is the next scheme; until it exists it is refused by name.
"""

from __future__ import annotations

from pathlib import Path

from hub.sqlite_store import SqliteStore
from hub.store import Store
from security.errors import BadRequest

__all__ = ["SCHEMES", "create_store"]

#: every scheme ``create_store`` understands, as users write them
SCHEMES = ("sqlite:///PATH",)


def create_store(url: str, default_db: Path, *, synchronous: str = "normal") -> Store:
    """The store ``url`` names, not yet opened (its board opens and closes it).

    ``default_db`` is the database file used when ``url`` is empty; its directory (the hub
    directory) is where a relative SQLite path points.
    """
    if not url:
        return SqliteStore(default_db, synchronous)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise BadRequest(f"hub setting store: expected a URL such as sqlite:///board.db, got {url!r}")
    if scheme == "sqlite":
        return SqliteStore(_sqlite_path(rest, default_db.parent), synchronous)
    # only the scheme is echoed: the rest of a database URL may hold a password
    raise BadRequest(f"hub setting store: {scheme}:// stores are not supported yet "
                     f"(supported: {', '.join(SCHEMES)})")


def _sqlite_path(rest: str, hub_dir: Path) -> Path:
    """``/board.db`` -> hub_dir/board.db; ``//abs/board.db`` -> /abs/board.db."""
    if not rest.startswith("/") or not Path(rest[1:]).name:
        raise BadRequest("hub setting store: a SQLite URL names a file: sqlite:///RELATIVE/PATH (inside the "
                         "hub directory) or sqlite:////ABSOLUTE/PATH")
    return hub_dir / rest[1:]
