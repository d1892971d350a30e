"""A careless operator: hubs that share one database (``peer_urls``) but each keep blobs in their own
directory. A blob one hub acknowledged (a job's input, a checkpoint) would be missing after a failover, so
such a hub refuses to serve, naming the setting."""

from __future__ import annotations

from pathlib import Path

from conftest import panal
from test_chaos import free_port


def test_a_hub_with_peers_but_no_shared_blobs_dir_refuses_to_serve(pg: str, tmp_path: Path) -> None:
    env = {"PANAL_HUB_STORE": pg, "PANAL_HUB_HUB_ID": "hub-a"}
    hub_dir, home, port = tmp_path / "hub-a", tmp_path / "home", str(free_port())
    panal("hub", "init", "--dir", str(hub_dir), "--port", port, home=home, **env)
    peer = f"https://127.0.0.1:{free_port()}/#sha256={'ab' * 32}"
    out = panal("hub", "serve", "--dir", str(hub_dir), "--port", port, "--bind", "127.0.0.1", home=home,
                check=False, timeout=60, PANAL_HUB_PEER_URLS=peer, **env)
    assert out.returncode != 0
    assert "blobs_dir" in out.stderr and "Traceback" not in out.stderr, out.stderr
