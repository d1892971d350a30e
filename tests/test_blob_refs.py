"""Blob references in stored manifests and results (the pure half of blob GC)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from hub.blob_refs import manifest_blobs, result_blobs
from security.identity import Identity
from security.records import SignedRecord

ME = Identity.generate()
A, B, C = (hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))


def signed(payload: dict[str, Any]) -> dict[str, Any]:
    return SignedRecord.sign(ME, payload).to_wire()


def test_manifest_blobs_are_the_inputs_that_name_a_blob() -> None:
    envelope = signed({"manifest": {"spec": {"task": "matmul", "inputs": {
        "a": {"blob": A, "size": 3}, "b": {"blob": B}, "local": {"path": "x.pt"}, "empty": {"blob": ""},
        "odd": "text"}}}})
    assert manifest_blobs(envelope) == {A, B}
    assert manifest_blobs(signed({"manifest": {"spec": {"task": "sleep"}}})) == set()


def test_result_blobs_are_the_outputs_with_a_digest() -> None:
    record = signed({"status": "ok", "outputs": {"y": {"sha256": C, "size": 1}, "z": {"name": "n"}, "w": 5}})
    assert result_blobs(record) == {C}
    assert result_blobs(signed({"status": "failed", "outputs": None})) == set()
    assert result_blobs(signed({"status": "failed"})) == set()


@pytest.mark.parametrize("garbage", [None, {}, {"payload": b"\xc1not msgpack"}, {"payload": "text"},
                                     {"payload": b"\x93\x01\x02\x03"}, signed({"manifest": []})])
def test_an_unreadable_record_refers_to_nothing(garbage: Any) -> None:
    assert manifest_blobs(garbage) == set()
    assert result_blobs(garbage) == set()
