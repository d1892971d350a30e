"""What this machine can do, measured rather than believed: the capability report an agent advertises.

A GPU is listed only after a tiny tensor job on it returns the right answer (drivers that report a
GPU that cannot run work are a classic failure of volunteer systems); a GPU that fails is listed
under ``gpu_errors`` instead. fp32/fp16 GFLOPS come from a short matmul self-test (well under a
second per device), cached in a JSON file keyed by the hardware and the torch build. Overrides from
the agent config, then from the env var ``PANAL_FAKE_CAPS`` (JSON), deep-merge into the report, so a
lab can hide a GPU and a test can simulate a fleet; the matching code cannot tell the difference.

torch is imported only inside :func:`detect`; the daemon runs it in a child process
(``python -m agent.host.capabilities``) to stay light.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from agent.engine.sandbox import probe as probe_sandbox
from jobs.catalog import all_kinds
from jobs.committed import UNIT_PROOFS
from security.errors import BadRequest

__all__ = ["ENV_FAKE_CAPS", "cpu_model", "deep_merge", "detect"]

log = logging.getLogger(__name__)

ENV_FAKE_CAPS = "PANAL_FAKE_CAPS"
#: seconds each self-test keeps multiplying; the report is the best rate seen.
SELFTEST_S = 0.15
_CACHE_VERSION = 1
#: the packages whose versions the report lists (``requires.torch`` of a python job is matched on them)
CODE_PACKAGES = ("torch", "numpy", "safetensors")


def base_report() -> dict[str, Any]:
    """The torch-free part of the report: OS, CPU, RAM, catalog kinds (no devices, no speeds)."""
    return {
        "os": platform.system().lower(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": {"cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
                "threads": os.cpu_count() or 1, "model": cpu_model(), "gflops_fp32": 0.0},
        "torch": None, "cuda": None, "rocm": None,
        "gpus": [], "gpu_errors": [], "kinds": advertised_kinds(), "labels": {},
        "features": [UNIT_PROOFS],
        "sandbox": sandbox_report(), "packages": package_versions(),
    }


def advertised_kinds() -> list[str]:
    """The catalog's kinds this agent can run: a kind that runs submitter code (``Kind.sandboxed``)
    only where the sandbox works (there is no unsandboxed fallback)."""
    sandbox = probe_sandbox().available
    return sorted(name for name, kind in all_kinds().items() if sandbox or not kind.sandboxed)


def sandbox_report() -> dict[str, Any]:
    """Whether submitter code can run here, and if not why and how to enable it (`panal agent info`)."""
    status = probe_sandbox()
    report: dict[str, Any] = {"available": status.available, "tool": status.tool}
    if not status.available:
        report.update(reason=status.reason, fix=status.fix)
    return report


def package_versions() -> dict[str, str | None]:
    """Versions of what submitted code (the python kind) imports most, read from the installed
    distributions' metadata without importing them; None where one is missing."""
    found: dict[str, str | None] = {}
    for name in CODE_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def basic(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report without importing torch (what a light process advertises before, or instead of,
    the full probe), with config overrides, then ``PANAL_FAKE_CAPS``."""
    return deep_merge(deep_merge(base_report(), overrides or {}), env_overrides())


def detect(measure: bool = True, cache_path: Path | None = None, rebench: bool = False,
           overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The capability report of this machine, with config overrides, then ``PANAL_FAKE_CAPS``."""
    caps = base_report()
    torch = _import_torch()
    if torch is not None:
        caps["torch"] = torch.__version__
        caps["cuda"] = torch.version.cuda
        caps["rocm"] = getattr(torch.version, "hip", None)
        caps["gpus"], caps["gpu_errors"] = _probe_gpus(torch, caps["memory_gb"])
        if measure:
            _measure(torch, caps, cache_path, rebench)
    result = deep_merge(caps, overrides or {})
    return deep_merge(result, env_overrides())


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        log.info("torch is not installed: advertising no GPUs and no measured GFLOPS")
        return None
    return torch


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``: maps merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides() -> dict[str, Any]:
    """``PANAL_FAKE_CAPS`` (JSON): how tests and labs simulate a fleet."""
    text = os.environ.get(ENV_FAKE_CAPS, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"{ENV_FAKE_CAPS} is not valid JSON: {exc}", code="bad_config") from exc
    if not isinstance(value, dict):
        raise BadRequest(f"{ENV_FAKE_CAPS} must hold a JSON object, got {text[:40]!r}", code="bad_config")
    return value


def cpu_model() -> str:
    """The CPU's marketing name, e.g. ``AMD EPYC 7763 64-Core Processor``."""
    system = platform.system()
    try:
        if system == "Linux":
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
            for key in ("model name", "Hardware", "Processor", "cpu model"):
                m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
                if m:
                    return m.group(1).strip()
        elif system == "Darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def _probe_gpus(torch: Any, memory_gb: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    gpus: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    candidates: list[tuple[str, dict[str, Any]]] = []
    try:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # a broken driver raises from the query itself
        errors.append({"backend": "cuda", "error": f"device query failed: {exc}"})
        cuda_count = 0
    hip = getattr(torch.version, "hip", None)
    for i in range(cuda_count):
        try:
            props = torch.cuda.get_device_properties(i)
        except Exception as exc:
            errors.append({"index": i, "backend": "rocm" if hip else "cuda", "error": str(exc)})
            continue
        gpu = {"index": i, "name": props.name, "backend": "rocm" if hip else "cuda",
               "vendor": "AMD" if hip else "NVIDIA", "vram_gb": round(props.total_memory / 2**30, 1),
               "compute_capability": f"{props.major}.{props.minor}"}
        if hip and getattr(props, "gcnArchName", ""):
            gpu["arch"] = props.gcnArchName
        if getattr(props, "uuid", None):   # how a volunteer names one GPU for good (indices can change)
            gpu["uuid"] = str(props.uuid).lower().removeprefix("gpu-")
        candidates.append((f"cuda:{i}", gpu))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        candidates.append(("mps", {"index": 0, "name": f"Apple {cpu_model()}", "backend": "mps",
                                   "vendor": "Apple", "vram_gb": memory_gb, "compute_capability": None}))
    for device, gpu in candidates:
        problem = _smoke_test(torch, device)
        if problem is None:
            gpu["device"] = device
            gpus.append(gpu)
        else:
            log.warning("GPU %s (%s) is not advertised: %s", device, gpu["name"], problem)
            errors.append({"index": gpu["index"], "name": gpu["name"], "backend": gpu["backend"],
                           "error": problem})
    return gpus, errors


def _smoke_test(torch: Any, device: str) -> str | None:
    """Run a tiny matmul on ``device`` and compare it with the CPU; the reason it failed, or None."""
    try:
        a = torch.arange(16, dtype=torch.float32).reshape(4, 4)
        want = a @ a + 1
        got = ((a.to(device) @ a.to(device)) + 1).to("cpu")
        if not torch.equal(got, want):
            return f"wrong result from a 4x4 matmul (max error {float((got - want).abs().max()):g})"
    except Exception as exc:  # any failure means: do not offer this device
        return f"{type(exc).__name__}: {exc}"
    return None


def _cache_key(torch: Any, caps: Mapping[str, Any]) -> str:
    hardware = {"cpu": caps["cpu"]["model"], "threads": caps["cpu"]["threads"],
                "gpus": [(g["name"], g["backend"], g["index"]) for g in caps["gpus"]],
                "torch": torch.__version__, "cuda": caps["cuda"], "rocm": caps["rocm"],
                "arch": caps["arch"], "version": _CACHE_VERSION}
    return hashlib.sha256(json.dumps(hardware, sort_keys=True).encode()).hexdigest()[:32]


def _measure(torch: Any, caps: dict[str, Any], cache_path: Path | None, rebench: bool) -> None:
    key = _cache_key(torch, caps)
    cached: dict[str, Any] | None = None
    if cache_path is not None and not rebench:
        try:
            doc = json.loads(cache_path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("key") == key and isinstance(doc.get("results"), dict):
                cached = doc["results"]
        except (OSError, ValueError):
            cached = None
    if cached is None:
        cached = {"cpu": {"gflops_fp32": _gflops(torch, "cpu", torch.float32, 256)}}
        for gpu in caps["gpus"]:
            cached[gpu["device"]] = {"gflops_fp32": _gflops(torch, gpu["device"], torch.float32, 2048),
                                     "gflops_fp16": _gflops(torch, gpu["device"], torch.float16, 2048)}
        cached["measured_at"] = time.time()
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            tmp.write_text(json.dumps({"key": key, "results": cached}, indent=1), encoding="utf-8")
            os.replace(tmp, cache_path)
    caps["cpu"]["gflops_fp32"] = float(cached.get("cpu", {}).get("gflops_fp32", 0.0))
    caps["measured_at"] = cached.get("measured_at")
    for gpu in caps["gpus"]:
        got = cached.get(gpu["device"], {})
        gpu["gflops_fp32"] = float(got.get("gflops_fp32", 0.0))
        gpu["gflops_fp16"] = float(got.get("gflops_fp16", 0.0))


def _gflops(torch: Any, device: str, dtype: Any, n: int) -> float:
    """Best matmul rate over about :data:`SELFTEST_S` seconds; 0.0 if the dtype does not run here."""
    from jobs.kinds.torchutil import synchronize

    dev = torch.device(device)
    try:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        torch.matmul(a, b)  # warm-up: kernels, allocator
        synchronize(dev)
        best = 0.0
        deadline = time.perf_counter() + SELFTEST_S
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            synchronize(dev)
            best = max(best, 2.0 * n**3 / max(time.perf_counter() - t0, 1e-9) / 1e9)
        return round(best, 1)
    except Exception as exc:  # e.g. fp16 matmul unsupported on an old device
        log.info("self-test %s %s failed: %s", device, dtype, exc)
        return 0.0


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.host.capabilities [--no-measure] [--rebench] [--cache PATH]``: the report as JSON."""
    args = sys.argv[1:] if argv is None else argv
    cache = Path(args[args.index("--cache") + 1]) if "--cache" in args else None
    caps = detect(measure="--no-measure" not in args, cache_path=cache, rebench="--rebench" in args)
    print(json.dumps(caps, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
