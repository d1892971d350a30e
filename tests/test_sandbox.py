"""Hostile submitter code in the real sandbox (bubblewrap): every escape attempt is contained and classified.

Each case runs code through the test-only ``untrusted`` kind (``jobs/kinds/untrusted.py``: a stand-in
for the ``python`` kind's user code) in a fresh single-use sandboxed worker, exactly as the agent runs
it, and checks the outcome's class and message and that the host saw nothing: the agent's key was not
read, no file appeared outside the work dir, the listening "hub" got no connection, no process is left.
Skips without bubblewrap (fails under CI).
"""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import SANDBOX_SECRET

from agent.engine import sandbox, sandboxed
from agent.engine.runner import Outcome, TaskRequest, Worker
from agent.engine.sandbox import MAX_PROCESSES, bwrap_argv, probe, python_paths
from agent.engine.sandbox_pool import SandboxPool
from agent.engine.sandboxed import ERROR_TAIL_CHARS, SandboxedWorker

pytestmark = pytest.mark.usefixtures("sandbox_env")


@pytest.fixture
def agent_home(tmp_path: Path) -> Path:
    """An agent home like ~/.local/share/panal with a key and state that must stay unreadable."""
    home = tmp_path / "home" / ".local" / "share" / "panal"
    (home / "work").mkdir(parents=True)
    (home / "agent.key").write_text(SANDBOX_SECRET)
    (home / "state.db").write_text(SANDBOX_SECRET)
    return home

async def run_code(pool: SandboxPool, tmp: Path, source: str, *, timeout_s: float = 60,
                   memory_gb: float | None = 1.0, inputs: dict[str, str] | None = None) -> Outcome:
    async with pool.worker() as worker:
        return await worker.run(TaskRequest(kind="untrusted", params={"source": textwrap.dedent(source)},
                                            timeout_s=timeout_s, workdir=str(tmp / "task"),
                                            max_memory_gb=memory_gb, inputs=inputs or {}))


def assert_violation(outcome: Outcome, *words: str) -> None:
    assert (outcome.ok, outcome.error_class) == (False, "sandbox_violation"), outcome.error
    for word in words:
        assert word in (outcome.error or ""), outcome.error
    assert SANDBOX_SECRET not in (outcome.error or "") and SANDBOX_SECRET not in str(outcome.values)


async def test_reading_the_agent_key_or_any_host_file_is_a_sandbox_violation(
        pool: SandboxPool, agent_home: Path, tmp_path: Path) -> None:
    for path in (agent_home / "agent.key", Path.home() / ".local/share/panal/agent.key", "/etc/shadow",
                 agent_home / "state.db"):
        outcome = await run_code(pool, tmp_path, f"result['key'] = open({str(path)!r}).read()")
        assert_violation(outcome, f"access of {path} refused", "not visible in the sandbox")


