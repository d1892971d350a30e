"""The hub is light: it must import and serve without torch installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT

SCRIPT = textwrap.dedent("""
    import asyncio, sys, importlib.abc

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not installed (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoTorch())
    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        del sys.modules[name]

    from pathlib import Path
    from hub.config import HubConfig
    from hub.server import BoardServer
    from hub.board import Board
    from security.identity import Identity
    from jobs.manifest import Manifest
    from jobs.catalog import all_kinds

    async def main():
        config = HubConfig(bind="127.0.0.1", port=0, tls=False)
        server = BoardServer(config, Path(sys.argv[1]) / "b.db", None)
        await server.start()
        user = Identity.generate()
        await server.add_submitter(user.public, "u")
        m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "x"},
                                "spec": {"task": "matmul", "params": {"size": 64}}})
        from security.records import SignedRecord
        env = SignedRecord.sign(user, {"manifest": m.source, "created": 0, "nonce": "n"}).to_wire()
        job, created = await server.board.submit(env, user.id)
        assert created and job.n_tasks == 1
        await server.stop(drain=False)
        assert "torch" not in sys.modules
        print("ok", sorted(all_kinds()))

    asyncio.run(main())
""")


def test_hub_imports_and_serves_without_torch(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok") and "matmul" in proc.stdout
