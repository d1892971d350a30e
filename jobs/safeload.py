"""The only way a kind reads a file that came over the network.

Safetensors files are checked against their header before a byte of tensor data is trusted: size
caps, a dtype whitelist, offsets that tile the data exactly (a truncated file is named as such).
``.pt2`` archives (``torch.export``) are loaded with ``torch.export.load``, which unpickles parts
of the archive and falls back to ``weights_only=False``; so every member is checked first: only the
archive's known files, no pickled weights or constants, no compiled code, only ``torch.ops.aten``/
``prims`` operators, and every embedded pickle may import only tensor-rebuilding globals.
Anything else raises :class:`UnsafeInput` naming the file and the reason. torch is imported lazily.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import FailureClass, PermanentError

__all__ = ["DTYPE_SIZES", "TensorInfo", "UnsafeInput", "check_pt2", "check_safetensors",
           "load_pt2", "load_safetensors", "load_weights_only", "read_metadata", "scan_pickle"]

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_FILE_BYTES = 64 * 1024**3
MAX_PT2_MEMBERS = 10_000
MAX_PT2_JSON_BYTES = 256 * 1024 * 1024

#: safetensors dtype -> bytes per element; anything else is refused.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}

# Globals an embedded pickle may import: what torch.save writes for plain tensors and containers.
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict"), ("torch", "Size"),
}
_STORAGE = re.compile(r"^[A-Z][A-Za-z0-9]*Storage$")
_TORCH_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}
_MEMO_PUT = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_NEUTRAL = {"FRAME", "PROTO"}
_FORBIDDEN_OPS = {"EXT1", "EXT2", "EXT4", "INST", "OBJ"}

# Files a torch.export archive may hold, under its one top-level folder.
_PT2_MEMBER = re.compile(
    r"^(?:archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/weights/[\w.-]+|data/constants/[\w.-]+"
    r"|data/sample_inputs/[\w.-]+\.pt)$")
_ALLOWED_TARGET = re.compile(r"^(?:torch\.ops\.(?:aten|prims)\.[\w.]+|_operator\.\w+|operator\.\w+)$")


class UnsafeInput(PermanentError):
    """An input file is malformed, too big or could run code; it is never retried."""

    failure = FailureClass.INVALID_PARAMS

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"unsafe or malformed input {Path(path).name}: {reason}")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def check_safetensors(path: Path, max_bytes: int = MAX_FILE_BYTES) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header against the file; return its tensors by name."""
    info, _ = _read_header(path, max_bytes)
    return info


def read_metadata(path: Path, max_bytes: int = MAX_FILE_BYTES) -> dict[str, str]:
    """The ``__metadata__`` map of a (validated) safetensors file."""
    return _read_header(path, max_bytes)[1]


