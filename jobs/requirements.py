"""What a task needs (``spec.requires``) and what an agent offers (its capability report).

``unmet`` is the one matching function: the board uses it to pick work and to explain, clause by
clause, why a queued task has no taker. Capabilities of a simulated fleet are just dicts, so tests
fake a GPU by its report and the matching code never knows the difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ANY_SUBMITTER", "MAX_CODE_KEYS", "Capabilities", "Gpu", "Requirements", "explain", "explain_counts",
           "torch_range_problem", "unmet"]

#: ``code_from`` entry meaning "any submitter this board authorises"
ANY_SUBMITTER = "*"
#: at most this many submitter keys in one report's ``code_from``
MAX_CODE_KEYS = 256
#: at most this many names in one report's ``features``
MAX_FEATURES = 32


def torch_range_problem(text: Any) -> str | None:
    """Why ``text`` is not a version range like ``>=2.1,<3`` (None when it is one)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        SpecifierSet(str(text))
    except InvalidSpecifier:
        return f"expected a version range like \">=2.1,<3\", got {text!r}"
    return None


def _torch_fits(wanted: str, caps: Capabilities) -> bool:
    """Whether the agent's torch (``packages.torch`` of its report, else ``torch``) is in ``wanted``;
    pre-releases and local builds (``2.4.0a0+git``, ``2.3.1+cu121``) count as their version."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    packages = caps.raw.get("packages")
    have = (packages.get("torch") if isinstance(packages, Mapping) else None) or caps.raw.get("torch")
    try:
        return bool(have) and SpecifierSet(wanted).contains(Version(str(have)), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return False


def _cc(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 0)
    major, _, minor = text.partition(".")
    try:
        return (int(major), int(minor or 0))
    except ValueError:
        return (0, 0)


@dataclass(frozen=True)
class Gpu:
    name: str
    backend: str            # cuda | rocm | mps
    vram_gb: float
    vendor: str = ""
    compute_capability: str | None = None
    gflops_fp32: float = 0.0
    gflops_fp16: float = 0.0
    index: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Gpu:
        return cls(name=str(d.get("name", "?")), backend=str(d.get("backend", "cuda")),
                   vram_gb=float(d.get("vram_gb", 0.0)), vendor=str(d.get("vendor", "")),
                   compute_capability=d.get("compute_capability"),
                   gflops_fp32=float(d.get("gflops_fp32", 0.0)), gflops_fp16=float(d.get("gflops_fp16", 0.0)),
                   index=int(d.get("index", 0)))


@dataclass(frozen=True)
class Capabilities:
    """An agent's advertised capabilities (the dict on the wire, parsed once)."""

    memory_gb: float = 0.0
    cpu_cores: int = 1
    cpu_gflops: float = 0.0
    gpus: tuple[Gpu, ...] = ()
    kinds: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)
    #: whose code (sandboxed kinds) this agent runs from this board: submitter key ids, or ``*`` for
    #: any submitter the board authorises (joined with ``--allow-code``); empty: nobody's
    code_from: frozenset[str] = frozenset()
    #: protocol features the agent implements (``unit-proofs``: it checks a committed job's unit proofs,
    #: jobs/committed.py); an older agent reports none, and is not sent the work that needs one
    features: frozenset[str] = frozenset()
    raw: Mapping[str, Any] = field(default_factory=dict)

    def accepts_code(self, submitter: str) -> bool:
        return ANY_SUBMITTER in self.code_from or submitter in self.code_from

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Capabilities:
        cpu = d.get("cpu") or {}
        code_from = d.get("code_from") or []
        if not isinstance(code_from, list) or len(code_from) > MAX_CODE_KEYS or not all(
                isinstance(k, str) and 0 < len(k) <= 128 for k in code_from):
            raise ValueError(f"code_from: expected a list of at most {MAX_CODE_KEYS} key ids")
        features = d.get("features") or []
        if not isinstance(features, list) or len(features) > MAX_FEATURES or not all(
                isinstance(f, str) and 0 < len(f) <= 64 for f in features):
            raise ValueError(f"features: expected a list of at most {MAX_FEATURES} feature names")
        return cls(
            memory_gb=float(d.get("memory_gb", 0.0)),
            cpu_cores=int(cpu.get("cores", 1)),
            cpu_gflops=float(cpu.get("gflops_fp32", 0.0)),
            gpus=tuple(Gpu.from_dict(g) for g in d.get("gpus") or ()),
            kinds=frozenset(d.get("kinds") or ()),
            labels=dict(d.get("labels") or {}),
            code_from=frozenset(code_from),
            features=frozenset(features),
            raw=d,
        )


