"""Malicious and malformed inputs are refused with a clear message before torch touches them."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jobs.errors import FailureClass, PermanentError
from jobs.safeload import (
    UnsafeInput,
    check_pt2,
    check_safetensors,
    load_pt2,
    load_safetensors,
    load_weights_only,
    scan_pickle,
)


class Payload:
    """Unpickling this runs a shell command: the attack a .pt2 or .pt file can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def raw_safetensors(header: dict[str, object], data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------- safetensors


def test_valid_safetensors_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)},
              str(path), {"note": "hi"})
    info = check_safetensors(path)
    assert info["a"].shape == (2, 3) and info["a"].dtype == "F32"
    assert info["b"].end - info["b"].start == 32
    tensors = load_safetensors(path)
    assert torch.equal(tensors["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(16, 16)}, str(good))
    cut = write(tmp_path / "cut.safetensors", good.read_bytes()[:-100])
    with pytest.raises(UnsafeInput, match=r"truncated: tensor 'w' ends at byte 1024 of the data section, "
                                          r"which has only 924 bytes"):
        load_safetensors(cut)
    tiny = write(tmp_path / "tiny.safetensors", b"\x10\x00")
    with pytest.raises(UnsafeInput, match="2 bytes is too short"):
        check_safetensors(tiny)
    short_header = write(tmp_path / "h.safetensors", good.read_bytes()[:20])
    with pytest.raises(UnsafeInput, match="truncated: header claims"):
        check_safetensors(short_header)


@pytest.mark.parametrize(("header", "data", "length", "message"), [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 2**40,
     "header of 1099511627776 bytes exceeds the cap"),
    ({"w": {"dtype": "OBJECT", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "dtype 'OBJECT' is not allowed"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     r"8 bytes do not hold shape \[3\] of F32"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "shape must be a list of at most 16 sizes >= 0"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
     "tensor 'b' overlaps another tensor"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 40, None,
     "data section is 40 bytes but the tensors cover 8"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}, b"\0" * 8, None,
     "expected dtype, shape and data_offsets"),
    ({"__metadata__": {"k": 5}}, b"", None, "__metadata__ must map strings to strings"),
])
def test_wrong_safetensors_header_is_refused(tmp_path: Path, header: dict[str, object], data: bytes,
                                             length: int | None, message: str) -> None:
    path = write(tmp_path / "bad.safetensors", raw_safetensors(header, data, length))
    with pytest.raises(UnsafeInput, match=message) as info:
        load_safetensors(path)
    assert isinstance(info.value, PermanentError)
    assert info.value.failure is FailureClass.INVALID_PARAMS
    assert str(info.value).startswith("unsafe or malformed input bad.safetensors: ")


def test_safetensors_header_that_is_not_json(tmp_path: Path) -> None:
    path = write(tmp_path / "x.safetensors", struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(UnsafeInput, match="header is not valid JSON"):
        check_safetensors(path)


# ---------------------------------------------------------------- pickles


def test_scan_pickle_refuses_code_execution_in_every_protocol(tmp_path: Path) -> None:
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(Payload(tmp_path / "m"), protocol=protocol)
        with pytest.raises(UnsafeInput, match=r"pickle imports (posix|os)\.system, which could run code"):
            scan_pickle(data, "x.pt", "")


def test_scan_pickle_accepts_torch_tensor_data() -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.float16)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        [pkl] = [n for n in z.namelist() if n.endswith(".pkl")]
        scan_pickle(z.read(pkl), "x.pt", pkl)


def test_scan_pickle_refuses_computed_global_names() -> None:
    # STACK_GLOBAL whose module name is built by a call, not pushed as a string
    via_call = (b"\x80\x04" + b"\x8c\x08builtins\x8c\x03str\x93" + b"\x8c\x02os\x85R"
                + b"\x8c\x06system\x93.")
    with pytest.raises(UnsafeInput, match=r"pickle imports builtins\.str"):
        scan_pickle(via_call, "x.pt", "")
    # the module name comes back from the memo where something other than a string was stored
    via_memo = b"\x80\x04\x8c\x02osN\x94" + b"0h\x00" + b"\x8c\x06system\x93."
    with pytest.raises(UnsafeInput, match="pickle imports a global whose name is computed"):
        scan_pickle(via_memo, "x.pt", "")


def test_load_weights_only_accepts_tensors_and_refuses_payloads(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4.0)}, good)
    assert torch.equal(load_weights_only(good)["w"], torch.arange(4.0))
    bad = tmp_path / "bad.pt"
    torch.save({"w": Payload(tmp_path / "pwned")}, bad)
    with pytest.raises(UnsafeInput, match=r"data\.pkl: pickle imports (posix|os)\.system"):
        load_weights_only(bad)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- .pt2 archives


