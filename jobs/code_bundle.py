"""Code bundles of the ``python`` kind: a file or folder packed into a reproducible tar, checked, unpacked.

A bundle is an uncompressed tar whose members are regular files only, in sorted order, with mtime 0,
uid/gid 0, mode 0644 and no owner names, so the same tree always packs to the same bytes (and hence
the same blob digest: a re-submitted job reuses the blob a board already has). Its entry point
(``module:function``) travels inside it as :data:`ENTRY_FILE`, so the params a user sweeps stay
exactly the user's and the entry is covered by the digest the submitter signs.

Checks happen twice: ``panal validate``/``submit`` compile every ``.py`` file and look for the
entry before anything is uploaded (naming file and line), and the agent repeats them after the
hash-checked bundle is unpacked, before any of its code is imported.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from security.errors import BadRequest

__all__ = ["DEFAULT_FUNCTION", "ENTRY_FILE", "ENTRY_PATTERN", "MAX_BUNDLE_BYTES", "MAX_FILES", "CodeProblem",
           "check_tree", "default_entry", "pack", "parse_entry", "unpack"]

#: the member holding ``{"entry": "module:function"}``; a file of that name in the user's tree is left out
ENTRY_FILE = "panal-bundle.json"
DEFAULT_FUNCTION = "run"
#: a bundle carries code and small assets; data sets travel as inputs (sharded, cached by digest)
MAX_BUNDLE_BYTES = 32 * 2**20
MAX_FILES = 2000
#: folders and files never packed: caches and version control, not code
SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".venv", ".mypy_cache", ".pytest_cache",
                          ".ruff_cache", ".ipynb_checkpoints"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
ENTRY_PATTERN = re.compile(rf"^({_IDENT}(?:\.{_IDENT})*):({_IDENT})$")


@dataclass(frozen=True)
class CodeProblem:
    """Something wrong with submitted code, at ``file:line`` (line 0: the file as a whole)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


def parse_entry(entry: str) -> tuple[str, str]:
    """``"pkg.module:function"`` -> ``("pkg.module", "function")``; BadRequest on anything else."""
    m = ENTRY_PATTERN.match(entry) if isinstance(entry, str) else None
    if m is None:
        raise BadRequest(f"entry point must look like module:function (e.g. train:run), got {entry!r}",
                         code="invalid_params")
    return m.group(1), m.group(2)


def default_entry(source: Path) -> str:
    """A file ``train.py`` runs ``train:run``; a folder runs ``main:run`` (``spec.code.entry`` overrides)."""
    module = source.stem if source.is_file() else "main"
    return f"{module}:{DEFAULT_FUNCTION}"


def _files(source: Path) -> list[tuple[str, Path]]:
    """(archive name, path) of every file to pack, sorted by name; BadRequest on links and oversize trees."""
    if source.is_file():
        return [(source.name, source)]
    found: list[tuple[str, Path]] = []
    stack = [source]
    while stack:
        folder = stack.pop()
        for path in folder.iterdir():
            rel = path.relative_to(source).as_posix()
            if path.is_symlink():
                raise BadRequest(f"{path}: a bundle holds no links (copy the file in, or ship it as an input)",
                                 code="invalid_code")
            if path.is_dir():
                if path.name not in SKIPPED_DIRS:
                    stack.append(path)
            elif path.is_file():
                if not path.name.endswith(SKIPPED_SUFFIXES) and rel != ENTRY_FILE:
                    found.append((rel, path))
            else:
                raise BadRequest(f"{path}: not a regular file", code="invalid_code")
            if len(found) > MAX_FILES:
                raise BadRequest(f"{source}: more than {MAX_FILES} files to pack; ship data as inputs",
                                 code="invalid_code")
    return sorted(found)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info


def pack(source: Path, entry: str) -> bytes:
    """The reproducible tar of ``source`` (a file or a folder) with ``entry``; BadRequest over the caps."""
    parse_entry(entry)
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in _files(source):
            data = path.read_bytes()
            total += len(data)
            if total > MAX_BUNDLE_BYTES:
                raise BadRequest(f"{source}: the code is over {MAX_BUNDLE_BYTES // 2**20} MiB (at {name}); "
                                 "ship data sets and weights as spec.inputs, not in the code", code="invalid_code")
            tar.addfile(_member(name, len(data)), io.BytesIO(data))
        meta = json.dumps({"entry": entry, "format": 1}, sort_keys=True).encode()
        tar.addfile(_member(ENTRY_FILE, len(meta)), io.BytesIO(meta))
    return buf.getvalue()


