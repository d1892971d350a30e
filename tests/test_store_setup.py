"""Where a board's store lives (the ``store`` setting: a URL, resolved against the hub's directory; an unsupported
or malformed one refused by name) and how a database an earlier panal wrote opens: upgraded in place, its rows kept.
The contract every store keeps is tests/test_store_contract.py."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from test_store_contract import SIGNER, job, opened, sha, tasks

from hub.config import HubConfig
from hub.server import BoardServer
from hub.sqlite_store import SqliteStore
from hub.stores import create_store
from security.errors import BadRequest
from security.records import SignedRecord


def test_an_empty_url_is_the_default_file_and_sqlite_paths_resolve_against_the_hub_dir(tmp_path: Path) -> None:
    hub_dir = tmp_path / "hub"
    default = create_store("", hub_dir / "board.db")
    relative = create_store("sqlite:///state/other.db", hub_dir / "board.db", synchronous="full")
    absolute = create_store(f"sqlite:///{tmp_path}/abs.db", hub_dir / "board.db")
    assert isinstance(default, SqliteStore) and default.path == hub_dir / "board.db"
    assert isinstance(relative, SqliteStore) and relative.path == hub_dir / "state" / "other.db"
    assert relative.synchronous == "FULL"
    assert isinstance(absolute, SqliteStore) and absolute.path == tmp_path / "abs.db"


async def test_a_relative_url_store_lives_in_the_hub_dir(tmp_path: Path) -> None:
    store = create_store("sqlite:///board.db", tmp_path / "ignored.db")
    await store.open()
    await store.add_submitter("k1", "ed25519:one", "ann")
    await store.close()
    assert (tmp_path / "board.db").exists() and not (tmp_path / "ignored.db").exists()


@pytest.mark.parametrize("url", ["mysql://panal:s3cret@db.example/panal", "redis://localhost/0"])
def test_an_unsupported_scheme_is_refused_by_name_without_echoing_the_url(url: str, tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as raised:
        create_store(url, tmp_path / "board.db")
    message = raised.value.message
    assert "not supported yet" in message and "sqlite:///" in message
    assert url.split("://")[0] + "://" in message and "s3cret" not in message


@pytest.mark.parametrize("url", ["board.db", "sqlite://", "sqlite:///", "sqlite://host/board.db"])
def test_a_malformed_store_url_is_a_clear_error(url: str, tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="store"):
        create_store(url, tmp_path / "board.db")


async def test_a_board_server_keeps_its_state_where_the_store_setting_says(tmp_path: Path) -> None:
    config = HubConfig(bind="127.0.0.1", port=0, tls=False, store="sqlite:///state/elsewhere.db")
    server = BoardServer(config, tmp_path / "board.db", None)
    await server.start()
    await server.add_submitter(SIGNER.public, "ann")
    await server.stop()
    assert not (tmp_path / "board.db").exists()
    async with opened(lambda: create_store(config.store, tmp_path / "board.db")) as store:
        assert await store.list_submitters() == [(SIGNER.id, SIGNER.public.text(), "ann")]


# -- databases of earlier versions ------------------------------------------------------------------
async def test_a_database_of_an_earlier_version_is_upgraded_in_place(tmp_path: Path) -> None:
    """A hub database made before checkpoint records existed opens, keeps its rows, and stores them."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE tasks (id TEXT PRIMARY KEY, job_id TEXT NOT NULL, idx INTEGER NOT NULL, params BLOB NOT NULL, "
        "state TEXT NOT NULL, attempt INTEGER NOT NULL, lease_id TEXT, agent_id TEXT, lease_expires_at REAL, "
        "error TEXT, error_class TEXT, progress REAL NOT NULL DEFAULT 0, updated_at REAL NOT NULL, checkpoint TEXT);")
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        row = job("j1")
        t0, t1 = tasks(row)
        await store.create_job(row, [t0, t1])
        record = SignedRecord.sign(SIGNER, {"sha256": sha("c")}).to_wire()
        await store.save_tasks([replace(t0, checkpoint=sha("c"), checkpoint_record=record)])
        assert (await store.get_tasks("j1"))[0].checkpoint_record == record
    finally:
        await store.close()


async def test_a_database_from_before_validation_is_upgraded_at_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, submitter_id TEXT NOT NULL, kind TEXT NOT NULL,"
        " priority INTEGER NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL, n_tasks INTEGER NOT NULL,"
        " envelope BLOB NOT NULL, requires TEXT NOT NULL, timeout_s REAL NOT NULL, max_attempts INTEGER NOT NULL,"
        " deadline_at REAL, finished_at REAL, error TEXT, labels TEXT NOT NULL DEFAULT '{}');"
        "CREATE TABLE tasks (id TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL,"
        " params BLOB NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, lease_id TEXT, agent_id TEXT,"
        " lease_expires_at REAL, error TEXT, error_class TEXT, progress REAL NOT NULL DEFAULT 0,"
        " updated_at REAL NOT NULL, checkpoint TEXT);")
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        row = job("j1")
        await store.create_job(row, tasks(row))
        assert [t.unit for t in await store.get_tasks("j1")] == [None, None]
        assert (await store.load_trust()).credit == {}
    finally:
        await store.close()


async def test_a_job_stored_before_reports_existed_reads_back_with_none(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, submitter_id TEXT NOT NULL, kind TEXT NOT NULL,"
        " priority INTEGER NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL, n_tasks INTEGER NOT NULL,"
        " envelope BLOB NOT NULL, requires TEXT NOT NULL, timeout_s REAL NOT NULL, max_attempts INTEGER NOT NULL,"
        " deadline_at REAL, finished_at REAL, error TEXT, labels TEXT NOT NULL DEFAULT '{}',"
        " validation TEXT NOT NULL DEFAULT '{}');"
        "INSERT INTO jobs VALUES ('j0', 'old', 'k', 'sleep', 0, 'succeeded', 1.0, 1, x'80', '{}', 60.0, 1, NULL,"
        " 2.0, NULL, '{}', '{}');")
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        old = await store.get_job("j0")
        assert old is not None and old.report == {} and old.best is None
    finally:
        await store.close()
