"""The agent's per-board book of envelopes: what ``have`` says, and that an entry a request named is never lost
before its reply is resolved, whatever the book evicts meanwhile."""

from __future__ import annotations

from agent.client.submitting import make_envelope
from agent.daemon.envelopes import EnvelopeBook
from jobs.manifest import Manifest
from jobs.protocol import MAX_HAVE, Assignment, envelope_digest
from security.identity import Identity
from security.records import SignedRecord

USER = Identity.generate()


def envelope(name: str) -> SignedRecord:
    return SignedRecord.from_wire(make_envelope(USER, Manifest.from_dict({
        "apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"task": "sleep", "params": {"seconds": 0.0}}})))


def task(job_id: str, record: SignedRecord | None, i: int = 0) -> Assignment:
    return Assignment(f"{job_id}.{i}", job_id, 0, f"l{i}", 1, "sleep", {"seconds": 0.0}, 60.0, 30.0, record)


def test_have_names_what_the_board_sent_and_a_reply_resolves_in_order() -> None:
    book = EnvelopeBook()
    a = envelope("a")
    held = book.held()
    assert held.have == {}
    resolved, missing = held.resolve([task("ja", a, 0), task("ja", None, 1), task("jb", None, 2)])
    assert [t.envelope for t in resolved] == [a, a] and [t.task_id for t in missing] == ["jb.2"]
    assert book.held().have == {"ja": envelope_digest(a)}


def test_an_entry_a_request_named_outlives_evictions_until_its_reply_is_resolved() -> None:
    book = EnvelopeBook(size=2)
    a, b, c, d = (envelope(n) for n in "abcd")
    book.learn("ja", a)
    book.learn("jb", b)
    held = book.held()
    assert set(held.have) == {"ja", "jb"}
    # the reply brings two new envelopes first: the book drops ja and jb, the request's snapshot keeps them
    resolved, missing = held.resolve([task("jc", c), task("jd", d), task("ja", None), task("jb", None)])
    assert missing == [] and [t.envelope for t in resolved] == [c, d, a, b]
    assert len(book) == 2


def test_the_book_never_holds_more_than_have_may_name() -> None:
    book = EnvelopeBook(size=10 * MAX_HAVE)
    for i in range(MAX_HAVE + 5):
        book.learn(f"j{i}", envelope("x"))
    assert len(book.held().have) == MAX_HAVE


def test_the_book_keeps_at_most_its_bytes_and_always_the_newest() -> None:
    a, b, c = (envelope(n) for n in "abc")
    book = EnvelopeBook(size=32, max_bytes=len(a.payload) + len(b.payload) + 1)
    for job_id, record in (("ja", a), ("jb", b), ("jc", c)):
        book.learn(job_id, record)
    assert set(book.held().have) == {"jb", "jc"}
    tiny = EnvelopeBook(size=32, max_bytes=1)
    tiny.learn("ja", a)
    assert "ja" in tiny
