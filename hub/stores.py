"""Stores by URL: the one place that turns the ``store`` setting into a :class:`~hub.store.Store`.

``sqlite:///board.db`` is a path relative to the hub directory, ``sqlite:////var/lib/panal/board.db``
an absolute one (SQLAlchemy's spelling). An empty URL is the hub's own default database file.
``postgresql://USER:PASSWORD@HOST:PORT/DATABASE`` (libpq's spelling, ``postgres://`` too) is a
PostgreSQL database that several hubs can share (hub/pg_store.py; needs the ``postgres`` extra).
"""

from __future__ import annotations

from pathlib import Path

from hub.sqlite_store import SqliteStore
from hub.store import Store
from security.errors import BadRequest

__all__ = ["SCHEMES", "create_store", "migrate_store"]

#: every scheme ``create_store`` understands, as users write them
SCHEMES = ("sqlite:///PATH", "postgresql://USER@HOST/DATABASE")


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
    if scheme in ("postgresql", "postgres"):
        return _pg_store(url)
    # only the scheme is echoed: the rest of a database URL may hold a password
    raise BadRequest(f"hub setting store: {scheme}:// stores are not supported yet "
                     f"(supported: {', '.join(SCHEMES)})")


def _pg_store(url: str) -> Store:
    try:   # the driver is an optional extra: a SQLite hub never needs it
        from hub.pg_store import PgStore
    except ImportError as exc:
        raise BadRequest("hub setting store: a postgresql:// store needs the asyncpg driver: "
                         "pip install 'panal[postgres]'") from exc
    return PgStore(url)


def _sqlite_path(rest: str, hub_dir: Path) -> Path:
    """``/board.db`` -> hub_dir/board.db; ``//abs/board.db`` -> /abs/board.db."""
    if not rest.startswith("/") or not Path(rest[1:]).name:
        raise BadRequest("hub setting store: a SQLite URL names a file: sqlite:///RELATIVE/PATH (inside the "
                         "hub directory) or sqlite:////ABSOLUTE/PATH")
    return hub_dir / rest[1:]


async def migrate_store(url: str, default_db: Path) -> list[str]:
    """``panal hub migrate``: bring the store's schema up to date now; lines that say what was done.

    Hubs do this themselves when they start; running it first lets an operator upgrade a shared
    PostgreSQL database once, before the hubs, and see what changed."""
    store = create_store(url, default_db)
    if isinstance(store, SqliteStore):
        await store.open()   # SQLite upgrades in place, column by column, when opened
        await store.close()
        return [f"SQLite database {store.path}: schema up to date"]
    from hub.pg_schema import migrate_database
    return await migrate_database(url)