def check_tree(root: Path, entry: str, files: list[str] | None = None) -> list[CodeProblem]:
    """Compile (never run) every ``.py`` file under ``root`` and find the entry point's function.

    ``files`` are the archive names to check (default: what :func:`pack` would pack); names in
    problems are relative to ``root`` (or the file's name when ``root`` is a single file).
    """
    single = root.is_file()
    base = root.parent if single else root
    names = [root.name] if single else (files if files is not None else [n for n, _ in _files(root)])
    problems: list[CodeProblem] = []
    trees: dict[str, ast.Module] = {}
    for name in names:
        if not name.endswith(".py"):
            continue
        try:
            text = (base / name).read_bytes()
            tree = ast.parse(text, filename=name)
            compile(tree, name, "exec", dont_inherit=True)
        except SyntaxError as exc:
            problems.append(CodeProblem(name, exc.lineno or 0, f"syntax error: {exc.msg}"))
            continue
        except (ValueError, OSError) as exc:  # null bytes, unreadable
            problems.append(CodeProblem(name, 0, f"cannot compile: {exc}"))
            continue
        trees[name] = tree
    try:
        module, function = parse_entry(entry)
    except BadRequest as exc:
        return [*problems, CodeProblem("entry", 0, exc.message)]
    stem = module.replace(".", "/")
    candidates = [f"{stem}.py", f"{stem}/__init__.py"]
    found = next((c for c in candidates if c in names), None)
    if found is None:
        have = ", ".join(sorted(n for n in names if n.endswith(".py"))[:8]) or "no .py files"
        problems.append(CodeProblem(candidates[0], 0, f"entry module {module!r} is not in the code "
                                                      f"(it holds {have}); set spec.code.entry"))
    elif found in trees and function not in _top_level_names(trees[found]):
        problems.append(CodeProblem(found, 0, f"entry function {function!r} is not defined at the top level "
                                              f"(expected def {function}(params, ctx))"))
    return problems


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If | ast.Try):  # `if TYPE_CHECKING`, `try: import x except ...`: be lenient
            inner = ast.Module(body=[*node.body, *getattr(node, "orelse", [])], type_ignores=[])
            names |= _top_level_names(inner)
    return names


def unpack(bundle: Path, dest: Path) -> tuple[str, list[str]]:
    """Extract a (hash-checked) bundle into ``dest``; return its entry point and member names.

    Refuses, before extracting anything, members that are not regular files or folders (links,
    devices), absolute names, ``..`` and a bundle over the size caps; extraction also goes through
    tarfile's ``data`` filter as a second line.
    """
    try:
        with tarfile.open(bundle, mode="r:") as tar:
            members = tar.getmembers()
            total = 0
            for m in members:
                pure = PurePosixPath(m.name)
                if pure.is_absolute() or ".." in pure.parts or not (m.isfile() or m.isdir()):
                    raise BadRequest(f"code bundle member {m.name!r} is not a plain relative file",
                                     code="invalid_params")
                total += m.size
            if total > MAX_BUNDLE_BYTES or len(members) > MAX_FILES + 1:
                raise BadRequest(f"code bundle is over {MAX_BUNDLE_BYTES // 2**20} MiB or {MAX_FILES} files",
                                 code="invalid_params")
            names = [m.name for m in members if m.isfile()]
            if ENTRY_FILE not in names:
                raise BadRequest(f"code bundle has no {ENTRY_FILE} (pack it with panal submit/run-local)",
                                 code="invalid_params")
            tar.extractall(dest, filter="data")
    except tarfile.TarError as exc:
        raise BadRequest(f"code bundle is not a readable tar: {exc}", code="invalid_params") from exc
    try:
        meta = json.loads((dest / ENTRY_FILE).read_text(encoding="utf-8"))
        entry = meta["entry"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadRequest(f"code bundle's {ENTRY_FILE} is unreadable: {exc}", code="invalid_params") from exc
    parse_entry(entry)
    return str(entry), [n for n in names if n != ENTRY_FILE]
