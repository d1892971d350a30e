"""The OS sandbox that submitter code runs in: bubblewrap, probed for real, never silently skipped.

Kinds that run a submitter's own code (``Kind.sandboxed``, e.g. ``python``) run only in a worker
started inside bubblewrap (``bwrap``), chosen over nsjail for its start overhead (measured in
``benchmarks/sandbox_start.py``), its packaging (Debian/Ubuntu/Fedora ship it; nsjail is not in
Debian bookworm) and because it needs no setuid helper: it uses unprivileged user namespaces.

What the code sees: every namespace unshared (network too: a private loopback with nothing
listening, so not the hub's), read-only system directories and the Python environment the agent
runs from (``sys.prefix``, the base prefix, and every ``sys.path`` directory: an installed wheel or a
checkout), a private writable sandbox directory (its work dir; inputs in a read-only subdir), a
tmpfs ``/tmp``, a minimal ``/dev`` and nothing else of the host: no ``$HOME``, no agent home with its
keys, state and control socket. No new privileges, every capability dropped, a new session (no
terminal injection), killed with its parent. A process-count limit: ``RLIMIT_NPROC`` set by the
worker inside its own user namespace (the kernel counts it per namespace), or, for an agent running
as root (where the kernel ignores ``RLIMIT_NPROC``), a ``pids`` cgroup. GPU device nodes are bound
only into a sandbox for a task placed on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_PROCESSES", "MIN_BWRAP", "SandboxStatus", "bwrap_argv", "bwrap_version", "pids_cgroup", "probe",
           "python_paths"]

#: the oldest bubblewrap the sandbox works with: 0.8 added ``--disable-userns``, which keeps the code
#: from making user namespaces of its own (``_no_nested_userns``)
MIN_BWRAP = (0, 8)
#: processes (threads count too) the code may have at once; a fork bomb stops here
MAX_PROCESSES = 256
#: each of the private /tmp and /dev/shm (memory the RSS watch does not see until mapped)
TMPFS_BYTES = 1 << 30
#: set inside the sandbox: the worker applies ``RLIMIT_NPROC`` itself and classifies refusals
SANDBOX_ENV = "PANAL_SANDBOXED"
NPROC_ENV = "PANAL_SANDBOX_NPROC"
#: set inside the sandbox: the worker caps any one file's size (``RLIMIT_FSIZE``) at the disk cap
FSIZE_ENV = "PANAL_SANDBOX_FSIZE"

#: system directories bound read-only when they exist (merged-/usr systems have symlinks instead)
_SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/opt")
#: the few files of /etc a Python process needs (never the whole of /etc: shadow, ssh keys, ...)
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives",
              "/etc/nsswitch.conf", "/etc/passwd", "/etc/group", "/etc/os-release", "/etc/mime.types")
#: host environment variables passed in; everything else is cleared
_ENV_PASSED = ("LANG", "LC_ALL", "PYTHONPATH", "PANAL_TEST_KINDS", "PANAL_WORKER_PRELOAD", "CUDA_VISIBLE_DEVICES",
               "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset", "/dev/kfd",
              "/dev/dri")


@dataclass(frozen=True)
class SandboxStatus:
    """Whether submitter code can run here; if not, why and how the owner enables it."""

    available: bool
    reason: str = ""
    fix: str = ""
    tool: str = "bwrap"
    process_limit: str = ""   # "rlimit" (per user namespace) or "cgroup" (root)

    def describe(self) -> str:
        if self.available:
            return f"available ({self.tool}, process limit by {self.process_limit})"
        return f"unavailable: {self.reason}" + (f"; to enable: {self.fix}" if self.fix else "")


def python_paths(exclude: Iterable[Path] = ()) -> list[Path]:
    """The directories the worker imports from: the interpreter's prefixes and every ``sys.path``
    directory (site-packages, an editable install's checkout, ``PYTHONPATH``), minus any that would
    expose ``exclude`` (the agent home, ``$HOME``): such a directory is left out, not bound."""
    import agent

    candidates = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix),
                  Path(os.path.realpath(sys.executable)).parent.parent,
                  Path(agent.__file__).resolve().parent.parent]
    candidates += [Path(p) for p in sys.path if p and os.path.isabs(p)]
    candidates += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.isabs(p)]
    hidden = [Path(os.path.realpath(p)) for p in exclude]
    out: list[Path] = []
    for path in candidates:
        real = Path(os.path.realpath(path))
        if not real.is_dir() or real == Path("/") or real in out:
            continue
        if any(h == real or h.is_relative_to(real) for h in hidden):
            continue   # binding it would show the agent's keys or the owner's home
        out.append(real)
    return out


def bwrap_argv(root: Path, *, gpu: bool, exclude: Iterable[Path] = (), bwrap: str = "bwrap") -> list[str]:
    """The bubblewrap command line (up to the program) for a sandbox whose private directory is
    ``root``: ``root`` is writable inside at the same path, ``root/inputs`` read-only."""
    argv = [bwrap, "--unshare-all", *_no_nested_userns(bwrap), "--die-with-parent", "--new-session",
            "--cap-drop", "ALL",
            "--clearenv", "--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
            "--size", str(TMPFS_BYTES), "--tmpfs", "/dev/shm"]
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    for f in _ETC_FILES:
        if os.path.exists(f):
            argv += ["--ro-bind", f, f]
    for path in python_paths(exclude):
        argv += ["--ro-bind", str(path), str(path)]
    argv += ["--bind", str(root), str(root), "--ro-bind", str(root / "inputs"), str(root / "inputs")]
    if gpu:
        nodes = [n for n in _GPU_NODES if os.path.exists(n)]
        nodes += sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
        for node in nodes:
            argv += ["--dev-bind", node, node]
        for extra in ("/sys", "/proc/driver/nvidia"):   # the driver reads its topology here
            if os.path.exists(extra):
                argv += ["--ro-bind", extra, extra]
    env = {k: os.environ[k] for k in _ENV_PASSED if k in os.environ}
    env.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(root / "work"), "TMPDIR": "/tmp",
                SANDBOX_ENV: "1", "PYTHONDONTWRITEBYTECODE": "1"})
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    argv += ["--remount-ro", "/", "--chdir", str(root / "work")]   # the sandbox's own root: no scratch there
    return argv


@functools.cache
def _no_nested_userns(bwrap: str) -> tuple[str, ...]:
    """``--disable-userns`` where bubblewrap has it (0.8+): without it the code may make a user
    namespace of its own and, privileged there, mount tmpfs after tmpfs (memory that no watch sees)
    or reach kernel code unprivileged users otherwise cannot. ``--unshare-user`` (which it needs) is
    forced for an agent running as root too, where ``--unshare-all`` alone would leave the code the
    host's real uid 0 (capabilities dropped, but the owner of every root-owned file it can see)."""
    try:
        helptext = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return ("--unshare-user", "--disable-userns") if "--disable-userns" in helptext else ()


def bwrap_version(text: str) -> tuple[int, ...] | None:
    """The version ``bwrap --version`` prints (``bubblewrap 0.8.0``) as numbers; None when it names none."""
    match = re.search(r"\b(\d+)\.(\d+)(?:\.(\d+))?", text)
    return None if match is None else tuple(int(part) for part in match.groups() if part is not None)


def _too_old(bwrap: str) -> SandboxStatus | None:
    """Refuse a bubblewrap older than ``MIN_BWRAP`` (or one that does not say which it is)."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return SandboxStatus(False, f"bwrap could not be run: {exc}", "reinstall the `bubblewrap` package")
    version = bwrap_version(out)
    if version is not None and version >= MIN_BWRAP:
        return None
    least = ".".join(map(str, MIN_BWRAP))
    said = f"bubblewrap {'.'.join(map(str, version))}" if version else \
        f"a bubblewrap of unknown version ({out.strip()[:60]!r})"
    return SandboxStatus(False, f"{bwrap} is {said}; the sandbox needs {least} or newer (--disable-userns)",
                         f"upgrade bubblewrap to {least} or newer (your distribution's backports, or build it "
                         "from https://github.com/containers/bubblewrap)")


class PidsCgroup:
    """A ``pids`` cgroup capping one sandbox's processes, for an agent running as root (the kernel
    does not apply ``RLIMIT_NPROC`` to real uid 0). v1 (``/sys/fs/cgroup/pids``) or v2."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def enter(self) -> None:
        """Move the calling process (the forked child, before it execs bwrap) into the group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        """Kill what is left in the group and remove it (a dying process keeps it busy a moment)."""
        for _ in range(100):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return   # already gone
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)


def _pids_root() -> Path | None:
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if (base / "cgroup.procs").exists() and os.access(base, os.W_OK) and (
                base.name == "pids" or "pids" in _read(base / "cgroup.subtree_control")):
            return base
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def pids_cgroup(limit: int = MAX_PROCESSES) -> PidsCgroup | None:
    """A fresh cgroup with ``pids.max = limit``, or None where this process may not make one."""
    base = _pids_root()
    if base is None:
        return None
    path = base / f"panal-sandbox-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return PidsCgroup(path)


def _needs_cgroup() -> bool:
    return os.geteuid() == 0


@functools.cache
def probe() -> SandboxStatus:
    """Try the sandbox once (a real ``bwrap ... true`` with this agent's binds) and cache the answer."""
    if not sys.platform.startswith("linux"):
        return SandboxStatus(False, f"the sandbox needs Linux (this is {sys.platform})",
                             "run the agent on Linux (a VM or WSL2 works) to accept code")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return SandboxStatus(False, "bubblewrap (bwrap) is not installed",
                             "install the `bubblewrap` package (apt install bubblewrap / dnf install bubblewrap)")
    old = _too_old(bwrap)
    if old is not None:
        return old
    limit = "rlimit"
    if _needs_cgroup():
        group = pids_cgroup()
        if group is None:
            return SandboxStatus(False, "the agent runs as root, where the kernel ignores the process limit "
                                 "(RLIMIT_NPROC), and no writable pids cgroup was found",
                                 "run the agent as an ordinary user (panal service install does)")
        group.remove()
        limit = "cgroup"
    with tempfile.TemporaryDirectory(prefix="panal-probe-") as tmp:
        root = Path(tmp)
        (root / "work").mkdir()
        (root / "inputs").mkdir()
        try:
            done = subprocess.run([*bwrap_argv(root, gpu=False, bwrap=bwrap), "true"], capture_output=True,
                                  timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return SandboxStatus(False, f"bwrap could not be run: {exc}", "reinstall the `bubblewrap` package")
    if done.returncode == 0:
        return SandboxStatus(True, process_limit=limit)
    err = done.stderr.decode(errors="replace").strip()[-300:]
    if "namespace" in err or "uid map" in err or "Operation not permitted" in err:
        return SandboxStatus(False, f"user namespaces are disabled ({err})",
                             "sudo sysctl -w kernel.unprivileged_userns_clone=1 (Debian/Ubuntu), "
                             "user.max_user_namespaces=15000, and on Ubuntu 24.04+ "
                             "kernel.apparmor_restrict_unprivileged_userns=0")
    return SandboxStatus(False, f"bwrap failed: {err}", "check that `bwrap --unshare-all --ro-bind / / true` works")
