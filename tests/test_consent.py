"""Consent to run submitter code: off by default, given per key (`trust add --code`) or per board
(`agent join --allow-code`), told to the board, honoured by its matching and explained to the submitter."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import FakeClock

from agent.cli.lan import register
from agent.client.submitting import make_envelope
from agent.daemon.hooks import CodeConsent
from agent.host.home import AgentHome
from hub.board import Board
from hub.config import HubConfig
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.requirements import MAX_CODE_KEYS, Capabilities, Requirements, explain, unmet
from security.identity import Identity
from security.tls import BoardAddress
from security.truststore import TrustStore


@pytest.fixture(autouse=True)
def _test_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PANAL_TEST_KINDS", "1")   # `untrusted`: a sandboxed kind without a code bundle


def code_job(kind: str = "untrusted") -> Manifest:
    params = {"source": "result['x'] = 1"} if kind == "untrusted" else {"seconds": 0}
    return Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "c"},
                               "spec": {"task": kind, "params": params}})


def caps(*code_from: str) -> Capabilities:
    return Capabilities.from_dict({"kinds": ["untrusted", "sleep"], "code_from": list(code_from)})


def test_trust_add_code_is_off_by_default_and_upgrades_a_trusted_key(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trust.yaml")
    alice, bob = Identity.generate().public, Identity.generate().public
    store.add(alice.text(), name="alice")
    store.add(bob.text(), name="bob", code=True)
    assert store.code_ids() == [bob.id]
    assert store.add(alice.text(), code=True).code and sorted(store.code_ids()) == sorted([alice.id, bob.id])
    assert [k.name for k in store.list()] == ["alice", "bob"]   # upgraded in place, not added twice


def test_trust_cli_add_code_says_so_and_lists_it(tmp_path: Path) -> None:
    import click

    cli = click.Group()
    register(cli)
    key = Identity.generate().public
    runner = CliRunner()
    obj = {"trust_path": str(tmp_path / "trust.yaml")}
    added = runner.invoke(cli, ["trust", "add", key.text(), "--name", "carol", "--code"], obj=obj)
    assert added.exit_code == 0 and "its code too" in added.output, added.output
    listed = runner.invoke(cli, ["trust", "list", "--json"], obj=obj)
    assert '"code": true' in listed.output
    plain = runner.invoke(cli, ["trust", "add", Identity.generate().public.text()], obj=obj)
    assert plain.exit_code == 0 and "code" not in plain.output


def test_join_allow_code_is_stored_with_that_board_only(tmp_path: Path) -> None:
    home = AgentHome(tmp_path)
    home.add_board(BoardAddress("https://a.example:1", "ab" * 32), allow_code=True)
    home.add_board(BoardAddress("https://b.example:1", "cd" * 32))
    assert home.code_boards() == {"https://a.example:1"}
    assert [b.url for b in home.boards()] == ["https://a.example:1", "https://b.example:1"]
    home.add_board(BoardAddress("https://a.example:1", "ab" * 32))   # joined again without it: revoked
    assert home.code_boards() == set()
    assert yaml.safe_load(home.boards_path.read_text())[-1] == {"url": "https://a.example:1", "fingerprint": "ab" * 32}


def test_consent_report_is_bounded_and_says_any_for_an_allow_code_board() -> None:
    assert CodeConsent().report() == [] and not CodeConsent().accepts("k")
    assert CodeConsent(any_submitter=True).report() == ["*"] and CodeConsent(any_submitter=True).accepts("k")
    many = frozenset(f"key{i:04d}" for i in range(MAX_CODE_KEYS + 50))
    consent = CodeConsent(keys=lambda: many)
    assert len(consent.report()) == MAX_CODE_KEYS and consent.accepts("key0001")
    with pytest.raises(ValueError, match="code_from"):
        Capabilities.from_dict({"code_from": [f"k{i}" for i in range(MAX_CODE_KEYS + 1)]})
    with pytest.raises(ValueError, match="code_from"):
        Capabilities.from_dict({"code_from": "*"})


def test_matching_sends_code_only_to_agents_that_accept_it_from_that_submitter() -> None:
    req = Requirements(code_from="alice")
    assert unmet(req, "untrusted", caps()) == ["code"]
    assert unmet(req, "untrusted", caps("bob")) == ["code"]
    assert unmet(req, "untrusted", caps("alice")) == []
    assert unmet(req, "untrusted", caps("*")) == []
    assert unmet(Requirements(), "sleep", caps()) == []   # catalog kinds need no consent
    lines = explain(req, "untrusted", [caps(), caps("bob"), caps(), caps(), caps("alice")])
    assert lines == ["1 of 5 connected agents accepts code from you (a volunteer consents with "
                     "`panal trust add KEY --code` or `panal agent join URL --allow-code`)"]


async def test_the_board_routes_a_code_job_only_to_a_consenting_agent_and_explains_refusals(tmp_path: Path) -> None:
    board = Board(SqliteStore(tmp_path / "b.db"), HubConfig(expiry_interval_s=3600), FakeClock(1_000_000.0))
    await board.start()
    try:
        user, other, plain, willing = (Identity.generate() for _ in range(4))
        await board.register_agent(plain.public, "plain", caps())
        await board.register_agent(other.public, "other", caps(other.id))
        job, _ = await board.submit(make_envelope(user, code_job()), user.id)
        assert job.requires["code_from"] == user.id   # set by the board, from the signer, not the manifest
        assert await board.lease(plain.id, 1, 0) == [] and await board.lease(other.id, 1, 0) == []
        waiting = (await board.job_view(job.id))["waiting_because"]
        assert any(line.startswith("0 of 2 connected agents accept code from you") for line in waiting), waiting
        await board.register_agent(willing.public, "willing", caps("*"))
        [task] = await board.lease(willing.id, 1, 0)
        assert task.job_id == job.id
        sleep_job, _ = await board.submit(make_envelope(user, code_job("sleep")), user.id)
        assert "code_from" not in sleep_job.requires
        assert [t.job_id for t in await board.lease(plain.id, 1, 0)] == [sleep_job.id]
    finally:
        await board.stop()
