"""What a job kind is: validated, bounded parameters, a cost estimate, and a run function.

Kinds run inside a worker child process (never in the agent daemon). ``run`` imports torch itself,
so the hub can validate manifests and estimate costs without torch installed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from jobs.compare import CompareSpec
from jobs.errors import InvalidParams

if TYPE_CHECKING:
    from jobs.safeload import TensorInfo

__all__ = ["Cost", "Kind", "KindOutput", "Param", "RunContext"]

_MISSING: Any = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a kind: its type, default and bounds (all checked before anything runs)."""

    type: type | tuple[type, ...]
    default: Any = _MISSING
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def check(self, name: str, value: Any) -> str | None:
        """Return an error message, or None if ``value`` is acceptable."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if isinstance(value, bool) and bool not in types:
            return f"expected {_type_name(types)}, got a boolean"
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types):
            return f"expected {_type_name(types)}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"expected one of {', '.join(map(str, self.choices))}, got {value!r}"
        if self.minimum is not None and isinstance(value, int | float) and value < self.minimum:
            return f"expected a number >= {self.minimum:g}, got {value!r}"
        if self.maximum is not None and isinstance(value, int | float) and value > self.maximum:
            return f"expected a number <= {self.maximum:g}, got {value!r}"
        return None

    def schema(self) -> dict[str, Any]:
        """This parameter as JSON Schema (for `panal schema` and editors)."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array",
                 dict: "object"}
        out: dict[str, Any] = {"type": [names[t] for t in types] if len(types) > 1 else names[types[0]]}
        if self.choices is not None:
            out["enum"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if not self.required:
            out["default"] = self.default
        if self.doc:
            out["description"] = self.doc
        return out


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "a list", dict: "a map"}
    return " or ".join(names.get(t, t.__name__) for t in types)


@dataclass(frozen=True)
class Cost:
    """A kind's resource estimate for one task, so a board can predict runtime on a device."""

    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0  # fixed wall time regardless of device (e.g. sleep)


@dataclass
class KindOutput:
    """What a finished task returns: small values inline, files as blobs, and its metrics."""

    values: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class RunContext(Protocol):
    """What a running kind may use: its device, thread budget, a scratch dir and a progress hook.

    ``inputs`` maps a kind's input names (see :attr:`Kind.inputs`) to local, hash-verified files;
    read them only through :mod:`jobs.safeload`. ``devices`` lists every device this agent lets
    the task use (``device`` first; only ``benchmark`` uses more than one). ``checkpoint(path)``
    asks the engine to store ``path`` (a file in ``workdir``, complete when called) as this
    task's latest checkpoint before it returns (the kind may overwrite the file afterwards); a task
    resumed after a crash, here or on another agent, finds it again as ``inputs["checkpoint"]``.
    """

    device: str          # "cpu", "cuda:0", "mps"
    threads: int
    workdir: Path
    inputs: Mapping[str, Path]

    @property
    def devices(self) -> Sequence[str]: ...

    def progress(self, fraction: float) -> None: ...

    def checkpoint(self, path: Path) -> None: ...


class Kind(ABC):
    """Base class of the catalog's kinds. Subclasses set ``name``, ``params`` and override ``run``."""

    name: str = ""
    summary: str = ""
    params: ClassVar[Mapping[str, Param]] = {}
    #: input files the kind reads, name -> required; a manifest's ``spec.inputs`` must give every
    #: required one and no others (``checkpoint`` is supplied by the engine on resume, never listed).
    inputs: ClassVar[Mapping[str, bool]] = {}
    test_only: bool = False
    #: runs submitter code: only in the OS sandbox (agent/engine/sandbox.py), never in a plain warm
    #: worker; an agent without a working sandbox does not advertise it, and the board sends it only to
    #: agents that accept code from the job's submitter
    sandboxed: ClassVar[bool] = False
    #: how a board compares two results of one unit (jobs/compare.py); exact unless a kind says otherwise
    compare: ClassVar[CompareSpec] = CompareSpec("exact")

    def validate(self, params: Mapping[str, Any], prefix: str = "spec.params") -> dict[str, Any]:
        """Apply defaults and bounds; raise :class:`InvalidParams` listing every problem at once."""
        errors: list[tuple[str, str]] = []
        if not isinstance(params, Mapping):
            raise InvalidParams([(prefix, f"expected a map, got {params!r}")])
        out: dict[str, Any] = {}
        for key in params:
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                errors.append((f"{prefix}.{key}", f"unknown parameter for kind {self.name} (known: {known})"))
        for key, spec in self.params.items():
            if key in params:
                problem = spec.check(key, params[key])
                if problem:
                    errors.append((f"{prefix}.{key}", problem))
                else:
                    out[key] = params[key]
            elif spec.required:
                errors.append((f"{prefix}.{key}", "required parameter is missing"))
            else:
                out[key] = spec.default
        if errors:
            raise InvalidParams(errors)
        self.check(out, prefix, errors)
        if errors:
            raise InvalidParams(errors)
        return out

    def check(  # noqa: B027 -- optional hook, deliberately a no-op by default
            self, params: dict[str, Any], prefix: str, errors: list[tuple[str, str]]) -> None:
        """Cross-field checks (after each field passed on its own); append to ``errors``."""

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        return Cost()

    def input_format(self, name: str, params: Mapping[str, Any]) -> str | None:
        """The file format ``run`` reads input ``name`` as (``"safetensors"`` or ``"pt2"``), so that
        ``panal validate``/``submit`` run the agent's safe-loading checks on it (jobs/precheck.py);
        None: not checked before upload."""
        return None

    def check_input(self, name: str, tensors: Mapping[str, TensorInfo], params: Mapping[str, Any]) -> list[str]:
        """What ``run`` would refuse in safetensors input ``name``, judged from its header alone (names,
        dtypes, shapes): the same words at submit time as on the agent."""
        return []

    @abstractmethod
    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        """Do the work in the worker process; raise RetryableError/PermanentError to classify."""

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: p.schema() for k, p in self.params.items()},
            "required": [k for k, p in self.params.items() if p.required],
        }


ProgressFn = Callable[[float], None]
