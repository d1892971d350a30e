"""How this agent appears to boards: a name the volunteer chose, else one generated from its key.

The hostname is never used: boards publish agent names on their status pages, and a machine's
hostname often carries its owner's name ("alices-gaming-pc"). The generated name
(``adjective-noun-1234``) is derived from the agent's key id, so it is stable across restarts and
reinstalls that keep the key, differs between agents, and says nothing about the machine.
The chosen name is kept in ``name`` in the agent's home (``panal agent join --name``,
``panal agent name NAME``), so every registration (join, run, re-registration) uses the same one.
"""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

from security.errors import BadRequest

__all__ = ["NAME_FILE", "agent_name", "generated_name", "load_name", "save_name", "validate_name"]

NAME_FILE = "name"
MAX_NAME = 64   # what a board keeps of a name (hub/fleet.py)

_ADJECTIVES = (
    "amber", "brave", "calm", "clever", "cosmic", "crisp", "dapper", "eager", "fuzzy", "gentle", "golden",
    "happy", "hidden", "humble", "jolly", "keen", "kind", "lively", "lucky", "mellow", "merry", "misty",
    "nimble", "noble", "patient", "plucky", "quick", "quiet", "rapid", "rosy", "rustic", "shiny", "silent",
    "silver", "sleepy", "smooth", "snowy", "solar", "spry", "steady", "sturdy", "sunny", "swift", "tidy",
    "tiny", "velvet", "vivid", "warm", "wild", "wise", "witty", "zesty", "bold", "bright", "busy", "cheery",
    "cozy", "daring", "early", "fancy", "frosty", "grand", "jazzy", "lunar",
)
_NOUNS = (
    "badger", "beaver", "bison", "cedar", "comet", "condor", "coral", "crane", "dingo", "dolphin", "ember",
    "falcon", "fern", "finch", "fox", "gecko", "glacier", "harbor", "hawk", "heron", "ibis", "island",
    "jaguar", "kestrel", "koala", "lark", "lemur", "lynx", "maple", "meadow", "meteor", "moose", "nebula",
    "newt", "oak", "orca", "otter", "owl", "panda", "pebble", "pine", "planet", "puffin", "quail", "raven",
    "reef", "river", "robin", "salmon", "sparrow", "spruce", "squid", "stork", "summit", "tapir", "tiger",
    "toucan", "tundra", "valley", "walrus", "willow", "wombat", "yak", "zebra",
)


def generated_name(agent_id: str) -> str:
    """``adjective-noun-NNNN`` from the agent's key id: stable per key, unrelated to the machine."""
    digest = hashlib.sha256(f"panal agent name\0{agent_id}".encode()).digest()
    adjective = _ADJECTIVES[digest[0] % len(_ADJECTIVES)]
    noun = _NOUNS[digest[1] % len(_NOUNS)]
    number = int.from_bytes(digest[2:4], "big") % 10_000
    return f"{adjective}-{noun}-{number:04d}"


def validate_name(name: str) -> str:
    """A chosen name, stripped; refused when empty, too long or carrying control characters
    (it is shown on status pages and in terminals)."""
    cleaned = name.strip()
    if not cleaned:
        raise BadRequest("an agent name cannot be empty", code="bad_agent_name")
    if len(cleaned) > MAX_NAME:
        raise BadRequest(f"an agent name is at most {MAX_NAME} characters", code="bad_agent_name")
    if any(unicodedata.category(c).startswith("C") for c in cleaned):
        raise BadRequest("an agent name cannot contain control characters", code="bad_agent_name")
    return cleaned


def load_name(home_root: Path) -> str | None:
    """The name the volunteer chose, if any (an unreadable or invalid file counts as none)."""
    try:
        return validate_name((home_root / NAME_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, BadRequest):
        return None


def save_name(home_root: Path, name: str) -> str:
    """Keep the volunteer's chosen name for every later registration; returns it as stored."""
    cleaned = validate_name(name)
    home_root.mkdir(parents=True, exist_ok=True)
    (home_root / NAME_FILE).write_text(cleaned + "\n", encoding="utf-8")
    return cleaned


def agent_name(home_root: Path, agent_id: str, override: str = "") -> str:
    """What this agent registers as: ``override`` (``--name``) > the chosen name > the generated one."""
    if override.strip():
        return validate_name(override)
    return load_name(home_root) or generated_name(agent_id)
