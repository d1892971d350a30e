"""A manifest's duration pattern costs time in proportion to the text, not its square
(jobs/manifest_schema.py ``_DURATION``).

``\\s*(ms|s|m|h|d)?\\s*$`` tried every split of a run of blanks between its two ``\\s*`` before failing: a
``timeout`` of "1", 16k spaces and "x" took 0.9 s of the checks every hub and agent make, one filling a 4 MiB body
hours of the hub's event loop. The timeouts below are hang detectors, not measurements.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import pytest
from conftest import InProcessHub
from hub_clients import submitter

from agent.client.submitting import make_envelope, submit
from jobs.manifest import Manifest, parse_duration, validate
from jobs.manifest_schema import _DURATION
from security.errors import BadRequest

BASE: dict[str, Any] = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "patterns"},
                        "spec": {"task": "sleep", "sweep": {"seconds": [0.0]}}}
#: blanks between a number and a character that is no unit: the shape that backtracked quadratically
SLOW = "1" + " " * 1_000_000 + "x"


def with_timeout(value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"] = {"timeout": value}
    return doc


@pytest.mark.timeout(60)
def test_a_long_run_of_blanks_in_a_duration_is_refused_without_backtracking() -> None:
    problems = validate(with_timeout(SLOW))
    assert [path for path, _ in problems] == ["spec.resources.timeout"], problems[0][1][:80]
    assert problems[0][1].startswith("unexpected format")
    with pytest.raises(BadRequest):
        parse_duration(SLOW)


def test_the_duration_pattern_still_reads_what_it_did() -> None:
    before = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")   # the quadratic one: same language, groups
    for text in ("90", "90s", " 1.5 h ", "10m\t", "3 d", "250ms", "1 x", "s", "1.", ".5", "1 h m", "٣ s", "7\n",
                 " 2\u2003m\u2003", "", "1  ", "12ms ", "1m s"):
        old, new = before.search(text), _DURATION.search(text)
        assert (old.groups() if old else None) == (new.groups() if new else None), text
    assert parse_duration(" 1.5 h ") == 5400.0 and parse_duration("250ms") == 0.25


@pytest.mark.timeout(120)
async def test_a_hub_answers_a_submission_with_a_pathological_timeout_with_a_400(hub: InProcessHub) -> None:
    sub = await submitter(hub)
    try:
        fine = Manifest.from_dict(BASE)
        # signed whole (not committed, which would build the manifest here first): ~1 MB, under max_body_bytes
        envelope = make_envelope(sub.identity, dataclasses.replace(fine, source=with_timeout(SLOW)),
                                 commit_bytes=8 << 20)
        with pytest.raises(BadRequest, match=r"spec\.resources\.timeout"):
            await submit(sub, envelope)
    finally:
        await sub.close()
