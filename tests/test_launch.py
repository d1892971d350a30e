"""The ``panal`` launcher accepts the dev (editable) install and names a foreign ``hub`` in one line.

Fast checks against the dev venv; tests/test_wheel.py runs the same launcher from a built wheel.
Each check is a subprocess: in this process ``hub`` is already imported, and ``find_spec`` would
answer from ``sys.modules`` instead of searching the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# Load the launcher from its file, not through sys.path: the checkout must not come first on the
# path, or `hub` would resolve to it directly instead of through the editable install.
CHECK = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("panal_launch", {str(ROOT / "panal_launch.py")!r})
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)
print(launch.foreign_package())
"""


def check(cwd: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, env={**clean, **env}, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_launcher_accepts_the_dev_install(tmp_path: Path) -> None:
    assert check(tmp_path) == "None"


def test_the_launcher_names_a_hub_folder_ahead_of_the_dev_install(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    (foreign / "hub").mkdir(parents=True)
    (foreign / "hub" / "__init__.py").write_text('"""Not panal\'s hub."""\n')
    line = check(tmp_path, PYTHONPATH=str(foreign))
    assert line.startswith(f"panal cannot start: its package 'hub' resolves to {foreign / 'hub' / '__init__.py'}, "
                           "which belongs to no installed distribution"), line
    assert "pipx install 'panal[agent]'" in line
