"""Committed manifests: a big job's submitter signs a small head and the Merkle root of its units.

A manifest that lists 100k sweep values or shard digests is ~900 KB; every agent of the job had to hold all
of it to check any one task. Over :data:`COMMIT_BYTES` the submitter signs instead::

    {"manifest": head, "units": {"count": N, "root": <32 bytes>, "sweep": [swept keys]}, ...}

``head`` is the manifest with its big lists taken out (``spec.sweep`` and every input's ``shards``); the lists
travel beside the signature (the envelope's ``units`` key, unsigned) and are bound by the root: the board
rebuilds the full manifest (:func:`join`), validates it as any other, and refuses lists whose tree is not the
signed one (``units_root_mismatch``). Leaf ``i`` (jobs/merkle.py) is unit ``i``'s data: its index, its
validated params (``Manifest.point(i)``) and, of each input split in shard blobs, its shard
(blob, size, rows, first row). Each assignment carries that shard data and the sibling hashes
(:class:`UnitProof`), so an agent checks its unit against the signed root with ~17 hashes and no list.

A manifest under the threshold is signed exactly as before (no ``units``): older agents run it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.fields import field_error, shown
from jobs.inputs import ShardRef
from jobs.manifest import Manifest
from jobs.merkle import HASH_BYTES, MAX_DEPTH, MerkleTree, leaf_hash, verify
from security.errors import BadRequest, Unauthorized
from security.records import SignedRecord, canonical, decode

__all__ = [
    "COMMIT_BYTES",
    "UNIT_PROOFS",
    "VIEW_MAX_TASKS",
    "CommittedHead",
    "UnitProof",
    "UnitProofs",
    "at_unit",
    "commit",
    "committed_units",
    "join",
    "open_lists",
    "signed_manifest",
    "split",
    "unit_leaf",
    "unit_tree",
]

#: the protocol feature (``features`` in a capability report) of an agent that checks unit proofs: the board sends
#: a committed job's tasks only to agents reporting it, as an older agent would refuse each one as tampered
UNIT_PROOFS = "unit-proofs"

#: a manifest whose signed record (payload and signature) would be over this is committed (the hub's
#: ``inline_envelope_bytes`` default: under it, an envelope rides in lease replies whole, as before)
COMMIT_BYTES = 64 * 1024
#: the most tasks a submitter's own views (results, merge) expand a job it signed to: bounded by what it signed
#: (a committed job's lists are held to the signed count before they are expanded, :func:`open_lists`)
VIEW_MAX_TASKS = 100_000_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_INPUT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MAX_INPUTS = 16   # spec.inputs' maxProperties


def split(source: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A manifest -> (head, lists): ``spec.sweep`` and each input's ``shards`` taken out of a copy."""
    head = copy.deepcopy(dict(source))
    spec = head["spec"]
    sweep = spec.pop("sweep", {})
    shards = {name: ref.pop("shards") for name, ref in spec.get("inputs", {}).items()
              if isinstance(ref, dict) and "shards" in ref}
    return head, {"sweep": sweep, "shards": shards}


def join(head: Any, lists: Any) -> dict[str, Any]:
    """Head + lists -> the full manifest (sweep keys in sorted order: the order the signed bytes give);
    a 400 naming the field when either is not the shape :func:`split` makes."""
    if not isinstance(head, dict) or not isinstance(head.get("spec"), dict):
        raise field_error("envelope.payload.manifest", "a committed manifest's head must be a map with spec")
    if not isinstance(lists, dict) or set(lists) - {"sweep", "shards"}:
        raise field_error("envelope.units", f"expected a map of sweep and shards, got {shown(lists)}")
    sweep, shards = lists.get("sweep", {}), lists.get("shards", {})
    if not isinstance(sweep, dict) or not all(isinstance(k, str) and isinstance(v, list) for k, v in sweep.items()):
        raise field_error("envelope.units.sweep", "expected a map of parameter name to a list of values")
    if not isinstance(shards, dict) or not all(isinstance(k, str) and isinstance(v, list) for k, v in shards.items()):
        raise field_error("envelope.units.shards", "expected a map of input name to a list of shards")
    source = copy.deepcopy(head)
    spec = source["spec"]
    if "sweep" in spec:
        raise field_error("envelope.payload.manifest.spec.sweep", "a committed head carries no sweep: it is in units")
    if sweep:
        spec["sweep"] = {key: sweep[key] for key in sorted(sweep)}
    inputs = spec.get("inputs", {})
    for name, ref in (inputs.items() if isinstance(inputs, dict) else ()):
        if isinstance(ref, dict) and "shards" in ref:   # what the agent proves a unit's shard against: units only
            raise field_error(f"envelope.payload.manifest.spec.inputs.{name}.shards",
                              "a committed head carries no shard list: it is in units")
    for name, values in shards.items():
        ref = inputs.get(name) if isinstance(inputs, dict) else None
        if not isinstance(ref, dict):
            raise field_error(f"envelope.units.shards.{name}", "no input of the head takes these shards")
        ref["shards"] = values
    return source


