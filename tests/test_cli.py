"""The `panal` CLI as a first user meets it: real processes, a real board, real files."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT, InProcessHub, Procs, panal

from agent.cli.control import render_status
from agent.cli.lan import peers_command
from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from agent.host.home import AgentHome
from jobs.manifest import Manifest
from security.identity import Identity, PublicKey
from security.records import SignedRecord

CLI_MODULES = ["cli", "cli.root", "cli.common", "cli.agent", "cli.hub", "cli.jobs", "cli.lan", "cli.service",
               "cli.control", "cli.tools", "cli.results"]
#: what PyTorch says when a tensor does not fit in memory; rich would take the brackets for markup
TORCH_OOM = ("RuntimeError: [enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: "
             "not enough memory: you tried to allocate 1099511627776 bytes.")


@pytest.mark.parametrize("module", CLI_MODULES)
def test_each_cli_module_imports_on_its_own(module: str) -> None:
    proc = subprocess.run([sys.executable, "-c", f"import agent.{module}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_hub_init_again_changes_the_port_given_and_keeps_host_keys_and_certificate(tmp_path: Path) -> None:
    user, hub_dir = tmp_path / "user", tmp_path / "hub"
    first = panal("hub", "init", "--dir", str(hub_dir), "--host", "10.0.0.7", "--port", "9001", home=user)
    old_url = first.stdout.strip().splitlines()[-1]
    assert old_url.startswith("https://10.0.0.7:9001/#sha256=")
    key, cert = (hub_dir / "hub.key").read_bytes(), (hub_dir / "tls" / "cert.pem").read_bytes()

    again = panal("hub", "init", "--dir", str(hub_dir), "--port", "9002", home=user)
    assert f"updated {hub_dir / 'hub.yaml'}: port 9001 -> 9002 (keys and certificate kept)" in again.stdout
    assert "agents that joined the old URL must join the new one" in again.stdout
    new_url = again.stdout.strip().splitlines()[-1]
    assert new_url == old_url.replace(":9001/", ":9002/")   # same host, same pinned fingerprint
    settings = yaml.safe_load((hub_dir / "hub.yaml").read_text())
    assert (settings["host"], settings["port"], settings["tls"]) == ("10.0.0.7", 9002, True)
    assert (hub_dir / "hub.key").read_bytes() == key and (hub_dir / "tls" / "cert.pem").read_bytes() == cert
    assert panal("hub", "url", "--dir", str(hub_dir), home=user).stdout.strip() == new_url

    unchanged = panal("hub", "init", "--dir", str(hub_dir), home=user)
    assert "already initialised: settings, keys and certificate unchanged" in unchanged.stdout
    assert unchanged.stdout.strip().splitlines()[-1] == new_url


async def test_a_task_error_with_brackets_shows_verbatim_in_panal_job(hub: InProcessHub, tmp_path: Path) -> None:
    assert hub.server is not None and hub.address is not None
    user_home = tmp_path / "user"
    me = AgentHome(user_home).user_identity()
    await hub.server.add_submitter(me.public, "me")
    manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "big"},
                                   "spec": {"task": "sleep", "params": {"seconds": 0}}})
    agent = Identity.generate()
    async with BoardClient(hub.address, me, retry_for_s=1) as sub, \
            BoardClient(hub.address, agent, retry_for_s=1) as worker:
        job = await submit(sub, make_envelope(me, manifest))
        await worker.call("POST", "/v1/agents", {"public_key": agent.public.text(), "name": "a",
                                                 "capabilities": {"kinds": ["sleep"]}})
        [task] = (await worker.call("POST", "/v1/lease", {"slots": 1, "wait_s": 5}))["tasks"]
        failed = SignedRecord.sign(agent, {"task_id": task["task_id"], "job_id": task["job_id"],
                                           "lease_id": task["lease_id"], "attempt": task["attempt"],
                                           "agent_id": agent.id, "status": "failed", "error_class": "oom",
                                           "error": TORCH_OOM}).to_wire()
        await worker.call("POST", f"/v1/tasks/{task['task_id']}/result", {"result": failed})

    # an OOM is retried: the job runs on, and only the task table tells why its attempt failed
    shown = await asyncio.to_thread(panal, "job", job["id"], "--hub", hub.address.join_url(), home=user_home,
                                    COLUMNS="200")
    assert "[enforce fail at alloc_cpu.cpp:127] data. Defa" in shown.stdout, shown.stdout


def test_peer_announcements_with_brackets_show_verbatim_in_panal_peers(tmp_path: Path) -> None:
    peer = {"id": "[bold]mallory[/bold]", "addresses": ["10.0.0.2"], "port": 7443, "caps": ["cpu", "[red]gpu"],
            "slots": 1, "work": False, "last_seen": time.time(), "state": "alive", "breaker": "closed",
            "trusted": None}
    result = CliRunner().invoke(peers_command, [], obj={"home": tmp_path, "peers": lambda: [peer]})
    assert result.exit_code == 0, result.output
    assert "[bold]mallory[/bold]" in result.output and "cpu,[red]gpu" in result.output


def test_agent_status_shows_task_and_board_text_with_brackets_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    render_status({"state": "busy", "tasks": [{"id": "t1", "kind": "k[bold]x", "progress": 0.5,
                                               "board": "https://h/[red]"}],
                   "boards": [{"url": "https://b/[1]", "breaker": "closed"}]})
    out = capsys.readouterr().out
    assert "k[bold]x" in out and "https://h/[red]" in out and "https://b/[1]" in out


def test_agent_status_shows_lan_peers_and_paused_gpus_as_text_not_raw_maps(
        capsys: pytest.CaptureFixture[str]) -> None:
    render_status({"state": "idle", "gpu_paused": {"0": "another program uses it (91%)"},
                   "lan": {"board": "https://192.0.2.7:4000/#sha256=ab", "open": False, "trusted_submitters": ["k"]},
                   "peers": [{"id": "peerid0123456789xyz", "addresses": ["192.0.2.9"], "port": 4001,
                              "state": "alive", "breaker": "closed", "work": True}]})
    out = capsys.readouterr().out
    assert "LAN board: https://192.0.2.7:4000/ (1 trusted submitter(s))" in out
    assert "192.0.2.9:4001" in out and "alive" in out and "GPU 0 paused: another program uses it (91%)" in out
    assert "{" not in out and "sha256" not in out   # no raw maps, no fingerprints


def test_agent_set_a_negative_value_is_refused_by_the_preference_check(tmp_path: Path) -> None:
    refused = panal("agent", "set", "daily_cap_hours", "-3", home=tmp_path, check=False)
    assert refused.returncode == 1
    assert "daily_cap_hours: must be between 0 and 24, got '-3'" in refused.stderr, refused.stderr
    assert not (tmp_path / "prefs.yaml").exists()
    assert panal("agent", "set", "daily_cap_hours", "3", home=tmp_path).stdout == "daily_cap_hours = 3.0\n"


def _key_with_a_slash() -> PublicKey:
    while True:
        key = Identity.generate().public
        if "/" in key.text():
            return key


def test_trust_add_takes_unprefixed_key_text_with_a_slash_as_a_key(tmp_path: Path) -> None:
    key = _key_with_a_slash()
    added = panal("trust", "add", key.text().removeprefix("ed25519:"), "--name", "bob", home=tmp_path)
    assert added.stdout == f"trusted {key.id} (bob)\n"


def test_trust_add_says_why_a_missing_file_or_a_file_without_a_key_is_refused(tmp_path: Path) -> None:
    missing = panal("trust", "add", "keys/alice.pub", home=tmp_path, check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "no key file keys/alice.pub, and 'keys/alice.pub' is not an Ed25519 public key either" \
        in missing.stderr, missing.stderr
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\n")
    wrong = panal("trust", "add", str(junk), home=tmp_path, check=False)
    assert wrong.returncode == 1 and f"{junk} does not hold an Ed25519 public key" in wrong.stderr, wrong.stderr


def _wait_for_file(path: Path, proc: subprocess.Popen[str], procs: Procs, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        assert proc.poll() is None, f"the agent exited ({proc.returncode})\n{procs.logs_text()}"
        assert time.monotonic() < deadline, f"{path} never appeared\n{procs.logs_text()}"
        time.sleep(0.1)
    return path.read_text().strip()


@pytest.mark.slow
def test_a_lan_board_tells_a_stranger_to_be_trusted_with_panal_trust_add(tmp_path: Path, procs: Procs) -> None:
    agent_home, stranger_home = tmp_path / "agent", tmp_path / "stranger"
    lan_env = {"PANAL_LAN_ENABLED": "true", "PANAL_LAN_INTERFACES": "lo", "PANAL_WORKER_PRELOAD": "0"}
    proc = procs.start("agent", "run", home=agent_home, **lan_env)
    board = _wait_for_file(agent_home / "lan-board.url", proc, procs)
    manifest = tmp_path / "job.yaml"
    manifest.write_text("apiVersion: panal/v1\nkind: Job\nmetadata: {name: hello}\n"
                        "spec: {task: sleep, params: {seconds: 0}}\n")
    stranger = AgentHome(stranger_home).user_identity().public

    refused = panal("submit", str(manifest), "--hub", board, home=stranger_home, check=False)
    assert refused.returncode == 1
    assert f"`panal trust add {stranger.text()}`" in refused.stderr, refused.stderr
    assert "hub submitters add" not in refused.stderr

    # the advice works: once the agent's owner trusts the key, the board takes the job
    panal("trust", "add", stranger.text(), home=agent_home)
    deadline = time.monotonic() + 30
    while (out := panal("submit", str(manifest), "--hub", board, home=stranger_home, check=False)).returncode:
        assert time.monotonic() < deadline and "not an authorised submitter" in out.stderr, out.stderr
    assert out.stdout.startswith("submitted ")
