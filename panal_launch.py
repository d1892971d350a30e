"""The ``panal`` console script: check that panal's import packages are panal's, then run the CLI.

panal's packages have short names (``agent``, ``hub``, ``jobs``, ``security``) that other PyPI
distributions use too (``hub`` 3.0.1 is Activeloop's data-set library). Installed side by side, one
shadows or overwrites the other and the CLI would die in a confusing traceback. This module has a
name nobody else uses and imports none of those packages before the check, so a clash is one line
naming the package, where it resolved, who owns it and the fix. Cheap: no package is imported,
only panal's RECORD is read; the other distributions are searched only once a clash is found.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import sys
from base64 import urlsafe_b64encode
from pathlib import Path

__all__ = ["PACKAGES", "foreign_package", "main"]

DISTRIBUTION = "panal"
PACKAGES = ("security", "jobs", "hub", "agent")
FIX = ("install panal into its own environment: pipx install 'panal[agent]', or "
       "python3 -m venv ~/.panal-venv && ~/.panal-venv/bin/pip install 'panal[agent]'")


def _editable_source(dist: md.Distribution) -> Path | None:
    """The source tree of an editable install (PEP 610 ``direct_url.json``), else None."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    if not info.get("dir_info", {}).get("editable") or not str(info.get("url", "")).startswith("file:"):
        return None
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return Path(url2pathname(urlparse(info["url"]).path)).resolve()


def _file_hash(path: Path, mode: str) -> str:
    """A RECORD-style digest: urlsafe base64 without padding."""
    digest = hashlib.new(mode, path.read_bytes()).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _is_ours(dist: md.Distribution, name: str, origin: Path) -> bool:
    """Whether ``origin`` (the file ``name`` resolves to) is the one panal installed, unmodified."""
    source = _editable_source(dist)
    if source is not None:
        return origin == source / name / "__init__.py"
    wanted = f"{name}/__init__.py"
    for record in dist.files or ():
        if record.as_posix() != wanted:
            continue
        if Path(str(dist.locate_file(record))).resolve() != origin:
            return False  # panal's copy is elsewhere: something earlier on sys.path shadows it
        return record.hash is None or _file_hash(origin, record.hash.mode) == record.hash.value
    return False


def _owners(name: str, origin: Path) -> list[str]:
    """Every other installed distribution whose RECORD lists ``origin`` ("hub 3.0.1")."""
    names = md.packages_distributions().get(name, [])
    owners = []
    for dist_name in dict.fromkeys(names):
        if dist_name.lower() == DISTRIBUTION:
            continue
        dist = md.distribution(dist_name)
        if any(Path(str(dist.locate_file(f))).resolve() == origin for f in dist.files or ()):
            owners.append(f"{dist_name} {dist.version}")
    return owners


def foreign_package() -> str | None:
    """One line naming the first panal package that is not panal's own code, or None when all are."""
    try:
        dist = md.distribution(DISTRIBUTION)
    except md.PackageNotFoundError:
        return None  # run from a source tree that is not installed: nothing to compare with
    if dist.files is None and _editable_source(dist) is None:
        return None  # no RECORD: cannot tell
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is not None and _is_ours(dist, name, origin):
            continue
        if origin is None:
            where = "nothing importable" if spec is None else "a folder without __init__.py"
            return (f"panal cannot start: its package {name!r} resolves to {where}, so this panal "
                    f"{dist.version} install is broken; {FIX}")
        owners = _owners(name, origin)
        owner = (f"the distribution {' and '.join(owners)}" if owners
                 else "no installed distribution (a folder on sys.path or PYTHONPATH)")
        return (f"panal cannot start: its package {name!r} resolves to {origin}, which belongs to "
                f"{owner}, not to panal {dist.version}; {FIX}")
    return None


def main() -> None:
    """Entry point of the ``panal`` script."""
    problem = foreign_package()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(1)
    from agent.cli import main as cli_main

    cli_main()


if __name__ == "__main__":   # `python -m panal_launch ...`: what the service units run
    main()