def _shard_inputs(manifest: Manifest) -> list[tuple[str, list[tuple[int, int]], list[dict[str, Any]]]]:
    """Each input split in shard blobs: its name, each shard's rows and each shard as a leaf states it."""
    out = []
    for name, ref in manifest.inputs.items():
        if ref.shards is not None:
            bounds = ref.shard_bounds()
            out.append((name, bounds, [{"blob": s.blob, "size": s.size, "rows": s.rows, "start": start}
                                       for s, (start, _) in zip(ref.shards, bounds, strict=True)]))
    return out


def unit_leaf(index: int, params: Mapping[str, Any], shards: Mapping[str, Any]) -> bytes:
    """Unit ``index``'s leaf: what the submitter signed of it, and what an agent recomputes from its assignment."""
    return leaf_hash({"unit": index, "params": dict(params), "shards": dict(shards)})


def _leaves(manifest: Manifest, points: list[dict[str, Any]]) -> Iterator[bytes]:
    split_inputs = _shard_inputs(manifest)
    for index, params in enumerate(points):
        shards = {name: leaf[index % len(leaf)] for name, _, leaf in split_inputs}
        yield unit_leaf(index, params, shards)


def unit_tree(manifest: Manifest, points: list[dict[str, Any]] | None = None) -> MerkleTree:
    """The tree over a full manifest's units (``points``: its :meth:`Manifest.points`, if the caller has them)."""
    return MerkleTree(_leaves(manifest, manifest.points() if points is None else points))


class UnitProofs:
    """What a board keeps of a committed job to prove any unit: its tree (every level, ~6.4 MB for 100k
    units) and its split inputs' shards with their first rows (no per-unit dicts)."""

    def __init__(self, manifest: Manifest, points: list[dict[str, Any]] | None = None) -> None:
        self.tree = unit_tree(manifest, points)
        self._split = [(name, ref.shards or (), [start for start, _ in ref.shard_bounds()])
                       for name, ref in manifest.inputs.items() if ref.shards is not None]

    @classmethod
    def stored(cls, record: SignedRecord, lists: Any) -> UnitProofs:
        """Rebuilt from a stored job's envelope and lists (validated when the job was submitted): a restarted
        board proves units again."""
        payload = decode(record.payload)
        return cls(Manifest._build(join(payload.get("manifest"), lists)))

    def proof(self, index: int) -> UnitProof:
        shards = {}
        for name, refs, starts in self._split:
            at = index % len(refs)
            shards[name] = {"blob": refs[at].blob, "size": refs[at].size, "rows": refs[at].rows, "start": starts[at]}
        return UnitProof(tuple(self.tree.proof(index)), shards)


