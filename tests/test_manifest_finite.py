"""NaN and infinities in a manifest's own number fields are refused (jobs/manifest.py ``_non_finite``).

JSON Schema's ``minimum``/``maximum`` cannot refuse NaN (every comparison with it is false), and both JSON
(``NaN``) and msgpack carry it: ``timeout: NaN`` passed the 30-day bound and the hub's ``max_task_timeout_s``,
and its lease's hard end (now + NaN) never came.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from conftest import InProcessHub
from hub_clients import submitter

from agent.client.submitting import make_envelope, submit
from hub.config import HubConfig
from hub.intake import over_limits
from jobs.manifest import Manifest, ManifestError, validate
from security.errors import BadRequest

BASE: dict[str, Any] = {"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "finite"},
                        "spec": {"task": "sleep", "sweep": {"seconds": [0.0]}}}
FIELDS = [("requires", "min_vram_gb"), ("requires", "min_memory_gb"), ("requires", "min_gflops"),
          ("resources", "timeout"), ("resources", "max_memory_gb"), ("policy", "deadline")]


def with_value(section: str, key: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["spec"][section] = {key: value}
    return doc


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(("section", "key"), FIELDS)
def test_a_non_finite_number_in_a_manifest_field_is_refused_naming_it(section: str, key: str, value: float) -> None:
    problems = validate(with_value(section, key, value))
    assert [path for path, _ in problems] == [f"spec.{section}.{key}"], problems   # once, whoever names it


def test_a_nan_tolerance_is_refused_too() -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"]["policy"] = {"validation": {"quorum": 2, "tolerance": float("nan")}}
    assert dict(validate(doc)) == {"spec.policy.validation.tolerance": "expected a finite number, got NaN"}


def test_a_nan_timeout_no_longer_slips_under_the_hubs_limit() -> None:
    with pytest.raises(ManifestError, match=r"spec\.resources\.timeout: expected a finite number, got NaN"):
        Manifest.from_dict(with_value("resources", "timeout", float("nan")))
    # what it did before: every limit compared false against NaN
    sneaky = dataclasses.replace(Manifest.from_dict(BASE), timeout_s=float("nan"))
    assert over_limits(sneaky, HubConfig(max_task_timeout_s=60.0)) == []   # why validate() must refuse it


def test_nan_in_params_and_sweep_values_is_left_to_the_kind() -> None:
    """Free-form params may hold NaN (jobs/jsonlike.py); a kind's own field checks judge its values."""
    doc = copy.deepcopy(BASE)
    doc["spec"]["sweep"] = {"seconds": [float("nan")]}
    doc["spec"]["params"] = {"seconds": float("nan")}
    assert not [m for _, m in validate(doc) if m.startswith("expected a finite number")]


async def test_a_hub_refuses_a_signed_submission_whose_timeout_is_nan(hub: InProcessHub) -> None:
    """Over real TLS and msgpack (which carries NaN): a 400 naming the field, not a job that never times out."""
    sub = await submitter(hub)
    try:
        fine = Manifest.from_dict(BASE)
        nan_source = with_value("resources", "timeout", float("nan"))
        envelope = make_envelope(sub.identity, dataclasses.replace(fine, source=nan_source))
        with pytest.raises(BadRequest, match=r"spec\.resources\.timeout: expected a finite number"):
            await submit(sub, envelope)
        assert hub.server is not None
        assert await hub.server.board.store.list_jobs() == []
    finally:
        await sub.close()


def test_a_whole_float_thread_count_reaches_the_worker_as_an_integer() -> None:
    """JSON Schema counts 2.0 as an integer, so ``threads: 2.0`` passes; the worker's torch.set_num_threads(2.0)
    then raised TypeError on every agent that ran the task."""
    import torch

    from agent.daemon.threads import task_threads

    doc = copy.deepcopy(BASE)
    doc["spec"]["resources"] = {"threads": 2.0}
    threads = task_threads(Manifest.from_dict(doc).threads, 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
