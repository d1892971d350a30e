"""Escapes found by the security review, each tried for real in bubblewrap (skips without it).

The sandbox's private directory ``root`` is bound writable, so the code can rename ``root/work`` and
put a symlink to the agent's home in its place; the agent must not then read (and upload) the key
as an output or checkpoint, nor move its home's files. A FIFO named as a checkpoint must not hang
the agent's event loop. Files past the disk cap end the task as a classified violation.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import SANDBOX_SECRET

from agent.engine.runner import Outcome, TaskRequest
from agent.engine.sandbox_pool import SandboxPool

pytestmark = pytest.mark.usefixtures("sandbox_env")


@pytest.fixture
def agent_home(tmp_path: Path) -> Path:
    """An agent home whose only file holding the secret is its key (a copy anywhere else is a leak)."""
    home = tmp_path / "home" / ".local" / "share" / "panal"
    (home / "work").mkdir(parents=True)
    (home / "agent.key").write_text(SANDBOX_SECRET)
    return home

async def run_code(pool: SandboxPool, workdir: Path, source: str, *, timeout_s: float = 60,
                   on_checkpoint: list[str] | None = None, disk_gb: float | None = None) -> Outcome:
    async with pool.worker() as worker:
        request = TaskRequest(kind="untrusted", params={"source": textwrap.dedent(source)}, timeout_s=timeout_s,
                              workdir=str(workdir), max_memory_gb=1.0)
        if disk_gb is not None:
            request = request
        return await worker.run(request, on_checkpoint=None if on_checkpoint is None else on_checkpoint.append)


SWAP = """
    import os
    root = ctx.workdir.parent
    os.rename(ctx.workdir, root / 'moved')
    os.symlink({home!r}, ctx.workdir)
