"""The catalog of job kinds a board accepts and an agent runs; one instance of each."""

from __future__ import annotations

import os

from jobs.kinds.base import Kind
from jobs.kinds.benchmark import Benchmark
from jobs.kinds.chaos import Chaos
from jobs.kinds.conv2d import Conv2d
from jobs.kinds.inference import Inference
from jobs.kinds.matmul import Matmul
from jobs.kinds.mlp_train import MlpTrain
from jobs.kinds.python_code import PythonCode
from jobs.kinds.sleep import Sleep
from jobs.kinds.untrusted import Untrusted
from jobs.kinds.vector_add import VectorAdd
from security.errors import BadRequest

__all__ = ["all_kinds", "get_kind"]

_KINDS: dict[str, Kind] = {k.name: k for k in (Matmul(), Sleep(), VectorAdd(), Conv2d(), MlpTrain(),
                                                 Inference(), Benchmark(), Chaos(), PythonCode(), Untrusted())}


def _enabled(kind: Kind) -> bool:
    return not kind.test_only or os.environ.get("PANAL_TEST_KINDS") == "1"


def all_kinds() -> dict[str, Kind]:
    return {name: k for name, k in _KINDS.items() if _enabled(k)}


def get_kind(name: str) -> Kind:
    kind = _KINDS.get(name)
    if kind is None or not _enabled(kind):
        raise BadRequest(f"unknown job kind {name!r} (known: {', '.join(sorted(all_kinds()))})",
                         code="unknown_kind")
    return kind