@pytest.fixture(scope="module")
def pt2_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    program = torch.export.export(model, (torch.randn(2, 4),))
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(program, str(path))
    return path.read_bytes()


def rewrite(source: bytes, path: Path, change: dict[str, bytes | None]) -> Path:
    """Copy a zip, replacing (or with None: dropping) members whose name ends with a key."""
    with zipfile.ZipFile(io.BytesIO(source)) as src, zipfile.ZipFile(path, "w") as dst:
        names = src.namelist()
        for name in names:
            key = next((k for k in change if name.endswith(k)), None)
            if key is None:
                dst.writestr(name, src.read(name))
            elif change[key] is not None:
                dst.writestr(name, change[key])  # type: ignore[arg-type]
        root = names[0].split("/")[0]
        for key, value in change.items():
            if value is not None and not any(n.endswith(key) for n in names):
                dst.writestr(f"{root}/{key}", value)
    return path


def test_valid_pt2_loads_and_runs(tmp_path: Path, pt2_bytes: bytes) -> None:
    path = write(tmp_path / "ok.pt2", pt2_bytes)
    program = load_pt2(path)
    x = torch.randn(2, 4)
    assert program.module()(x).shape == (2, 3)


def pickled_sample_inputs(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(((Payload(marker),), {}), buf)
    return buf.getvalue()


def test_pickle_bearing_pt2_is_refused_and_would_otherwise_run_code(tmp_path: Path, pt2_bytes: bytes) -> None:
    marker = tmp_path / "pwned"
    evil = rewrite(pt2_bytes, tmp_path / "evil.pt2", {"data/sample_inputs/model.pt": pickled_sample_inputs(marker)})
    with pytest.raises(UnsafeInput, match=r"evil\.pt2: data/sample_inputs/model\.pt/.*data\.pkl: "
                                          r"pickle imports (posix|os)\.system, which could run code"):
        load_pt2(evil)
    assert not marker.exists()
    # The threat is real: torch.export.load alone falls back to weights_only=False and runs it.
    code = f"import torch\ntry:\n    torch.export.load({str(evil)!r})\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, check=False)
    assert marker.exists()


def test_pt2_with_pickled_weights_is_refused(tmp_path: Path, pt2_bytes: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(pt2_bytes)) as z:
        [name] = [n for n in z.namelist() if n.endswith("model_weights_config.json")]
        config = json.loads(z.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    path = rewrite(pt2_bytes, tmp_path / "w.pt2", {"model_weights_config.json": json.dumps(config).encode()})
    with pytest.raises(UnsafeInput, match=rf"'{first}' is stored as a pickle"):
        check_pt2(path)


def test_pt2_with_unexpected_members_is_refused(tmp_path: Path, pt2_bytes: bytes) -> None:
    path = rewrite(pt2_bytes, tmp_path / "so.pt2", {"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(UnsafeInput, match=r"unexpected archive member 'data/aotinductor/model/model\.so'"):
        check_pt2(path)
    legacy = rewrite(pt2_bytes, tmp_path / "legacy.pt2", {"data/weights/model.pt": None,
                                                          "models/model.pt": b"x"})
    with pytest.raises(UnsafeInput, match=r"unexpected archive member 'models/model\.pt'"):
        check_pt2(legacy)


def test_pt2_calling_non_aten_operators_is_refused(tmp_path: Path, pt2_bytes: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(pt2_bytes)) as z:
        [name] = [n for n in z.namelist() if n.endswith("models/model.json")]
        text = z.read(name).decode()
    assert "torch.ops.aten.relu.default" in text
    evil = text.replace("torch.ops.aten.relu.default", "torch.ops.myns.shell.default")
    path = rewrite(pt2_bytes, tmp_path / "op.pt2", {"models/model.json": evil.encode()})
    with pytest.raises(UnsafeInput, match=r"operator 'torch\.ops\.myns\.shell\.default' is not allowed"):
        check_pt2(path)


def test_files_that_are_not_pt2_archives(tmp_path: Path, pt2_bytes: bytes) -> None:
    with pytest.raises(UnsafeInput, match=r"not a torch\.export archive"):
        check_pt2(write(tmp_path / "a.pt2", b"hello"))
    with pytest.raises(UnsafeInput, match=r"(broken zip|not a torch\.export archive)"):
        check_pt2(write(tmp_path / "b.pt2", pt2_bytes[: len(pt2_bytes) // 2]))
    two_roots = rewrite(pt2_bytes, tmp_path / "c.pt2", {})
    with zipfile.ZipFile(two_roots, "a") as z:
        z.writestr("other/thing", b"x")
    with pytest.raises(UnsafeInput, match="exactly one top-level folder"):
        check_pt2(two_roots)