"""


@pytest.mark.parametrize("existing_workdir", [False, True])
async def test_swapping_its_work_dir_for_a_link_to_the_agent_home_leaks_and_moves_nothing(
        pool: SandboxPool, agent_home: Path, tmp_path: Path, existing_workdir: bool) -> None:
    workdir = tmp_path / "task"
    if existing_workdir:
        workdir.mkdir()
    outcome = await run_code(pool, workdir, SWAP.format(home=str(agent_home)) + """
    files['key'] = str(ctx.workdir / 'agent.key')
    """)
    assert (outcome.ok, outcome.error_class) == (False, "sandbox_violation"), (outcome.ok, outcome.error)
    assert "work dir" in (outcome.error or "")
    assert outcome.files == {}
    assert (agent_home / "agent.key").read_text() == SANDBOX_SECRET   # still there: nothing of the home was moved
    assert not workdir.is_symlink()
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != agent_home / "agent.key":
            assert SANDBOX_SECRET not in path.read_text(errors="replace"), path


async def test_a_checkpoint_through_a_swapped_work_dir_is_not_read(pool: SandboxPool, agent_home: Path,
                                                                   tmp_path: Path) -> None:
    stored: list[str] = []
    outcome = await run_code(pool, tmp_path / "task", SWAP.format(home=str(agent_home)) + """
    from agent.engine.frames import pack_frame
    ctx.out.write(pack_frame({'checkpoint': str(ctx.workdir / 'agent.key')})); ctx.out.flush()
    """, on_checkpoint=stored)
    assert all(SANDBOX_SECRET not in Path(p).read_text(errors="replace") for p in stored), stored
    assert stored == []
    assert outcome.error_class in (None, "sandbox_violation"), outcome.error


async def test_a_fifo_named_as_a_checkpoint_does_not_hang_the_agent(pool: SandboxPool, tmp_path: Path) -> None:
    ticks = 0

    async def heartbeat() -> None:   # the agent's other work: it must keep running meanwhile
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.05)

    beat = asyncio.ensure_future(heartbeat())
    stored: list[str] = []
    try:
        outcome = await asyncio.wait_for(run_code(pool, tmp_path / "task", """
            import os, time
            from agent.engine.frames import pack_frame
            os.mkfifo(ctx.workdir / 'ck')
            ctx.out.write(pack_frame({'checkpoint': str(ctx.workdir / 'ck')})); ctx.out.flush()
            result['done'] = 1
        """, timeout_s=30, on_checkpoint=stored), 60)
    finally:
        beat.cancel()
    assert outcome.ok, outcome.error
    assert stored == []
    assert ticks > 0


@pytest.fixture
async def small_disk_pool(agent_home: Path) -> AsyncIterator[SandboxPool]:
    sandboxes = SandboxPool(agent_home / "work", exclude=[agent_home], disk_bytes=8 * 2**20)
    yield sandboxes
    await sandboxes.close()


async def test_one_file_past_the_disk_cap_is_a_sandbox_violation(small_disk_pool: SandboxPool,
                                                                 tmp_path: Path) -> None:
    outcome = await run_code(small_disk_pool, tmp_path / "task", """
        with open(ctx.workdir / 'big', 'wb') as fh:
            for _ in range(64):
                fh.write(b'x' * 2**20)
    """)
    assert (outcome.ok, outcome.error_class) == (False, "sandbox_violation"), outcome.error
    assert "disk limit" in (outcome.error or "")


async def test_many_files_past_the_disk_cap_end_the_task_as_a_sandbox_violation(small_disk_pool: SandboxPool,
                                                                               tmp_path: Path) -> None:
    outcome = await run_code(small_disk_pool, tmp_path / "task", """
        import itertools, time
        for i in itertools.count():   # each file under the one-file limit, together far over the cap
            (ctx.workdir / f'f{i}').write_bytes(b'x' * 2**20)
            if i > 64:
                time.sleep(0.01)
    """, timeout_s=120)
    assert (outcome.ok, outcome.error_class) == (False, "sandbox_violation"), outcome.error
    assert "disk limit" in (outcome.error or "")
    assert not (tmp_path / "task").exists() or sum(
        p.stat().st_size for p in (tmp_path / "task").rglob("*")) < 2**30


async def test_too_many_files_end_the_task_as_a_sandbox_violation(pool: SandboxPool, tmp_path: Path) -> None:
    outcome = await run_code(pool, tmp_path / "task", """
        import itertools, os
        for i in itertools.count():
            os.mkdir(ctx.workdir / f'd{i}')
    """, timeout_s=120)
    assert (outcome.ok, outcome.error_class) == (False, "sandbox_violation"), outcome.error
    assert "files and directories" in (outcome.error or "")


async def test_files_in_its_tmpfs_count_toward_its_memory_cap(pool: SandboxPool, tmp_path: Path) -> None:
    outcome = await run_code(pool, tmp_path / "task", """
        import time
        with open('/dev/shm/fill', 'wb') as fh:   # 0.9 GiB in tmpfs: memory no resident set shows
            for _ in range(900):
                fh.write(b'x' * 2**20)
        with open('/tmp/fill', 'wb') as fh:
            for _ in range(900):
                fh.write(b'x' * 2**20)
        time.sleep(60)
    """, timeout_s=120)
    assert (outcome.ok, outcome.error_class) == (False, "oom"), outcome.error
    assert "/dev/shm" in (outcome.error or "")


async def test_a_nested_user_namespace_cannot_make_its_inputs_writable(pool: SandboxPool, tmp_path: Path) -> None:
    """The inputs are hard links to the agent's blob cache: a writable mount of them would poison it."""
    blob = tmp_path / "blob"
    blob.write_text("cached")
    async with pool.worker() as worker:
        outcome = await worker.run(TaskRequest(kind="untrusted", params={"source": textwrap.dedent("""
            import ctypes, os, subprocess
            libc = ctypes.CDLL(None, use_errno=True)
            tries = {}
            tries['unshare'] = libc.unshare(0x10000000 | 0x00020000)   # CLONE_NEWUSER | CLONE_NEWNS
            tries['errno'] = ctypes.get_errno()
            if tries['unshare'] == 0:
                src = str(ctx.inputs['data'])
                tries['remount'] = libc.mount(None, os.path.dirname(src).encode(), None,
                                              0x20 | 0x1000, None)   # MS_REMOUNT | MS_BIND, no MS_RDONLY
            try:
                open(ctx.inputs['data'], 'w').write('poisoned')
                tries['write'] = 'ok'
            except OSError as exc:
                tries['write'] = exc.strerror
            result.update(tries)
        """)}, timeout_s=60, workdir=str(tmp_path / "task"), inputs={"data": str(blob)}))
    assert blob.read_text() == "cached"
    assert outcome.values.get("write") != "ok", outcome.values
    assert outcome.values.get("unshare") == -1, outcome.values   # no user namespace inside the sandbox