def commit(source: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A full (validated) manifest -> (the fields to sign: head and units, the lists that travel beside)."""
    ordered = decode(canonical(dict(source)))   # the key order every verifier reads from the signed bytes
    manifest = Manifest._build(ordered)
    head, lists = split(ordered)
    tree = unit_tree(manifest)
    units = {"count": tree.count, "root": tree.root, "sweep": sorted(lists["sweep"])}
    return {"manifest": head, "units": units}, lists


def committed_units(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """A signed payload's ``units`` (count, root, swept keys), checked; None for a manifest signed whole."""
    units = payload.get("units")
    if units is None:
        return None
    if not isinstance(units, dict) or set(units) != {"count", "root", "sweep"}:
        raise BadRequest("units: expected a map of count, root and sweep", code="bad_units")
    count, root, sweep = units["count"], units["root"], units["sweep"]
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 2 ** MAX_DEPTH:
        raise BadRequest(f"units.count: expected a positive integer, got {shown(count)}", code="bad_units")
    if not isinstance(root, bytes) or len(root) != HASH_BYTES:
        raise BadRequest(f"units.root: expected {HASH_BYTES} bytes", code="bad_units")
    if not isinstance(sweep, list) or not all(isinstance(k, str) for k in sweep) or sweep != sorted(set(sweep)):
        raise BadRequest("units.sweep: expected the sorted swept parameter names", code="bad_units")
    return units


def open_lists(payload: Mapping[str, Any], lists: Any, max_tasks: int) -> tuple[Manifest, list[dict[str, Any]],
                                                                              UnitProofs]:
    """A committed payload and the lists sent beside it -> the full manifest (validated as any manifest is),
    its units' params and its tree; ``units_root_mismatch`` when the lists are not what was signed."""
    units = committed_units(payload)
    assert units is not None
    source = join(payload.get("manifest"), lists)
    listed = _listed_units(source)
    if listed != units["count"]:   # before any expansion: lists of 10^4 x 10^4 values must not cost 10^8 dicts
        raise BadRequest(f"the sweep and shard lists sent make {listed} units, the submitter signed "
                         f"{units['count']}: they are not the signed job", code="units_root_mismatch")
    manifest = Manifest.from_dict(source, max_tasks=max_tasks)
    if sorted(manifest.sweep) != units["sweep"]:
        raise BadRequest(f"the lists sweep {sorted(manifest.sweep)}, the signed head {units['sweep']}",
                         code="units_root_mismatch")
    points = manifest.points()
    proofs = UnitProofs(manifest, points)
    tree = proofs.tree
    if tree.count != units["count"] or tree.root != units["root"]:
        raise BadRequest(f"the sweep and shard lists sent make {tree.count} units whose Merkle root is not the one "
                         f"the submitter signed ({units['count']} units): they are not the signed job",
                         code="units_root_mismatch")
    return manifest, points, proofs


def _listed_units(source: dict[str, Any]) -> int:
    """How many units a joined manifest's lists make (sweep points x shards, as ``Manifest.n_units`` counts
    them once valid), read without validating or expanding anything."""
    spec = source["spec"]
    n = 1
    for values in (spec.get("sweep") or {}).values():
        n *= len(values)
    shards = 1
    inputs = spec.get("inputs")
    for ref in (inputs.values() if isinstance(inputs, dict) else ()):
        if isinstance(ref, dict):
            count = ref.get("shard", {}).get("count") if isinstance(ref.get("shard"), dict) else None
            if isinstance(count, int) and not isinstance(count, bool):
                shards = max(shards, count)
            if isinstance(ref.get("shards"), list):
                shards = max(shards, len(ref["shards"]))
    return n * shards


def signed_manifest(wire: Any, max_tasks: int = VIEW_MAX_TASKS) -> dict[str, Any]:
    """A job's envelope as its submitter's views read it (results, merge): the signature verified, and of a
    committed one the full manifest rebuilt from the lists beside it and checked against the signed root."""
    payload = SignedRecord.from_wire(wire).verify()
    if committed_units(payload) is None:
        manifest: dict[str, Any] = payload.get("manifest") or {}
        return manifest
    try:
        return open_lists(payload, wire.get("units") if isinstance(wire, dict) else None, max_tasks)[0].source
    except BadRequest as exc:
        raise Unauthorized(f"the job's lists are not what its submitter signed: {exc.message}",
                           code="units_root_mismatch") from exc


# -- the proof an assignment carries ------------------------------------------------------------------------
def _hash(value: Any, at: str) -> bytes:
    if isinstance(value, str):   # a JSON body carries bytes as base64
        with contextlib.suppress(ValueError):
            value = base64.b64decode(value, validate=True)
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        raise field_error(at, f"expected a {HASH_BYTES}-byte hash, got {shown(value)}")
    return value


def _count(value: Any, at: str, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value < 2 ** 63:
        raise field_error(at, f"expected an integer >= {least}, got {shown(value)}")
    return value


def _shard(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"blob", "size", "rows", "start"}:
        raise field_error(at, f"expected a map of blob, size, rows and start, got {shown(value)}")
    if not isinstance(value["blob"], str) or not _HEX64.fullmatch(value["blob"]):
        raise field_error(f"{at}.blob", f"expected a sha256 in hex, got {shown(value['blob'])}")
    return {"blob": value["blob"], "size": _count(value["size"], f"{at}.size", 0),
            "rows": _count(value["rows"], f"{at}.rows", 1), "start": _count(value["start"], f"{at}.start", 0)}


@dataclass(frozen=True, slots=True)
class UnitProof:
    """What an assignment of a committed job carries: its unit's shards (input name -> blob, size, rows, first
    row) and the sibling hashes from its leaf up to the signed root."""

    path: tuple[bytes, ...]
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        return {"path": list(self.path), "shards": self.shards}

    @classmethod
    def decode(cls, value: Any, at: str = "proof") -> UnitProof:
        """Strictly: at most :data:`~jobs.merkle.MAX_DEPTH` hashes of 32 bytes, at most 16 inputs' shards."""
        if not isinstance(value, dict) or set(value) - {"path", "shards"}:
            raise field_error(at, f"expected a map of path and shards, got {shown(value)}")
        path, shards = value.get("path"), value.get("shards", {})
        shards = {} if shards is None else shards
        if not isinstance(path, list) or len(path) > MAX_DEPTH:
            raise field_error(f"{at}.path", f"expected a list of at most {MAX_DEPTH} hashes, got {shown(path)}")
        if not isinstance(shards, dict) or len(shards) > _MAX_INPUTS:
            raise field_error(f"{at}.shards", f"expected a map of at most {_MAX_INPUTS} inputs, got {shown(shards)}")
        for name in shards:
            if not isinstance(name, str) or not _INPUT_NAME.fullmatch(name):
                raise field_error(f"{at}.shards", f"expected input names, got {shown(name)}")
        return cls(tuple(_hash(h, f"{at}.path[{i}]") for i, h in enumerate(path)),
                   {name: _shard(s, f"{at}.shards.{name}") for name, s in shards.items()})


class CommittedHead:
    """A verified committed payload as an agent checks units against it (agent/daemon/assignments.py)."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        units = committed_units(payload)
        assert units is not None
        self.count: int = units["count"]
        self.root: bytes = units["root"]
        self.sweep: list[str] = units["sweep"]
        self.head: Any = payload.get("manifest")

    def proves(self, index: int, params: Mapping[str, Any], proof: UnitProof | None) -> bool:
        """Whether ``params`` and ``proof``'s shards are unit ``index`` of the signed root."""
        return proof is not None and 0 <= index < self.count and \
            verify(self.root, self.count, index, unit_leaf(index, params, proof.shards), proof.path)

    def unit_manifest(self, params: Mapping[str, Any], shards: Mapping[str, Any], max_tasks: int) -> Manifest:
        """The head made a one-unit manifest of a (proven) unit and validated as any manifest is: each swept
        key holds this unit's value, each split input this unit's shard (:meth:`at_unit` moves it to its rows)."""
        if not isinstance(self.head, dict) or not isinstance(self.head.get("spec"), dict):
            raise BadRequest("a committed manifest's head must be a map with spec", code="bad_units")
        missing = [key for key in self.sweep if key not in params]
        if missing:
            raise BadRequest(f"the unit's params lack swept {', '.join(missing)}", code="bad_units")
        lists = {"sweep": {key: [params[key]] for key in self.sweep},
                 "shards": {name: [{k: s[k] for k in ("blob", "size", "rows")}] for name, s in shards.items()}}
        source = join(self.head, lists)
        for name, s in shards.items():   # one shard of the many the head counts
            source["spec"]["inputs"][name].update(rows=s["rows"], shard={"by": "rows", "count": 1})
        return at_unit(Manifest.from_dict(source, max_tasks=max_tasks), shards)


def at_unit(manifest: Manifest, shards: Mapping[str, Any]) -> Manifest:
    """``manifest`` whose split inputs hold one (proven) unit's shard, starting at its first row
    (``InputRef.first_row``): :func:`~jobs.inputs.input_blob` then gives that shard's blob for that unit's rows,
    and no other."""
    if not shards:
        return manifest
    inputs = dict(manifest.inputs)
    for name, s in shards.items():
        if name in inputs:
            inputs[name] = dataclasses.replace(inputs[name], shards=(ShardRef(s["blob"], s["size"], s["rows"]),),
                                               rows=s["rows"], first_row=s["start"])
    return dataclasses.replace(manifest, inputs=inputs)
