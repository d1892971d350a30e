"""A Merkle tree over a job's units: a signed root binds 100k units, and one unit is proven with ~17 hashes.

A big job's submitter signs the root of this tree instead of every sweep value and shard digest
(jobs/committed.py), so an agent checks its one unit against the root with a short proof and never holds
the whole manifest. The shape is fixed here, for every party that builds or checks one:

- leaf ``i`` = sha256(0x00 || canonical(unit i's data)); the data names its index ``i`` (so a leaf of one
  place can never be shown for another), node = sha256(0x01 || left || right): the prefixes keep a node
  from ever passing as a leaf (the second-preimage trick of plain Merkle trees);
- a level of odd length promotes its last node unchanged to the next level (no duplication, so no two
  leaf lists share a root by repeating the last leaf);
- a proof is the sibling hashes from the leaf up, only of the levels where the node has one: its length
  follows from ``count`` and ``index``, and :func:`verify` wants exactly that many, so a proof can be
  neither padded nor cut. ``count`` is signed beside the root.

hashlib only: the tree is 40 lines, and no Merkle library on PyPI is both kept up and this explicit
about the odd-node rule and domain separation (the parts a verifier must agree on byte for byte).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from security.records import canonical

__all__ = ["HASH_BYTES", "MAX_DEPTH", "MerkleTree", "leaf_hash", "proof_length", "verify"]

HASH_BYTES = 32
#: the deepest proof anyone accepts: 2^48 units is far past any job (the hub's and agent's task caps)
MAX_DEPTH = 48
_LEAF, _NODE = b"\x00", b"\x01"


def leaf_hash(data: dict[str, Any]) -> bytes:
    """The leaf of one unit's data (a map that names the unit's index)."""
    return hashlib.sha256(_LEAF + canonical(data)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def proof_length(count: int, index: int) -> int:
    """How many sibling hashes prove leaf ``index`` of ``count`` (levels where it is a promoted last node
    have none)."""
    length = 0
    while count > 1:
        if not (index == count - 1 and count % 2 == 1):
            length += 1
        index, count = index // 2, (count + 1) // 2
    return length


class MerkleTree:
    """Every level of the tree, each one bytes object (32 bytes per node): 100k units hold ~6.4 MB."""

    def __init__(self, leaves: Iterable[bytes]) -> None:
        level = b"".join(leaves)
        if not level or len(level) % HASH_BYTES:
            raise ValueError("a Merkle tree needs at least one 32-byte leaf")
        self.levels = [level]
        while len(level) > HASH_BYTES:
            nodes = [level[at:at + HASH_BYTES] for at in range(0, len(level), HASH_BYTES)]
            up = [_node(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
            if len(nodes) % 2:
                up.append(nodes[-1])   # promoted
            level = b"".join(up)
            self.levels.append(level)

    @property
    def count(self) -> int:
        return len(self.levels[0]) // HASH_BYTES

    @property
    def root(self) -> bytes:
        return self.levels[-1]

    def proof(self, index: int) -> list[bytes]:
        """The sibling hashes of leaf ``index``, from the bottom up."""
        if not 0 <= index < self.count:
            raise IndexError(f"leaf {index} is outside this tree's {self.count}")
        out = []
        for level in self.levels[:-1]:
            n = len(level) // HASH_BYTES
            sibling = index ^ 1
            if sibling < n:
                out.append(level[sibling * HASH_BYTES:(sibling + 1) * HASH_BYTES])
            index //= 2
        return out


def verify(root: bytes, count: int, index: int, leaf: bytes, proof: Sequence[bytes]) -> bool:
    """Whether ``leaf`` is leaf ``index`` of the ``count``-leaf tree with ``root`` (``proof`` as
    :meth:`MerkleTree.proof` gives it: exactly as long as the shape needs, each hash 32 bytes)."""
    if not 0 <= index < count or len(proof) != proof_length(count, index) or len(proof) > MAX_DEPTH:
        return False
    node, at = leaf, 0
    while count > 1:
        if not (index == count - 1 and count % 2 == 1):
            sibling = proof[at]
            if len(sibling) != HASH_BYTES:
                return False
            node = _node(node, sibling) if index % 2 == 0 else _node(sibling, node)
            at += 1
        index, count = index // 2, (count + 1) // 2
    return node == root
