"""Hostile code end to end: `panal submit` of a `python` job, `panal hub serve`, `panal agent run` as processes.

An agent that did not consent is never sent the job and `panal job` says why; an agent joined with
`--allow-code` runs each hostile task in its sandbox: reading the agent's real key, calling the hub on
loopback, fork-bombing, flooding stdout, hanging. Each ends classified with a clear message, the key
never leaves the machine, and the agent keeps working (a later honest job succeeds).
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import InProcessHub, Procs, panal, require_sandbox, start_hub_proc
from helpers import AGENT_START_S, scaled, wait_for, wait_for_async
from test_e2e import polling, start_agent

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope, submit
from jobs.manifest import Manifest
from jobs.requirements import Capabilities
from security.identity import Identity
from security.tls import BoardAddress

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scaled(400))]

HOSTILE = '''
import os, socket, sys, time

def run(params, ctx):
    mode = params["mode"]
    if mode == "ok":
        return {"answer": 42}
    if mode == "key":
        return {"key": open(params["key"]).read()}
    if mode == "hub":
        socket.create_connection(("127.0.0.1", params["port"]), timeout=5)
    if mode == "fork":
        while True:
            os.fork()
    if mode == "flood":
        for i in range(40_000):
            print("flood", i, "x" * 100)
        raise RuntimeError("flooded")
    if mode == "hang":
        while True:
            time.sleep(1)
    return {}
'''
MODES = ["ok", "key", "hub", "fork", "flood", "hang"]


def write_job(tmp: Path, modes: list[str], **params: Any) -> Path:
    code = tmp / "job" / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "main.py").write_text(textwrap.dedent(HOSTILE))
    manifest = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "hostile"},
                "spec": {"task": "python", "code": {"path": "./code", "entry": "main:run"},
                         "params": params, "sweep": {"mode": modes}, "policy": {"retries": 0},
                         "resources": {"timeout": "20s", "max_memory_gb": 1}}}
    path = tmp / "job" / f"job-{len(modes)}.yaml"
    path.write_text(json.dumps(manifest))
    return path


def tasks(url: str, user_home: Path, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async def go() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with BoardClient(BoardAddress.parse(url), Identity.load(user_home / "user.key")) as client:
            job = (await client.call("GET", f"/v1/jobs/{job_id}"))["job"]
            return dict(job), list((await client.call("GET", f"/v1/jobs/{job_id}/tasks"))["tasks"])
    return asyncio.run(go())


def test_code_goes_only_to_a_consenting_agent_and_hostile_code_is_contained(tmp_path: Path, procs: Procs) -> None:
    require_sandbox()
    user = tmp_path / "user"
    _, url = start_hub_proc(procs, tmp_path, user)
    port = urlsplit(url).port
    fast = {"PANAL_WORKER_PRELOAD": "0"}   # the hostile code needs no torch: quick sandbox starts
    start_agent(procs, tmp_path, url, "plain", "--slots", "1", **fast)
    wait_for(lambda: polling(tmp_path / "plain"), "agent plain to poll", timeout_s=AGENT_START_S,
             diagnose=procs.logs_text)
    key = tmp_path / "coder" / "agent.key"
    job_file = write_job(tmp_path, MODES, key=str(key), port=port)
    out = panal("submit", str(job_file), "--hub", url, "--json", home=user)
    [submitted] = json.loads(out.stdout)
    job_id = submitted["id"]

    def refused() -> bool:
        return "0 of 1 connected agents accept code from you" in panal("job", job_id, "--hub", url, home=user).stdout
    wait_for(refused, "`panal job` to say no agent accepts code from the submitter", diagnose=procs.logs_text)

    panal("agent", "join", url, "--name", "coder", "--allow-code", home=tmp_path / "coder")
    coder = procs.start("agent", "run", "--name", "coder", "--threads", "1", "--slots", "2",
                        home=tmp_path / "coder", **fast)
    secret = key.read_text()

    def finished() -> bool:
        return tasks(url, user, job_id)[0]["state"] in ("failed", "succeeded")
    wait_for(finished, "the hostile job to finish", timeout_s=scaled(300), diagnose=procs.logs_text)
    _, rows = tasks(url, user, job_id)
    by_mode = {MODES[t["idx"]]: t for t in rows}
    assert by_mode["ok"]["state"] == "done"
    expect = {"key": ("sandbox_violation", "agent.key refused"), "hub": ("sandbox_violation", "network"),
              "fork": ("sandbox_violation", "process limit"), "flood": ("invalid_params", "flooded"),
              "hang": ("timeout", "time limit")}
    for mode, (failure, words) in expect.items():
        row = by_mode[mode]
        assert (row["state"], row["error_class"]) == ("failed", failure), (mode, row)
        assert words in (row["error"] or ""), (mode, row["error"])
    assert "characters of the task's output" in by_mode["flood"]["error"] and "flood 39999" in by_mode["flood"]["error"]
    results = panal("results", job_id, "--hub", url, "--json", home=user).stdout
    assert secret not in results and all(secret not in (t["error"] or "") for t in rows)
    assert all(t["agent"] != Identity.load(tmp_path / "plain" / "agent.key").id for t in rows)

    # the agent survived all of it and keeps working
    assert coder.poll() is None
    again = panal("submit", str(write_job(tmp_path, ["ok"])), "--hub", url, "--wait", "--json", home=user,
                  timeout=300)
    assert '"succeeded"' in again.stdout, again.stdout


async def test_the_agent_hands_back_code_a_lying_hub_sends_without_its_consent(
        tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    require_sandbox()
    monkeypatch.setenv("PANAL_TEST_KINDS", "1")   # the board (in this process) knows the sandboxed test kind
    hub = InProcessHub(tmp_path)
    server = await hub.start()
    try:
        assert hub.address is not None
        user = Identity.generate()
        await server.add_submitter(user.public, "user")
        home = tmp_path / "coder"   # joined WITHOUT --allow-code
        await asyncio.to_thread(panal, "agent", "join", hub.address.join_url(), "--name", "coder", home=home)
        procs.start("agent", "run", "--name", "coder", "--threads", "1", home=home, PANAL_TEST_KINDS="1",
                    PANAL_WORKER_PRELOAD="0")
        agent = Identity.load(home / "agent.key").public
        board = server.board

        def registered() -> bool:   # by the running daemon (`join` registers too, without code_from)
            return agent.id in board.agents and "code_from" in board.agents[agent.id].caps.raw
        await wait_for_async(registered, "the running agent to register", timeout_s=AGENT_START_S,
                             diagnose=procs.logs_text)
        state = board.agents[agent.id]
        assert state.caps.code_from == frozenset()   # what the agent told the board: nobody's code
        # the lying hub: it records consent the agent never gave
        await board.register_agent(agent, "coder", Capabilities.from_dict({**state.caps.raw, "code_from": ["*"]}))
        manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "sneaky"},
                                       "spec": {"task": "untrusted", "params": {"source": "result['ran'] = 1"}}})
        async with BoardClient(hub.address, user, retry_for_s=5) as client:
            job = await submit(client, make_envelope(user, manifest))

        def log_says_refused() -> bool:
            return "refusing job" in procs.logs_text() and "does not accept" in procs.logs_text()
        await wait_for_async(log_says_refused, "the agent to hand the task back", timeout_s=scaled(60),
                             diagnose=procs.logs_text)
        [task] = await board.tasks_of(job["id"])
        assert task.state.value in ("queued", "leased") and task.error_class is None   # handed back, never run
        assert "failed (" not in procs.logs_text() and "result" not in str(task.error or "")
    finally:
        await hub.stop()


def test_panal_up_runs_its_owners_own_code_in_the_sandbox(tmp_path: Path, procs: Procs) -> None:
    require_sandbox()
    home = tmp_path / "me"
    up = procs.start("up", "--port", "0", home=home, PANAL_WORKER_PRELOAD="0")
    assert up.stdout is not None and "board at http://127.0.0.1:" in up.stdout.readline(), procs.logs_text()
    sub = panal("submit", str(write_job(tmp_path, ["ok", "key"], key=str(home / "agent.key"))), "--wait", "--json",
                home=home, timeout=300, check=False)
    [job] = json.loads(sub.stdout)
    assert job["tasks"] == {"done": 1, "failed": 1}, job   # its own code ran, and stayed in the sandbox
    assert (home / "agent.key").read_text() not in sub.stdout + sub.stderr