async def test_a_flood_of_checkpoints_keeps_one_copy_at_a_time_outside_the_sandbox(
        small_disk_pool: SandboxPool, tmp_path: Path) -> None:
    stored: list[str] = []
    outcome = await run_code(small_disk_pool, tmp_path / "task", """
        from agent.engine.frames import pack_frame
        (ctx.workdir / 'ck').write_bytes(b'x' * 2**20)
        for _ in range(200):   # 200 MiB of copies on the agent's disk if each were taken
            ctx.out.write(pack_frame({'checkpoint': str(ctx.workdir / 'ck')})); ctx.out.flush()
    """, on_checkpoint=stored)
    assert outcome.ok, outcome.error
    assert 1 <= len(stored) < 200   # nobody stored (uploaded and deleted) the first: the rest were skipped


@pytest.mark.parametrize("frame", ["{'progress': float('nan')}", "{'progress': 'abc'}", "5",
                                   "{'done': 'x'}", "{'done': {'ok': True, 'files': {'a': 5}}}",
                                   "{'done': {'ok': False, 'error_class': ['x']}}"])
async def test_a_forged_frame_from_the_code_is_classified_and_never_raises_in_the_agent(
        pool: SandboxPool, tmp_path: Path, frame: str) -> None:
    progress: list[float] = []
    async with pool.worker() as worker:
        outcome = await worker.run(TaskRequest(kind="untrusted", params={"source": textwrap.dedent(f"""
            import time
            from agent.engine.frames import pack_frame
            ctx.out.write(pack_frame({frame})); ctx.out.flush()
            time.sleep(0.5)
        """)}, timeout_s=30, workdir=str(tmp_path / "task")), on_progress=progress.append)
    assert all(0.0 <= p <= 1.0 for p in progress), progress
    assert outcome.ok or outcome.error_class == "crashed", outcome.error


async def test_no_process_of_the_sandbox_outlives_the_task_when_its_files_are_read(pool: SandboxPool,
                                                                                   tmp_path: Path) -> None:
    import psutil

    marker = f"panal-review-{os.getpid()}-{id(tmp_path)}"
    outcome = await run_code(pool, tmp_path / "task", f"""
        import os, subprocess, sys, time
        for _ in range(3):   # daemonised grandchildren, in new sessions, that would go on writing
            subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.01)  # {marker}'],
                             start_new_session=True)
        (ctx.workdir / 'out.txt').write_text('made here')
        files['out'] = str(ctx.workdir / 'out.txt')
    """)
    assert outcome.ok, outcome.error
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert left == [], left


@pytest.mark.parametrize("forged", ["{'ok': True, 'values': {'x': 'v' * (5 * 2**20)}}",
                                    "{'ok': False, 'error_class': 'error', 'error': 'e' * (5 * 2**20)}"])
async def test_a_forged_reply_too_big_for_a_signed_result_is_refused_or_cut(pool: SandboxPool, tmp_path: Path,
                                                                           forged: str) -> None:
    """A result over the board's 4 MiB body limit would be refused, and with it every result batched
    with it, for ever: the code must not get one signed by forging its worker's reply frame."""
    async with pool.worker() as worker:
        outcome = await worker.run(TaskRequest(kind="untrusted", params={"source": textwrap.dedent(f"""
            import os
            from agent.engine.frames import pack_frame
            ctx.out.write(pack_frame({{'done': {forged}}})); ctx.out.flush()
            os._exit(0)
        """)}, timeout_s=30, workdir=str(tmp_path / "task")))
    assert not outcome.ok
    assert len(str(outcome.values)) + len(outcome.error or "") < 2**20, len(outcome.error or "")