def _read_header(path: Path, max_bytes: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UnsafeInput(path, f"truncated: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise UnsafeInput(path, f"safetensors header of {n} bytes exceeds the cap of "
                                        f"{MAX_HEADER_BYTES} bytes")
            if size > max_bytes:
                raise UnsafeInput(path, f"file of {size} bytes exceeds the cap of {max_bytes} bytes")
            if 8 + n > size:
                raise UnsafeInput(path, f"truncated: header claims {n} bytes but the file has "
                                        f"{size - 8} after the length prefix")
            raw = f.read(n)
    except OSError as exc:
        raise UnsafeInput(path, f"cannot read: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnsafeInput(path, f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise UnsafeInput(path, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise UnsafeInput(path, "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise UnsafeInput(path, f"{len(header)} tensors exceeds the cap of {MAX_TENSORS}")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_len)
    ranges = sorted((t.start, t.end, name) for name, t in tensors.items())
    end = 0
    for start, stop, name in ranges:
        if start != end:
            what = "overlaps another tensor" if start < end else "leaves a gap before it"
            raise UnsafeInput(path, f"tensor {name!r} {what} (offset {start}, expected {end})")
        end = stop
    if end != data_len:
        raise UnsafeInput(path, f"data section is {data_len} bytes but the tensors cover {end}")
    return tensors, dict(meta)


def _tensor_info(path: Path, name: str, entry: Any, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise UnsafeInput(path, f"tensor {name!r}: expected dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise UnsafeInput(path, f"tensor {name!r}: dtype {dtype!r} is not allowed "
                                f"(allowed: {', '.join(DTYPE_SIZES)})")
    if (not isinstance(shape, list) or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise UnsafeInput(path, f"tensor {name!r}: shape must be a list of at most 16 sizes >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise UnsafeInput(path, f"tensor {name!r}: data_offsets must be two integers")
    start, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= start <= end:
        raise UnsafeInput(path, f"tensor {name!r}: bad data_offsets {offsets}")
    if end > data_len:
        raise UnsafeInput(path, f"truncated: tensor {name!r} ends at byte {end} of the data section, "
                                f"which has only {data_len} bytes")
    if end - start != numel * DTYPE_SIZES[dtype]:
        raise UnsafeInput(path, f"tensor {name!r}: {end - start} bytes do not hold shape {shape} of {dtype}")
    return TensorInfo(dtype, tuple(shape), start, end)


def load_safetensors(path: Path, device: str = "cpu", max_bytes: int = MAX_FILE_BYTES) -> dict[str, Any]:
    """Check then load every tensor of a safetensors file onto ``device``."""
    check_safetensors(path, max_bytes)
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device=device))
    except Exception as exc:  # the Rust loader raises its own error types
        raise UnsafeInput(path, f"safetensors could not load it: {exc}") from exc


def load_weights_only(path: Path) -> Any:
    """The one allowed ``torch.load``: ``weights_only=True`` after the pickle scan."""
    data = _read_capped(path, MAX_FILE_BYTES)
    if zipfile.is_zipfile(io.BytesIO(data)):
        _scan_torch_zip(path, data, "")
    else:
        scan_pickle(data, path, "")
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise UnsafeInput(path, f"torch.load(weights_only=True) refused it: {exc}") from exc


def scan_pickle(data: bytes, path: Path | str, member: str) -> None:
    """Reject a pickle that imports any global outside the tensor-rebuilding allowlist.

    The names ``STACK_GLOBAL`` imports are taken from the two string pushes just before it (through
    the memo); any other shape is refused rather than guessed at.
    """
    where = f"{member}: " if member else ""
    memo: dict[int, str | None] = {}
    recent: list[str | None] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _FORBIDDEN_OPS:
                raise UnsafeInput(path, f"{where}pickle opcode {name} is not allowed")
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                _check_global(path, where, module, attr)
                recent = []
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or recent[-1] is None or recent[-2] is None:
                    raise UnsafeInput(path, f"{where}pickle imports a global whose name is computed")
                _check_global(path, where, recent[-2], recent[-1])
                recent = []
            elif name in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
            elif name in _MEMO_PUT:
                memo[arg if isinstance(arg, int) else len(memo)] = recent[-1] if recent else None
            elif name in _MEMO_GET:
                recent.append(memo.get(arg if isinstance(arg, int) else -1))
            elif name not in _NEUTRAL:
                recent = []
    except UnsafeInput:
        raise
    except Exception as exc:  # pickletools raises ValueError and friends on garbage
        raise UnsafeInput(path, f"{where}not a readable pickle: {exc}") from exc


def _check_global(path: Path | str, where: str, module: str, attr: str) -> None:
    if ((module, attr) in _SAFE_GLOBALS or (module == "torch" and _STORAGE.match(attr))
            or (module == "torch" and attr in _TORCH_DTYPES)):
        return
    raise UnsafeInput(path, f"{where}pickle imports {module}.{attr}, which could run code "
                            "(only tensor data is accepted)")


def _read_capped(path: Path, cap: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > cap:
            raise UnsafeInput(path, f"file of {size} bytes exceeds the cap of {cap} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise UnsafeInput(path, f"cannot read: {exc}") from exc


def _scan_torch_zip(path: Path | str, data: bytes, member: str) -> None:
    """Scan every pickle inside a torch.save zip (``data.pkl`` and friends)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            for info in inner.infolist():
                if info.filename.endswith(".pkl"):
                    scan_pickle(inner.read(info), path, f"{member}/{info.filename}".lstrip("/"))
    except zipfile.BadZipFile as exc:
        raise UnsafeInput(path, f"{member}: broken zip: {exc}") from exc


def check_pt2(path: Path, max_bytes: int = MAX_FILE_BYTES) -> None:
    """Refuse a ``.pt2`` archive that torch.export.load would unpickle code from."""
    if not zipfile.is_zipfile(path):
        raise UnsafeInput(path, "not a torch.export archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_PT2_MEMBERS:
                raise UnsafeInput(path, f"{len(infos)} archive members exceeds the cap of {MAX_PT2_MEMBERS}")
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise UnsafeInput(path, f"archive unpacks to {total} bytes, over the cap of {max_bytes}")
            roots = {i.filename.split("/", 1)[0] for i in infos}
            if len(roots) != 1:
                raise UnsafeInput(path, "a torch.export archive has exactly one top-level folder")
            names = {i.filename.split("/", 1)[1] if "/" in i.filename else "": i for i in infos}
            for rel in names:
                if not _PT2_MEMBER.match(rel):
                    raise UnsafeInput(path, f"unexpected archive member {rel!r} (legacy pickled weights, "
                                            "compiled code and extra files are refused)")
            if "archive_format" not in names or not any(r.startswith("models/") for r in names):
                raise UnsafeInput(path, "not a torch.export archive (no archive_format or models/)")
            for rel, info in names.items():
                if rel.endswith(".json"):
                    if info.file_size > MAX_PT2_JSON_BYTES:
                        raise UnsafeInput(path, f"{rel}: {info.file_size} bytes is over the JSON cap")
                    _check_pt2_json(path, rel, archive.read(info))
                elif rel.startswith("data/sample_inputs/"):
                    blob = archive.read(info)
                    if zipfile.is_zipfile(io.BytesIO(blob)):
                        _scan_torch_zip(path, blob, rel)
                    else:
                        scan_pickle(blob, path, rel)
    except zipfile.BadZipFile as exc:
        raise UnsafeInput(path, f"broken zip archive: {exc}") from exc


def _check_pt2_json(path: Path, rel: str, raw: bytes) -> None:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnsafeInput(path, f"{rel}: not valid JSON: {exc}") from exc
    if rel.startswith("data/"):  # payload configs: weights and constants
        config = doc.get("config") if isinstance(doc, dict) else None
        if not isinstance(config, dict):
            raise UnsafeInput(path, f"{rel}: expected a payload config")
        for fqn, meta in config.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                raise UnsafeInput(path, f"{rel}: {fqn!r} is stored as a pickle; only raw tensors are "
                                        "accepted (export plain tensor weights)")
            if not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                raise UnsafeInput(path, f"{rel}: {fqn!r} is a custom object, not a tensor")
        return
    for target in _targets(doc):
        if not _ALLOWED_TARGET.match(target):
            raise UnsafeInput(path, f"{rel}: operator {target!r} is not allowed (only torch.ops.aten "
                                    "and torch.ops.prims operators)")


def _targets(node: Any) -> list[str]:
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            target = item.get("target")
            if isinstance(target, str):
                found.append(target)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def load_pt2(path: Path, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Check then load a ``torch.export`` archive; return its ExportedProgram."""
    check_pt2(path, max_bytes)
    import torch

    try:
        # An open file, not the path: blob-cache files are named by digest, without the ``.pt2`` ending that
        # torch's loader otherwise warns about ("Unable to load package. f must be ... ending in .pt2") on
        # every task; a seekable file is what it accepts without a warning, and nothing else is hidden.
        with path.open("rb") as f:
            return torch.export.load(f)
    except Exception as exc:
        raise UnsafeInput(path, f"torch.export.load failed: {exc}") from exc