@dataclass(frozen=True)
class Requirements:
    device: str = "any"
    backends: tuple[str, ...] = ()
    min_vram_gb: float = 0.0
    min_compute_capability: str | None = None
    min_memory_gb: float = 0.0
    min_gflops: float = 0.0
    labels: tuple[tuple[str, str], ...] = ()
    #: a version range of torch the agent must have (``>=2.1,<3``), for code of the ``python`` kind
    torch: str | None = None
    #: the task's memory cap (set by the board from ``resources.max_memory_gb`` or the default): an agent
    #: whose volunteer allows less (``max_memory_gb`` in its report) is not sent it
    task_memory_gb: float = 0.0
    #: the submitter whose code the task runs (set by the board for a sandboxed kind such as
    #: ``python``): only an agent that accepts code from it is sent the task
    code_from: str | None = None
    #: protocol features the agent must report (set by the board: ``unit-proofs`` for a job signed committed)
    features: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Requirements:
        return cls(
            device=str(d.get("device", "any")),
            backends=tuple(d.get("backends", ())),
            min_vram_gb=float(d.get("min_vram_gb", 0.0)),
            min_compute_capability=d.get("min_compute_capability"),
            min_memory_gb=float(d.get("min_memory_gb", 0.0)),
            min_gflops=float(d.get("min_gflops", 0.0)),
            labels=tuple(sorted((d.get("labels") or {}).items())),
            task_memory_gb=float(d.get("task_memory_gb", 0.0)),
            code_from=d.get("code_from") or None,
            torch=str(d["torch"]) if d.get("torch") else None,
            features=tuple(sorted(str(f) for f in d.get("features") or ())),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device}
        if self.backends:
            out["backends"] = list(self.backends)
        for name in ("min_vram_gb", "min_memory_gb", "min_gflops", "task_memory_gb"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.min_compute_capability:
            out["min_compute_capability"] = self.min_compute_capability
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.code_from:
            out["code_from"] = self.code_from
        if self.torch:
            out["torch"] = self.torch
        if self.features:
            out["features"] = list(self.features)
        return out

    def gpu_fits(self, gpu: Gpu) -> bool:
        return ((not self.backends or gpu.backend in self.backends)
                and gpu.vram_gb >= self.min_vram_gb
                and _cc(gpu.compute_capability) >= _cc(self.min_compute_capability)
                and gpu.gflops_fp32 >= self.min_gflops)

    def wants_gpu(self, caps: Capabilities) -> bool:
        """Whether a task with these requirements would run on one of this agent's GPUs."""
        if self.device == "cpu":
            return False
        return any(self.gpu_fits(g) for g in caps.gpus)


def unmet(req: Requirements, kind: str, caps: Capabilities) -> list[str]:
    """The clauses ``caps`` fails, by name; empty means the agent can run the task."""
    failed = []
    if caps.kinds and kind not in caps.kinds:
        failed.append("kind")
    if caps.memory_gb < req.min_memory_gb:
        failed.append("min_memory_gb")
    ceiling = caps.raw.get("max_memory_gb")   # the volunteer's memory ceiling for one task, if it set one
    if req.task_memory_gb and isinstance(ceiling, int | float) and 0 < ceiling < req.task_memory_gb:
        failed.append("max_memory_gb")
    if any(caps.labels.get(k) != v for k, v in req.labels):
        failed.append("labels")
    if req.code_from and not caps.accepts_code(req.code_from):
        failed.append("code")
    if req.torch and not _torch_fits(req.torch, caps):
        failed.append("torch")
    if req.features and not caps.features.issuperset(req.features):
        failed.append("features")
    if req.device == "gpu" or req.min_vram_gb or req.min_compute_capability or (
            req.backends and "cpu" not in req.backends):
        if req.device == "cpu":
            return failed
        if not caps.gpus:
            failed.append("device")
            return failed
        before = len(failed)   # the clauses failed so far are not GPU ones: they say nothing of "gpu" below
        if not any(g for g in caps.gpus if not req.backends or g.backend in req.backends):
            failed.append("backends")
        if not any(g.vram_gb >= req.min_vram_gb for g in caps.gpus):
            failed.append("min_vram_gb")
        if not any(_cc(g.compute_capability) >= _cc(req.min_compute_capability) for g in caps.gpus):
            failed.append("min_compute_capability")
        if len(failed) == before and not any(req.gpu_fits(g) for g in caps.gpus):
            failed.append("gpu")  # each clause holds on some GPU, but no single GPU has them all
        if req.min_gflops and not any(g.gflops_fp32 >= req.min_gflops for g in caps.gpus):
            failed.append("min_gflops")
    elif req.min_gflops and max([caps.cpu_gflops, *(g.gflops_fp32 for g in caps.gpus)]) < req.min_gflops:
        failed.append("min_gflops")
    return failed


def explain(req: Requirements, kind: str, fleet: Iterable[Capabilities]) -> list[str]:
    """Why no agent of ``fleet`` can take the task, one line per failing clause."""
    return explain_counts(req, kind, [(caps, 1) for caps in fleet])


def explain_counts(req: Requirements, kind: str, classes: Sequence[tuple[Capabilities, int]]) -> list[str]:
    """:func:`explain` over capability classes: (capabilities, how many agents have them). A fleet of 10k
    agents is a few hundred classes, so the status page explains a backlog without a pass over every agent."""
    n = sum(count for _, count in classes)
    if n == 0:
        return ["no agents are connected"]
    counts: dict[str, int] = {}
    for caps, weight in classes:
        for clause in unmet(req, kind, caps):
            counts[clause] = counts.get(clause, 0) + weight
    agents = [caps for caps, weight in classes if weight]
    lines = []
    for clause, failing in counts.items():
        if clause in _GPU_CLAUSES:     # an agent without a GPU fails every GPU clause (unmet names only "device")
            failing += counts.get("device", 0)
        have = n - failing
        if clause == "code":
            lines.append(f"{have} of {n} connected agents {'accepts' if have == 1 else 'accept'} code from you "
                         "(a volunteer consents with `panal trust add KEY --code` or "
                         "`panal agent join URL --allow-code`)")
            continue
        lines.append(f"needs {_describe(clause, req, kind)}: {have} of {n} connected agents "
                     f"{'has' if have == 1 else 'have'} it{_largest(clause, agents)}")
    return lines


_GPU_CLAUSES = frozenset({"backends", "min_vram_gb", "min_compute_capability", "gpu"})


def _describe(clause: str, req: Requirements, kind: str) -> str:
    return {
        "kind": f"kind {kind}",
        "min_memory_gb": f"min_memory_gb {req.min_memory_gb:g}",
        "max_memory_gb": f"volunteers allowing {req.task_memory_gb:g} GB per task (its memory cap)",
        "labels": "labels " + ", ".join(f"{k}={v}" for k, v in req.labels),
        "torch": f"torch {req.torch}",
        "device": "a GPU",
        "backends": "backend " + " or ".join(req.backends),
        "min_vram_gb": f"min_vram_gb {req.min_vram_gb:g}",
        "min_compute_capability": f"min_compute_capability {req.min_compute_capability}",
        "gpu": "one GPU meeting every GPU clause",
        "min_gflops": f"min_gflops {req.min_gflops:g}",
        "code": "an agent that accepts code from this submitter",
        "features": "agents that implement " + ", ".join(req.features) + " (a newer panal agent)",
    }[clause]


def _largest(clause: str, agents: list[Capabilities]) -> str:
    if clause == "min_vram_gb":
        best = max((g.vram_gb for c in agents for g in c.gpus), default=0.0)
        return f" (largest: {best:.1f})"
    if clause == "min_memory_gb":
        return f" (largest: {max(c.memory_gb for c in agents):.1f})"
    if clause == "min_gflops":
        best = max((max([c.cpu_gflops, *(g.gflops_fp32 for g in c.gpus)]) for c in agents), default=0.0)
        return f" (fastest: {best:.0f})"
    return ""