async def test_files_hidden_too_deep_for_the_host_to_list_end_the_task(small_disk_pool: SandboxPool,
                                                                       tmp_path: Path) -> None:
    outcome = await run_code(small_disk_pool, tmp_path / "task", """
        import itertools, os
        os.chdir(ctx.workdir)
        for _ in range(40):   # 40 x 200 bytes: a path the host cannot open, made relative to a deep cwd
            os.mkdir('d' * 200)
            os.chdir('d' * 200)
        for i in itertools.count():
            with open(f'f{i}', 'wb') as fh:
                fh.write(b'x' * 2**20)
    """, timeout_s=120)
    assert (outcome.ok, outcome.error_class) == (False, "sandbox_violation"), outcome.error
    assert "disk limit" in (outcome.error or "")


async def test_a_tree_thousands_of_levels_deep_leaves_nothing_on_the_disk(agent_home: Path, tmp_path: Path) -> None:
    base = agent_home / "work"
    sandboxes = SandboxPool(base, exclude=[agent_home])
    try:
        outcome = await run_code(sandboxes, tmp_path / "task", """
            import os
            os.chdir(ctx.workdir)
            for _ in range(2000):   # past Python's recursion limit
                os.mkdir('d')
                os.chdir('d')
            files['deep'] = str(ctx.workdir / 'd')   # refused (not a regular file): the files path reads back
        """)
    finally:
        await sandboxes.close()
    assert outcome.error_class == "sandbox_violation", outcome.error
    assert list(base.iterdir()) == [], list(base.iterdir())   # nothing of the sandbox left on the disk
    import shutil

    from agent.engine.sandbox_watch import remove_tree
    with pytest.raises(RecursionError):   # what the daemon did before: the tree stayed on the disk
        shutil.rmtree(tmp_path / "task", ignore_errors=True)
    remove_tree(tmp_path / "task")   # what the daemon does with the task's work dir now
    assert not (tmp_path / "task").exists()


@pytest.mark.parametrize("how", ["raise", "forge"])
@pytest.mark.parametrize("claimed", ["device_lost", "agent_lost", "made_up"])
async def test_submitter_code_cannot_claim_a_failure_that_blames_the_agent(pool: SandboxPool, tmp_path: Path,
                                                                           how: str, claimed: str) -> None:
    # Raising a RetryableError whose class says device_lost, or writing its own `done` frame to the
    # worker's pipe: either way the agent reports `crashed`, saying what the code claimed.
    source = {"raise": f"""
        from jobs.errors import RetryableError
        class Lost(RetryableError):
            failure = type('F', (), {{'value': {claimed!r}}})()
        raise Lost('the GPU fell off the bus, honestly')
    """, "forge": f"""
        import time
        from agent.engine.frames import pack_frame
        ctx.out.write(pack_frame({{'done': {{'ok': False, 'error_class': {claimed!r}, 'error': 'forged'}}}}))
        ctx.out.flush()
        time.sleep(60)
    """}[how]
    outcome = await run_code(pool, tmp_path / "task", source, timeout_s=30)
    assert (outcome.ok, outcome.error_class) == (False, "crashed"), (outcome.error_class, outcome.error)
    assert claimed in (outcome.error or "") and "may not claim" in (outcome.error or "")


async def test_submitter_code_keeps_the_failure_classes_its_own_code_can_cause(pool: SandboxPool,
                                                                               tmp_path: Path) -> None:
    outcome = await run_code(pool, tmp_path / "task", """
        from jobs.errors import PermanentError
        raise PermanentError('this input format is not supported')
    """, timeout_s=30)
    assert (outcome.ok, outcome.error_class) == (False, "unsupported"), outcome.error
