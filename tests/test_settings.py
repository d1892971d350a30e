"""The one settings loader (hub and agent files): precedence flag > env > file > default, typed checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hub.config import HubConfig
from hub.settings import load_settings
from security.errors import BadRequest


@dataclass(frozen=True)
class Knobs:
    enabled: bool = False
    port: int = 1
    ratio: float = 0.5
    name: str = "x"
    tags: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)


def load(path: Path | None = None, env: dict[str, str] | None = None, section: str | None = None,
         **overrides: object) -> Knobs:
    return load_settings(Knobs, what="test", env_prefix="T_", path=path, section=section, env=env or {},
                         overrides=overrides)


def test_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "knobs.yaml"
    assert load(config) == Knobs()  # a missing file is no settings
    config.write_text("enabled: true\nport: 7\nratio: 2\nname: file\ntags: [a, ' b ', '']\nweights: {ann: 2}\n")
    from_file = load(config)
    assert from_file == Knobs(True, 7, 2.0, "file", ("a", "b"), {"ann": 2.0})
    assert isinstance(from_file.ratio, float)
    from_env = load(config, {"T_PORT": "8", "T_TAGS": "c,d", "T_NAME": "yes", "T_WEIGHTS": "{bob: 3}"})
    assert (from_env.port, from_env.tags, from_env.name, from_env.weights, from_env.enabled) == (
        8, ("c", "d"), "yes", {"bob": 3.0}, True)  # env text settings are taken as written
    flagged = load(config, {"T_PORT": "8"}, port=9, enabled=None, tags=())  # None and () are "flag not given"
    assert (flagged.port, flagged.enabled, flagged.tags) == (9, True, ("a", "b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        flagged.port = 10  # type: ignore[misc]


def test_a_section_of_a_shared_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("other: {colour: blue}\nknobs: {port: 3}\n")
    assert load(config, section="knobs").port == 3
    assert load(config, section="absent") == Knobs()
    config.write_text("knobs: [1, 2]\n")
    with pytest.raises(BadRequest, match="'knobs' must be a map"):
        load(config, section="knobs")


@pytest.mark.parametrize(("text", "env", "overrides", "match"), [
    ("colour: blue\n", {}, {}, "unknown test setting.*colour.*known: enabled, port"),
    ("- a\n- b\n", {}, {}, "expected a map of settings"),
    ("", {"T_ENABLED": "maybe"}, {}, "test setting enabled: expected true or false"),
    ("on: 1\n", {}, {}, "unknown test setting.*True"),  # YAML 1.1 reads an `on:` key as true
    ("port: many\n", {}, {}, "test setting port: expected a number"),
    ("", {}, {"ratio": True}, "test setting ratio: expected a number"),
    ("name: 5\n", {}, {}, "test setting name: expected text"),
    ("tags: 5\n", {}, {}, "test setting tags: expected a list"),
    ("weights: [1]\n", {}, {}, "test setting weights: expected a map"),
    ("weights: {ann: lots}\n", {}, {}, r"test setting weights\.ann: expected a number"),
    ("", {}, {"colour": "red"}, "unknown test setting"),
])
def test_a_bad_value_is_one_clear_error(tmp_path: Path, text: str, env: dict[str, str], overrides: dict[str, object],
                                        match: str) -> None:
    config = tmp_path / "knobs.yaml"
    config.write_text(text)
    with pytest.raises(BadRequest, match=match):
        load(config, env, **overrides)


def test_hub_config_reads_the_store_url_from_file_env_and_flag(tmp_path: Path) -> None:
    config = tmp_path / "hub.yaml"
    assert HubConfig.load(config, env={}).store == ""  # the hub dir's own database file
    config.write_text("store: sqlite:///state/board.db\nport: 9000\n")
    assert HubConfig.load(config, env={}).store == "sqlite:///state/board.db"
    assert HubConfig.load(config, env={"PANAL_HUB_STORE": "sqlite:////srv/b.db"}).store == "sqlite:////srv/b.db"
    flagged = HubConfig.load(config, env={"PANAL_HUB_PORT": "9001"}, port=9002, store="sqlite:///x.db")
    assert (flagged.store, flagged.port) == ("sqlite:///x.db", 9002)
    with pytest.raises(BadRequest, match="sqlite_synchronous"):
        HubConfig.load(config, env={"PANAL_HUB_SQLITE_SYNCHRONOUS": "sometimes"})
