"""GPU-aware pausing against a real NVIDIA driver: NVML sees another program on the GPU, the agent's
own pids are left out, and NVML's GPUs are matched to torch's by UUID. Marked ``gpu``: skips without
CUDA, runs under ``make gpu-check`` (which installs the ``gpu`` extra, ``nvidia-ml-py``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from helpers import wait_for

from agent.volunteer.gpu_use import GpuReading, NvmlSource, busy_gpus, normalize_uuid
from agent.volunteer.preferences import Preferences

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

GIB = 2**30
#: another program on cuda:0: holds 2 GiB and keeps the GPU busy until killed
HOG = ("import sys, torch\n"
       "x = torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda:0')\n"
       "a = torch.randn(4096, 4096, device='cuda:0')\n"
       "torch.cuda.synchronize(); print('ready', flush=True)\n"
       "while True:\n"
       "    a = (a @ a).clamp_(-1, 1)\n"
       "    torch.cuda.synchronize()\n")


@pytest.fixture
def source() -> NvmlSource:
    source = NvmlSource.open()
    assert source is not None, "NVML did not open: install the gpu extra (nvidia-ml-py) on a machine with a driver"
    return source


@pytest.fixture
def hog() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


def _cuda0_uuid() -> str | None:
    uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
    return normalize_uuid(str(uuid)) if uuid else None


def test_nvml_lists_every_gpu_torch_sees_with_matching_uuids(source: NvmlSource) -> None:
    readings = source.read(set())
    assert len(readings) == torch.cuda.device_count()
    torch_uuids = {normalize_uuid(str(torch.cuda.get_device_properties(i).uuid))
                   for i in range(torch.cuda.device_count())}
    assert {r.uuid for r in readings} == torch_uuids


def test_nvml_sees_another_program_on_the_gpu_and_not_the_agents_own(source: NvmlSource,
                                                                      hog: subprocess.Popen[str]) -> None:
    def cuda0(own: set[int]) -> GpuReading:
        [reading] = [r for r in source.read(own) if r.uuid == _cuda0_uuid()]
        return reading

    busy = wait_for(lambda: (cuda0(set()).other_percent or 0) > 0 and cuda0(set()), "NVML to sample the hog's use")
    assert busy.other_memory is not None and busy.other_memory >= 2 * GIB
    assert busy_gpus([busy], Preferences(gpu_pause_memory_fraction=0.01)).keys() == {busy.index}
    own = cuda0({hog.pid})                            # the same program as the agent's own worker: not counted
    assert own.other_memory is not None and own.other_memory < GIB
    assert busy_gpus([own], Preferences(gpu_pause_memory_fraction=0.01, gpu_pause_percent=99)) == {}
