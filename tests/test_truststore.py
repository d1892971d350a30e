"""The trust store (real files) and the ``trust`` / ``peers`` CLI commands."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.cli.lan import register, render_peers
from security.errors import BadRequest, Conflict, NotFound
from security.identity import Identity
from security.truststore import TrustStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_list_remove_persist_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "home" / "trust.yaml"
    alice, bob = Identity.generate().public, Identity.generate().public
    store = TrustStore(path)
    assert store.list() == [] and not store.is_trusted(alice.id)
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        entry = store.add(alice.text(), name="alice")
    finally:
        os.umask(old_umask)
    assert (entry.id, entry.key, entry.name) == (alice.id, alice.text(), "alice")
    assert _mode(path) == 0o600
    store.add(bob)
    again = TrustStore(path)  # a second process sees the same file
    assert [(k.id, k.name) for k in again.list()] == [(alice.id, "alice"), (bob.id, None)]
    assert again.is_trusted(alice.id) and again.is_trusted(bob.id)
    assert again.get("alice").public_key() == alice

    assert store.remove("alice").id == alice.id
    assert store.remove(bob.id).id == bob.id
    assert not store.is_trusted(alice.id) and TrustStore(path).list() == []
    assert _mode(path) == 0o600
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())


def test_add_from_key_file(tmp_path: Path) -> None:
    key = Identity.generate().public
    key_file = tmp_path / "submitter.pub"
    key_file.write_text(key.text() + "\n")
    store = TrustStore(tmp_path / "trust.yaml")
    assert store.add(str(key_file)).id == key.id
    with pytest.raises(BadRequest, match="cannot read key file"):
        store.add(str(tmp_path / "missing.pub"))
    (tmp_path / "junk.pub").write_text("hello\n")
    with pytest.raises(BadRequest, match="not an Ed25519 public key"):
        store.add(str(tmp_path / "junk.pub"))


def test_errors(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust.yaml")
    key = Identity.generate().public
    store.add(key.text(), name="lab")
    with pytest.raises(Conflict, match=f"{key.id} is already trusted as 'lab'"):
        store.add(key.text(), name="other")
    with pytest.raises(Conflict, match="name 'lab' is already used"):
        store.add(Identity.generate().public, name="lab")
    with pytest.raises(BadRequest, match="one word"):
        store.add(Identity.generate().public, name="two words")
    for bad in ("ed25519:not-base64!", "ed25519:" + "QUJD", "rsa:AAAA"):
        with pytest.raises(BadRequest, match="not an Ed25519 public key"):
            store.add(bad)
    with pytest.raises(NotFound, match="no trusted key with id or name 'nobody'"):
        store.remove("nobody")
    assert len(store.list()) == 1  # failed calls changed nothing


@pytest.mark.parametrize("content", ["[1, 2", "- a\n- b\n", "keys: 3\n", "keys:\n- {id: x, key: y}\n"])
def test_corrupt_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "trust.yaml"
    path.write_text(content)
    with pytest.raises(BadRequest, match="corrupt trust store"):
        TrustStore(path).is_trusted("x")


def test_tampered_id_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "trust.yaml"
    TrustStore(path).add(Identity.generate().public)
    other = Identity.generate().public
    text = path.read_text()
    path.write_text(text.replace(text.split("id: ")[1].split()[0], other.id))
    with pytest.raises(BadRequest, match="does not match its key"):
        TrustStore(path).is_trusted(other.id)


# ------------------------------------------------------------------ CLI


def _cli(home: Path, peers: list[dict[str, Any]] | None = None) -> tuple[click.Group, dict[str, Any]]:
    @click.group()
    def cli() -> None:
        pass

    register(cli)
    obj: dict[str, Any] = {"home": home}
    if peers is not None:
        obj["peers"] = lambda: peers
    return cli, obj


def test_trust_commands(tmp_path: Path) -> None:
    cli, obj = _cli(tmp_path)
    key = Identity.generate().public
    key_file = tmp_path / "k.pub"
    key_file.write_text(key.text())
    runner = CliRunner()
    out = runner.invoke(cli, ["trust", "add", str(key_file), "--name", "alice"], obj=obj)
    assert out.exit_code == 0 and out.output == f"trusted {key.id} (alice)\n"
    assert _mode(tmp_path / "trust.yaml") == 0o600
    listed = runner.invoke(cli, ["trust", "list", "--json"], obj=obj)
    rows = [(k["id"], k["name"], k["key"]) for k in json.loads(listed.output)]
    assert rows == [(key.id, "alice", key.text())]
    assert key.id in runner.invoke(cli, ["trust", "list"], obj=obj).output
    dup = runner.invoke(cli, ["trust", "add", key.text()], obj=obj)
    assert dup.exit_code == 1 and "already trusted" in dup.output and "Traceback" not in dup.output
    bad = runner.invoke(cli, ["trust", "add", "ed25519:zzz"], obj=obj)
    assert bad.exit_code == 1 and "not an Ed25519 public key" in bad.output
    assert runner.invoke(cli, ["trust", "remove", "alice"], obj=obj).output == f"removed {key.id} (alice)\n"
    gone = runner.invoke(cli, ["trust", "remove", "alice"], obj=obj)
    assert gone.exit_code == 1 and "no trusted key" in gone.output
    assert runner.invoke(cli, ["trust", "list"], obj=obj).output == "no trusted keys\n"


def test_peers_command(tmp_path: Path) -> None:
    peer = {"id": "abc", "addresses": ["10.0.0.2"], "port": 7443, "fingerprint": "ff",
            "caps": ["cpu", "cuda"], "slots": 2, "work": True, "version": "1",
            "last_seen": time.time() - 3, "state": "alive",
            "failures": 0, "instance": "", "breaker": "closed", "trusted": True}
    cli, obj = _cli(tmp_path, [peer])
    runner = CliRunner()
    as_json = runner.invoke(cli, ["peers", "--json"], obj=obj)
    assert as_json.exit_code == 0 and json.loads(as_json.output) == [peer]
    table = runner.invoke(cli, ["peers"], obj=obj).output
    for cell in ("abc", "10.0.0.2:7443", "cpu,cuda", "3s ago", "alive", "closed", "yes"):
        assert cell in table
    assert render_peers([], False) == "no peers"
    no_source = runner.invoke(_cli(tmp_path)[0], ["peers"], obj={"home": tmp_path})
    assert no_source.exit_code == 2 and "not available" in no_source.output
