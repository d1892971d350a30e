"""Which blobs a stored job or result refers to: the pure half of blob GC, shared by every store.

A blob is kept while a job still names it as an input, a result names it as an output, or a task
resumes from it (its checkpoint column). Records are read as stored (the signed wire form); an
unreadable one refers to nothing rather than failing the whole collection. A committed job's shard blobs
(jobs/committed.py) are in the lists stored beside its signature (the envelope's ``units``), bound by its root.
"""

from __future__ import annotations

from typing import Any

import msgpack

__all__ = ["manifest_blobs", "result_blobs", "task_blobs"]


def _split_inputs(envelope: Any) -> list[tuple[dict[str, Any], list[Any]]]:
    """Each input of a stored envelope with the list of its shards: in the signed manifest, or of a committed
    job in the lists stored beside it."""
    inputs = _unpack(envelope["payload"])["manifest"]["spec"].get("inputs", {})
    lists = envelope.get("units") or {}
    stored = lists.get("shards") or {} if isinstance(lists, dict) else {}
    out = []
    for name, ref in inputs.items():
        if isinstance(ref, dict):
            shards = ref.get("shards") if "shards" in ref else stored.get(name) if isinstance(stored, dict) else None
            out.append((ref, shards if isinstance(shards, list) else []))
    return out


def manifest_blobs(envelope: Any) -> set[str]:
    """The sha256 of every ``{blob: ...}`` input and every shard blob in a signed manifest envelope."""
    try:
        found: set[str] = set()
        for ref, shards in _split_inputs(envelope):   # an input split in shard blobs (jobs/inputs.py) names each
            if ref.get("blob"):
                found.add(ref["blob"])
            found |= {s["blob"] for s in shards if isinstance(s, dict) and isinstance(s.get("blob"), str)}
        return found
    except (KeyError, TypeError, AttributeError, ValueError):
        return set()


def task_blobs(envelope: Any, params: Any) -> set[str]:
    """The blobs one task of a job reads: every input's, but of an input split in shard blobs only the
    shard whose rows are the task's ``row_start``..``row_end`` (what an agent leasing it may download)."""
    try:
        rows = (params.get("row_start"), params.get("row_end"))
        found: set[str] = set()
        for ref, shards in _split_inputs(envelope):
            if ref.get("blob"):
                found.add(ref["blob"])
            start = 0
            for shard in shards:
                end = start + int(shard["rows"])
                if (start, end) == rows:
                    found.add(shard["blob"])
                start = end
        return found
    except (KeyError, TypeError, AttributeError, ValueError):
        return set()


def result_blobs(record: Any) -> set[str]:
    """The sha256 of every output in a signed result record."""
    try:
        outputs = _unpack(record["payload"]).get("outputs") or {}
        return {o["sha256"] for o in outputs.values() if isinstance(o, dict) and o.get("sha256")}
    except (KeyError, TypeError, AttributeError, ValueError):
        return set()


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)
