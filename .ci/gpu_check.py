"""`make gpu-check`: everything that needs CUDA, in one run of a few minutes, and one report.

Runs the tests marked ``gpu`` (NVML's view of other programs included: tests/test_gpu_nvml.py),
``panal agent info --json``, ``panal bench device --json`` and one NVML reading, then writes
``gpu-check.json`` and ``gpu-check.md`` (devices, GFLOPS fp32/fp16, per-kind CPU vs GPU times, every
failure) into ``$OUT`` when set (the device machine's output folder), else ``artifacts/gpu-check``.
Exits non-zero when there is no CUDA device or anything failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out, f"timed out after {timeout:.0f} s", time.monotonic() - t0


def _cuda() -> dict[str, Any]:
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


#: what the agent's GPU-use source (agent/volunteer/gpu_use.py) reads on this machine, as JSON
_NVML_READING = ("import dataclasses, json, os\n"
                 "from agent.volunteer.gpu_use import NvmlSource\n"
                 "source = NvmlSource.open()\n"
                 "assert source is not None, 'NVML did not open (is the gpu extra, nvidia-ml-py, installed?)'\n"
                 "print(json.dumps([dataclasses.asdict(r) for r in source.read({os.getpid()})]))\n")


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# panal gpu-check", "", f"torch {report['torch']['torch']}, CUDA {report['torch']['cuda']}", ""]
    for gpu in (report.get("agent_info") or {}).get("gpus", []):
        lines.append(f"- {gpu.get('name')}: {gpu.get('vram_gb')} GiB, compute {gpu.get('compute_capability')}, "
                     f"{gpu.get('gflops_fp32')} GFLOPS fp32, {gpu.get('gflops_fp16')} GFLOPS fp16")
    cpu = (report.get("agent_info") or {}).get("cpu", {})
    lines += [f"- CPU {cpu.get('model')}: {cpu.get('gflops_fp32')} GFLOPS fp32", "", "## Per kind (seconds)", ""]
    for row in (report.get("bench_device") or {}).get("kinds", []):
        lines.append(f"- {row['kind']}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "kind"))
    lines += ["", f"## Tests: {report['tests']['summary']}", ""]
    lines += [f"- FAILURE: {f}" for f in report["failures"]] or ["- no failures"]
    return "\n".join(lines) + "\n"


def main() -> int:
    out_dir = Path(os.environ.get("OUT") or ROOT / "artifacts" / "gpu-check")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"torch": _cuda(), "failures": []}
    if not report["torch"]["available"]:
        report["failures"].append("no CUDA device visible to torch (a CPU build of torch, or no driver)")
    home = tempfile.mkdtemp(prefix="panal-gpu-check-")
    env = {**os.environ, "PANAL_HOME": home, "PANAL_LAN_ENABLED": "false"}
    code, out, err, secs = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q", "-rs",
                                 "-p", "no:cacheprovider"], 240, env)
    summary = (out.strip().splitlines() or ["(no output)"])[-1]
    report["tests"] = {"exit": code, "summary": summary, "seconds": round(secs, 1), "tail": out[-4000:] + err[-2000:]}
    if code != 0 or "skipped" in summary:
        report["failures"].append(f"gpu tests: {summary}")
    for key, argv, timeout in (("agent_info", ["agent", "info", "--json", "--rebench"], 120),
                               ("bench_device", ["bench", "device", "--json", "--repeats", "2",
                                                 "--chart", str(out_dir / "bench-device.png")], 240)):
        code, out, err, secs = _run([sys.executable, "-m", "agent", *argv], timeout, env)
        try:
            report[key] = json.loads(out) if code == 0 else None
        except json.JSONDecodeError:
            report[key] = None
        if report[key] is None:
            report["failures"].append(f"panal {' '.join(argv)} -> exit {code}: {err.strip()[-500:]}")
        report[f"{key}_seconds"] = round(secs, 1)
    code, out, err, _ = _run([sys.executable, "-c", _NVML_READING], 60, env)
    try:
        report["nvml"] = json.loads(out) if code == 0 else None
    except json.JSONDecodeError:
        report["nvml"] = None
    if not report["nvml"]:
        report["failures"].append(f"NVML reading (the agent's GPU-use source) -> exit {code}: {err.strip()[-500:]}")
    (out_dir / "gpu-check.json").write_text(json.dumps(report, indent=2))
    (out_dir / "gpu-check.md").write_text(_markdown(report))
    print(_markdown(report))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
