"""The ``python`` kind's run path in a real worker process: good code, and each way code can be wrong."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.engine.runner import TaskRequest, Worker
from jobs.catalog import get_kind
from jobs.code_bundle import pack
from jobs.errors import InvalidParams

ENV = {"PANAL_WORKER_PRELOAD": "0"}

GOOD = '''
import json
import helper

def run(params, ctx):
    ctx.log("training with", params["lr"])
    ctx.progress(0.5)
    with open("weights.bin", "wb") as f:
        f.write(b"w" * 10)
    ctx.output("weights", "weights.bin")
    ctx.checkpoint("weights.bin")
    data = ctx.inputs["data"].read_text()
    return {"val_acc": helper.double(params["lr"]), "data": data, "cwd_is_workdir": str(ctx.workdir),
            "resume": ctx.resume is not None, "inputs": sorted(ctx.inputs)}
'''


def bundle(tmp: Path, files: dict[str, str], entry: str = "train:run", name: str = "src") -> Path:
    """Write ``files`` into a folder, pack it as ``panal submit`` does, return the tar."""
    src = tmp / name
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(textwrap.dedent(text))
    out = tmp / f"{name}.tar"
    out.write_bytes(pack(src, entry))
    return out


def request(tmp: Path, code: Path, params: dict[str, object], name: str = "t", **inputs: Path) -> TaskRequest:
    return TaskRequest(kind="python", params=params, timeout_s=60, workdir=str(tmp / "work" / name),
                       inputs={"code": str(code), **{k: str(v) for k, v in inputs.items()}})


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    w = Worker(ENV)
    await w.start()
    yield w
    await w.close()


async def test_good_code_returns_its_values_outputs_log_and_checkpoints(worker: Worker, tmp_path: Path) -> None:
    code = bundle(tmp_path, {"train.py": GOOD, "helper.py": "def double(x):\n    return 2 * x\n"})
    data = tmp_path / "data.txt"
    data.write_text("rows")
    checkpoints: list[str] = []
    progress: list[float] = []
    out = await worker.run(request(tmp_path, code, {"lr": 0.25}, data=data), progress.append,
                           on_checkpoint=checkpoints.append)
    assert out.ok, out.error
    assert out.values["val_acc"] == 0.5 and out.values["data"] == "rows"
    assert out.values["inputs"] == ["data"] and out.values["resume"] is False
    assert Path(out.files["weights"]).name == "weights.bin"
    assert Path(out.files["weights"]).read_bytes() == b"w" * 10
    assert checkpoints and checkpoints[0].endswith(".bin")
    assert out.notes == ["training with 0.25"] and progress[-1] == 1.0


async def test_a_warm_worker_forgets_one_jobs_modules_before_the_next(worker: Worker, tmp_path: Path) -> None:
    first = bundle(tmp_path, {"train.py": "import helper\ndef run(p, ctx):\n    return {'v': helper.V}\n",
                              "helper.py": "V = 1\n"}, name="a")
    second = bundle(tmp_path, {"train.py": "import helper\ndef run(p, ctx):\n    return {'v': helper.V}\n",
                               "helper.py": "V = 2\n"}, name="b")
    # a bundle may even name a module like one of panal's own: it shadows it for its run only
    shadow = bundle(tmp_path, {"jobs.py": "def run(p, ctx):\n    return {'v': 3}\n"}, entry="jobs:run", name="c")
    a = await worker.run(request(tmp_path, first, {}, "a"))
    b = await worker.run(request(tmp_path, second, {}, "b"))
    c = await worker.run(request(tmp_path, shadow, {}, "c"))
    again = await worker.run(request(tmp_path, first, {}, "a2"))
    assert [a.values, b.values, c.values, again.values] == [{"v": 1}, {"v": 2}, {"v": 3}, {"v": 1}]


async def test_syntax_error_is_refused_naming_file_and_line_before_anything_runs(
        worker: Worker, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = bundle(tmp_path, {"train.py": f"open({str(marker)!r}, 'w').close()\nimport broken\n"
                                         "def run(p, ctx):\n    return {{}}\n",
                             "broken.py": "x = 1\ndef f(:\n    pass\n"})
    out = await worker.run(request(tmp_path, code, {}))
    assert (out.ok, out.error_class) == (False, "invalid_params")
    assert "broken.py:2: syntax error" in (out.error or "")
    assert not marker.exists()


async def test_missing_entry_module_or_function_is_invalid_params(worker: Worker, tmp_path: Path) -> None:
    no_module = bundle(tmp_path, {"model.py": "def run(p, ctx):\n    return {}\n"}, name="m")
    no_function = bundle(tmp_path, {"train.py": "def train(p, ctx):\n    return {}\n"}, name="f")
    a = await worker.run(request(tmp_path, no_module, {}, "m"))
    b = await worker.run(request(tmp_path, no_function, {}, "f"))
    assert (a.error_class, b.error_class) == ("invalid_params", "invalid_params")
    assert "entry module 'train' is not in the code (it holds model.py)" in (a.error or "")
    assert "train.py: entry function 'run' is not defined at the top level" in (b.error or "")


async def test_a_value_that_is_not_json_like_is_refused_clearly(worker: Worker, tmp_path: Path) -> None:
    tensor = bundle(tmp_path, {"train.py": "import torch\ndef run(p, ctx):\n"
                                           "    return {'acc': {'last': torch.tensor(0.5)}}\n"}, name="t")
    not_a_map = bundle(tmp_path, {"train.py": "def run(p, ctx):\n    return [1, 2]\n"}, name="l")
    a = await worker.run(request(tmp_path, tensor, {}, "t"))
    b = await worker.run(request(tmp_path, not_a_map, {}, "l"))
    assert a.error_class == "invalid_params"
    assert "values.acc.last: expected text, a number" in (a.error or "") and ".item()" in (a.error or "")
    assert b.error_class == "invalid_params" and "returned list; it must return a map" in (b.error or "")


async def test_importing_a_module_the_agent_lacks_names_the_module(worker: Worker, tmp_path: Path) -> None:
    code = bundle(tmp_path, {"train.py": "def run(p, ctx):\n    import torchvision_nope\n    return {}\n"})
    out = await worker.run(request(tmp_path, code, {}))
    assert (out.ok, out.error_class) == (False, "unsupported")
    assert "module 'torchvision_nope', which this agent does not have (at train.py:2 in run)" in (out.error or "")


async def test_an_exception_of_the_code_is_the_submitters_fault_with_its_line(worker: Worker, tmp_path: Path) -> None:
    code = bundle(tmp_path, {"train.py": "def run(p, ctx):\n    return {'x': 1 / p['lr']}\n"})
    out = await worker.run(request(tmp_path, code, {"lr": 0}))
    assert out.error_class == "invalid_params"
    assert out.error == "ZeroDivisionError: division by zero (at train.py:2 in run)"
    ok = await worker.run(request(tmp_path, code, {"lr": 2}, "ok"))   # the slot keeps serving
    assert ok.ok and ok.values == {"x": 0.5}


async def test_a_bundle_with_a_link_or_an_escaping_name_is_refused(worker: Worker, tmp_path: Path) -> None:
    import io
    import tarfile

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        link = tarfile.TarInfo("train.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        up = tarfile.TarInfo("../outside.py")
        up.size = 1
        tar.addfile(up, io.BytesIO(b"x"))
    out = await worker.run(request(tmp_path, evil, {}))
    assert out.error_class == "invalid_params" and "is not a plain relative file" in (out.error or "")
    assert not (tmp_path / "work" / "outside.py").exists()


def test_free_form_params_are_bounded_and_named_clearly() -> None:
    kind = get_kind("python")
    assert kind.validate({"lr": 0.1, "layers": [8, 16], "opt": {"name": "adam"}}) == \
        {"lr": 0.1, "layers": [8, 16], "opt": {"name": "adam"}}
    with pytest.raises(InvalidParams) as bad:
        kind.validate({"1x": 1, "f": {"deep": object()}})
    assert "spec.params.1x: parameter names are letters" in bad.value.message
    assert "spec.params.f.deep: expected text, a number" in bad.value.message
    deep: dict[str, object] = {}
    for _ in range(20):
        deep = {"d": deep}
    with pytest.raises(InvalidParams, match="nests deeper than 9 levels"):
        kind.validate({"x": deep})
    with pytest.raises(InvalidParams, match="over 64 KiB"):
        kind.validate({"x": ["y" * 60_000, "z" * 10_000]})


async def test_a_resumed_task_finds_its_checkpoint_as_ctx_resume_and_not_among_inputs(
        worker: Worker, tmp_path: Path) -> None:
    code = bundle(tmp_path, {"train.py": "def run(p, ctx):\n"
                                         "    return {'from': ctx.resume.read_text() if ctx.resume else None,\n"
                                         "            'suffix': ctx.resume.suffix, 'inputs': sorted(ctx.inputs)}\n"})
    saved = tmp_path / "ckpt.safetensors"
    saved.write_text("epoch 3")
    out = await worker.run(request(tmp_path, code, {}, checkpoint=saved))
    assert out.ok and out.values == {"from": "epoch 3", "suffix": ".safetensors", "inputs": []}


async def test_an_output_outside_the_work_dir_or_a_bad_name_is_the_codes_fault(worker: Worker, tmp_path: Path) -> None:
    outside = bundle(tmp_path, {"train.py": "def run(p, ctx):\n    ctx.output('hosts', '/etc/hostname')\n"
                                            "    return {}\n"}, name="o")
    badname = bundle(tmp_path, {"train.py": "def run(p, ctx):\n    ctx.output('../x', {})\n    return {}\n"},
                     name="n")
    a = await worker.run(request(tmp_path, outside, {}, "o"))
    b = await worker.run(request(tmp_path, badname, {}, "n"))
    assert a.error_class == "invalid_params"
    assert "output /etc/hostname is outside the task's work dir" in (a.error or "")
    assert b.error_class == "invalid_params" and "output name must match" in (b.error or "")
