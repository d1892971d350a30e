"""The sandbox probe refuses a bubblewrap too old for the sandbox (agent/engine/sandbox.py ``MIN_BWRAP``):
without ``--disable-userns`` (0.8+) submitter code could make user namespaces of its own."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.engine.sandbox import bwrap_version, probe


@pytest.mark.parametrize(("text", "version"), [
    ("bubblewrap 0.8.0\n", (0, 8, 0)), ("bubblewrap 0.4.1", (0, 4, 1)), ("bubblewrap 0.11.0", (0, 11, 0)),
    ("bubblewrap 1.2", (1, 2)), ("", None), ("bwrap: unknown option --version", None)])
def test_the_bwrap_version_is_read_from_what_it_prints(text: str, version: tuple[int, ...] | None) -> None:
    assert bwrap_version(text) == version


@pytest.fixture
def fake_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real `bwrap` executable first on PATH, saying whatever the test writes into it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    probe.cache_clear()
    yield bin_dir / "bwrap"
    probe.cache_clear()


def _script(path: Path, version_line: str) -> None:
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo '{version_line}'; exit 0; fi\n"
                    "echo \"bwrap: unknown option $1\" >&2; exit 1\n")
    path.chmod(0o755)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")
@pytest.mark.parametrize("version_line", ["bubblewrap 0.4.0", "bubblewrap 0.7.9", "nonsense"])
def test_the_probe_refuses_a_bubblewrap_older_than_0_8_and_says_to_upgrade(fake_bwrap: Path,
                                                                           version_line: str) -> None:
    _script(fake_bwrap, version_line)
    status = probe()
    assert not status.available
    assert "0.8 or newer" in status.reason and str(fake_bwrap) in status.reason
    assert "upgrade bubblewrap to 0.8 or newer" in status.fix
    if version_line != "nonsense":
        assert version_line in status.reason


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")
def test_a_new_enough_bubblewrap_passes_the_version_check(fake_bwrap: Path) -> None:
    _script(fake_bwrap, "bubblewrap 0.8.0")
    status = probe()   # past the version check, the real sandbox start fails (this bwrap runs nothing)
    assert not status.available and "0.8 or newer" not in status.reason