async def test_its_inputs_and_work_dir_are_readable_and_the_outputs_come_back(pool: SandboxPool,
                                                                              tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_text("input-bytes")
    outcome = await run_code(pool, tmp_path, """
        result['input'] = open(ctx.inputs['data']).read()
        (ctx.workdir / 'out.txt').write_text('made here')
        files['out'] = str(ctx.workdir / 'out.txt')
    """, inputs={"data": str(data)})
    assert outcome.ok, outcome.error
    assert outcome.values == {"input": "input-bytes"}
    assert Path(outcome.files["out"]) == tmp_path / "task" / "out.txt"
    assert (tmp_path / "task" / "out.txt").read_text() == "made here"
    assert data.read_text() == "input-bytes"


@pytest.mark.parametrize("target", ["/usr/evil", "/etc/evil", "INPUT"])
async def test_writing_outside_its_work_dir_is_a_sandbox_violation(pool: SandboxPool, tmp_path: Path,
                                                                   target: str) -> None:
    data = tmp_path / "data.bin"
    data.write_text("original")
    code = ("open(ctx.inputs['data'], 'w').write('changed')" if target == "INPUT"
            else f"open({target!r}, 'w').write('x')")
    outcome = await run_code(pool, tmp_path, code, inputs={"data": str(data)})
    assert_violation(outcome, "refused")
    assert data.read_text() == "original" and not Path("/usr/evil").exists() and not Path("/etc/evil").exists()


async def test_a_socket_to_the_hub_on_loopback_or_anywhere_is_a_sandbox_violation(
        pool: SandboxPool, tmp_path: Path) -> None:
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen()
    hub.setblocking(False)
    port = hub.getsockname()[1]
    try:
        outcome = await run_code(pool, tmp_path, f"""
            import socket
            socket.create_connection(('127.0.0.1', {port}), timeout=5)
        """)
        assert_violation(outcome, "network access refused")
        with pytest.raises(BlockingIOError):
            hub.accept()   # nothing ever reached the "hub"
        outcome = await run_code(pool, tmp_path, "import socket; socket.create_connection(('example.com', 443), 5)")
        assert_violation(outcome, "network access refused")
    finally:
        hub.close()


async def test_a_fork_bomb_hits_the_process_limit_and_leaves_no_process(
        pool: SandboxPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    made: list[Path] = []   # the process-limit groups this test's sandboxes make (other xdist workers make theirs)

    def recording(limit: int = sandbox.MAX_PROCESSES) -> sandbox.PidsCgroup | None:
        group = sandbox.pids_cgroup(limit)
        if group is not None:
            made.append(group.path)
        return group

    monkeypatch.setattr(sandboxed, "pids_cgroup", recording)
    outcome = await run_code(pool, tmp_path, """
        import os, time
        while True:
            os.fork()
    """, timeout_s=60)
    assert_violation(outcome, "process limit")
    await pool.close()   # the sandbox started ahead for the next task, too
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left, f"processes left behind: {left}"
    assert not [g for g in made if g.exists()], "process-limit groups left behind"


async def test_exhausting_memory_is_an_oom(pool: SandboxPool, tmp_path: Path) -> None:
    outcome = await run_code(pool, tmp_path, """
        hog = []
        while True:
            hog.append(bytearray(64 * 2**20))
    """, memory_gb=0.25)
    assert (outcome.ok, outcome.error_class) == (False, "oom"), outcome.error


async def test_killing_or_tracing_its_parent_does_nothing_to_the_agent(pool: SandboxPool, tmp_path: Path) -> None:
    agent = os.getpid()   # this test process plays the agent daemon
    outcome = await run_code(pool, tmp_path, f"""
        import ctypes, errno, os, signal
        result['parent'] = os.getppid()
        result['visible'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in ({agent}, os.getppid()):
            try:
                os.kill(pid, signal.SIGKILL)
                result[f'kill {{pid}}'] = 0
            except OSError as exc:
                result[f'kill {{pid}}'] = errno.errorcode[exc.errno]
        result['ptrace'] = libc.ptrace(16, {agent}, 0, 0)   # PTRACE_ATTACH to the agent
        result['ptrace_errno'] = errno.errorcode[ctypes.get_errno()]
    """)
    assert outcome.ok, outcome.error
    assert outcome.values["parent"] == 1                   # its parent is the sandbox's own init, not the agent
    assert len(outcome.values["visible"]) <= 3             # init, the worker (and the listing): no host process
    assert outcome.values[f"kill {agent}"] == "ESRCH"      # the agent is not even visible
    assert (outcome.values["ptrace"], outcome.values["ptrace_errno"]) == (-1, "ESRCH")
    assert outcome.values["kill 1"] == 0                   # the sandbox's init ignores it (pid 1 of its namespace)
    assert psutil.Process().is_running()


async def test_the_code_has_no_capabilities_no_new_privileges_and_no_network_interfaces(
        pool: SandboxPool, tmp_path: Path) -> None:
    outcome = await run_code(pool, tmp_path, """
        import os, socket
        status = dict(line.split(':', 1) for line in open('/proc/self/status'))
        result['caps'] = status['CapEff'].strip()
        result['nnp'] = status['NoNewPrivs'].strip()
        result['ifaces'] = sorted(name for _, name in socket.if_nameindex())
        result['home'] = os.path.exists(os.path.expanduser('~/.local/share/panal'))
    """)
    assert outcome.ok, outcome.error
    assert outcome.values == {"caps": "0000000000000000", "nnp": "1", "ifaces": ["lo"], "home": False}


async def test_a_shell_it_spawns_is_inside_the_sandbox_too(pool: SandboxPool, agent_home: Path, tmp_path: Path) -> None:
    outcome = await run_code(pool, tmp_path, f"""
        import subprocess
        done = subprocess.run(['sh', '-c', 'cat {agent_home / "agent.key"}; ls /root /home; curl -s http://127.0.0.1:1/'],
                              capture_output=True, text=True)
        result['out'], result['err'] = done.stdout, done.stderr
    """)
    assert outcome.ok, outcome.error
    assert SANDBOX_SECRET not in outcome.values["out"]
    assert "No such file" in outcome.values["err"]


async def test_printing_megabytes_keeps_only_a_bounded_tail_in_the_error(pool: SandboxPool, tmp_path: Path) -> None:
    outcome = await run_code(pool, tmp_path, """
        import sys
        for i in range(50_000):
            print('line', i, 'x' * 100)
        sys.stdout.flush()
        raise RuntimeError('gave up after printing')
    """)
    assert (outcome.ok, outcome.error_class) == (False, "error")
    error = outcome.error or ""
    assert "gave up after printing" in error and "line 49999" in error
    assert "characters of the task's output (5" in error   # ~5.5 MB printed, counted, the tail kept
    assert len(error) < ERROR_TAIL_CHARS + 200


async def test_hanging_past_its_timeout_is_a_timeout(pool: SandboxPool, tmp_path: Path) -> None:
    outcome = await run_code(pool, tmp_path, "import time\nwhile True: time.sleep(1)", timeout_s=2)
    assert (outcome.ok, outcome.error_class) == (False, "timeout")


async def test_an_output_or_checkpoint_linking_out_of_its_work_dir_is_refused(
        pool: SandboxPool, agent_home: Path, tmp_path: Path) -> None:
    key = agent_home / "agent.key"
    outcome = await run_code(pool, tmp_path, f"""
        import os
        os.symlink({str(key)!r}, ctx.workdir / 'model.pt')
        files['model'] = str(ctx.workdir / 'model.pt')
    """)
    assert_violation(outcome, "output files outside the task's work dir")
    stored: list[str] = []
    async with pool.worker() as worker:
        # the worker itself is the task's: it may name any path in a checkpoint frame
        reply = await worker.run(TaskRequest(kind="untrusted", params={"source": textwrap.dedent(f"""
            import os
            from agent.engine.frames import pack_frame
            os.symlink({str(key)!r}, ctx.workdir / 'ck')
            for path in ({str(key)!r}, str(ctx.workdir / 'ck')):
                ctx.out.write(pack_frame({{'checkpoint': path}})); ctx.out.flush()
        """)}, timeout_s=30, workdir=str(tmp_path / "t2")), on_checkpoint=stored.append)
    assert reply.ok, reply.error
    assert stored == []   # neither the key nor a link to it was handed to the daemon to upload


async def test_each_task_gets_a_fresh_sandbox_with_nothing_of_the_previous_one(pool: SandboxPool,
                                                                              tmp_path: Path) -> None:
    first = await run_code(pool, tmp_path, """
        import sys, os
        open('/tmp/left-behind', 'w').write('x')
        sys.modules['json'].LEFT = 1
        result['pid'] = os.getpid()
    """)
    second = await run_code(pool, tmp_path, """
        import sys, os
        result['tmp'] = os.path.exists('/tmp/left-behind')
        result['module'] = hasattr(sys.modules.get('json'), 'LEFT')
    """)
    assert first.ok and second.ok, (first.error, second.error)
    assert second.values == {"tmp": False, "module": False}


async def test_a_plain_warm_worker_keeps_serving_while_a_sandbox_is_killed(pool: SandboxPool, tmp_path: Path) -> None:
    plain = Worker({"PANAL_TEST_KINDS": "1", "PANAL_WORKER_PRELOAD": "0"})
    await plain.start()
    try:
        hostile = asyncio.ensure_future(run_code(pool, tmp_path, "import os\nwhile True: os.fork()"))
        ok = await plain.run(TaskRequest(kind="chaos", params={"mode": "ok"}, timeout_s=30,
                                         workdir=str(tmp_path / "plain")))
        assert ok.ok and ok.values["mode"] == "ok"
        assert (await hostile).error_class == "sandbox_violation"
        again = await plain.run(TaskRequest(kind="chaos", params={"mode": "ok"}, timeout_s=30,
                                            workdir=str(tmp_path / "plain2")))
        assert again.ok
    finally:
        await plain.close()


async def test_a_sandboxed_worker_runs_one_task_only(agent_home: Path, tmp_path: Path) -> None:
    worker = SandboxedWorker(agent_home / "work", gpu=False)
    try:
        assert (await worker.run(TaskRequest(kind="untrusted", params={"source": "pass"}, timeout_s=30,
                                             workdir=str(tmp_path / "a")))).ok
        with pytest.raises(RuntimeError, match="one task only"):
            await worker.run(TaskRequest(kind="untrusted", params={"source": "pass"}, timeout_s=30,
                                         workdir=str(tmp_path / "b")))
    finally:
        await worker.close()


def test_the_sandbox_binds_no_directory_holding_the_agent_home_or_gpu_nodes_unless_asked(agent_home: Path) -> None:
    root = agent_home / "work" / ".sandbox-x"
    argv = bwrap_argv(root, gpu=False, exclude=[agent_home, Path.home()])
    binds = {argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind", "--dev-bind")}
    for bound in binds:
        assert not agent_home.is_relative_to(bound) and not Path.home().is_relative_to(bound), bound
    assert not any(a.startswith("/dev/nvidia") or a in ("/dev/kfd", "/dev/dri") for a in argv)
    assert {"--unshare-all", "--die-with-parent", "--new-session", "--clearenv"} <= set(argv)
    assert all(not agent_home.is_relative_to(p) for p in python_paths([agent_home]))
    assert MAX_PROCESSES >= 64


def test_without_bwrap_the_probe_says_why_and_how_to_enable_it(monkeypatch: pytest.MonkeyPatch) -> None:
    probe.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        status = probe()
        assert not status.available
        assert "bubblewrap (bwrap) is not installed" in status.reason and "bubblewrap" in status.fix
        from agent.host.capabilities import advertised_kinds, sandbox_report

        assert "untrusted" not in advertised_kinds() and "chaos" in advertised_kinds()
        assert sandbox_report()["available"] is False and "install" in sandbox_report()["fix"]
    finally:
        probe.cache_clear()
        monkeypatch.undo()


def test_agent_info_says_why_code_is_not_advertised_and_how_to_enable_it(tmp_path: Path) -> None:
    from conftest import panal

    out = panal("agent", "info", "--no-measure", home=tmp_path / "agent", PATH="/nonexistent").stdout
    assert "sandbox: unavailable: bubblewrap (bwrap) is not installed" in out
    assert "to enable: install the `bubblewrap` package" in out
    kinds = next(line for line in out.splitlines() if line.startswith("kinds:"))
    assert "'python'" not in kinds and "'matmul'" in kinds
    here = panal("agent", "info", "--no-measure", home=tmp_path / "agent").stdout
    assert "sandbox: bwrap: submitter code (the python kind) can run here" in here
    assert "'python'" in next(line for line in here.splitlines() if line.startswith("kinds:"))


async def test_a_sandbox_started_ahead_is_closed_when_no_task_takes_it_for_the_idle_period(pool: SandboxPool) -> None:
    pool.prewarm()
    await pool.ready()
    # the sandbox's processes: bwrap and what runs under it (not this test worker's other children, e.g. the
    # warm workers or resource tracker another test left with this xdist worker)
    sandboxes = [p for p in psutil.Process().children(recursive=True) if p.name() == "bwrap"]
    started = [p.pid for root in sandboxes for p in (root, *root.children(recursive=True))]
    assert started, "the sandbox started ahead has processes"
    assert await pool.retire_idle(3600) == 0   # not idle long enough: kept for the next task
    assert await pool.retire_idle(0) == 1
    assert not [pid for pid in started if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], "its processes exited"
