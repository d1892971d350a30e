"""A job's validation policy: how many agreeing instances make a unit's answer, and how to compare.

Resolved once at submission from the manifest's ``policy.validation`` (or ``replicas``), the kind's
comparator (jobs/kinds) and the board's defaults (HubConfig ``validation_quorum``), and stored on
the job row, so a restart or a changed hub setting never changes the rules of a running job.

``quorum`` results from different agents (and different owners, where owners are known) must agree.
``adaptive`` (the default): a unit starts as one instance and the board decides, when that instance
is leased, whether to run a second one in parallel (always for an agent without a record for the
kind, then with a probability falling with its run of valid results: hub/trust/reputation.py); an
unreplicated result of a trusted agent is accepted alone. Not adaptive: every unit starts as
``quorum`` instances. On disagreement the board adds instances up to ``max_instances``, then the
unit fails as ``no_consensus``. ``replicas: N`` is kept as the shorthand for ``{quorum: N,
adaptive: false}``. A quorum of 1 (the board default unless a hub sets ``validation_quorum``)
accepts every result: a private board or LAN mode with one machine must keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.compare import CompareSpec
from jobs.kinds.base import Kind

__all__ = ["ValidationPolicy"]


@dataclass(frozen=True)
class ValidationPolicy:
    quorum: int = 1
    max_instances: int = 1
    adaptive: bool = True
    compare: CompareSpec = field(default_factory=CompareSpec)

    @property
    def enabled(self) -> bool:
        """Whether results are compared at all (a quorum of 1 accepts each result as it comes)."""
        return self.quorum > 1

    @classmethod
    def resolve(cls, asked: Mapping[str, Any], replicas: int, kind: Kind, default_quorum: int) -> ValidationPolicy:
        """The policy of a new job: the manifest's wishes over the kind's comparator and the board's quorum."""
        compare = kind.compare
        mode = str(asked.get("compare", "auto"))
        if mode != "auto":
            compare = CompareSpec(mode, compare.ignore, compare.scaled, compare.tolerance)
        if "tolerance" in asked:
            compare = CompareSpec(compare.mode, compare.ignore, compare.scaled, float(asked["tolerance"]))
        if replicas > 1 and not asked:
            quorum, adaptive = replicas, False
        else:
            quorum, adaptive = int(asked.get("quorum", default_quorum)), bool(asked.get("adaptive", True))
        quorum = max(1, quorum)
        max_instances = int(asked.get("max_instances", quorum + 2 if quorum > 1 else 1))
        return cls(quorum, max(quorum, max_instances), adaptive, compare)

    def initial_instances(self) -> int:
        """Rows created per unit at submission."""
        return 1 if self.adaptive or not self.enabled else self.quorum

    def to_dict(self) -> dict[str, Any]:
        return {"quorum": self.quorum, "max_instances": self.max_instances, "adaptive": self.adaptive,
                "compare": self.compare.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValidationPolicy:
        if not data:
            return cls()
        return cls(int(data.get("quorum", 1)), int(data.get("max_instances", 1)), bool(data.get("adaptive", True)),
                   CompareSpec.from_dict(data.get("compare", {})))
