"""``python``: run the submitter's own code, ``run(params, ctx)`` from a signed, hash-checked code bundle.

The bundle is input ``code`` (jobs/code_bundle.py: a reproducible tar naming its entry point). The
kind unpacks it into the task's work dir, compiles every ``.py`` file without running any (a syntax
error or a missing entry point is ``invalid_params`` before the code runs), imports the entry
module from there and calls ``function(params, ctx)`` with a :class:`~jobs.code_context.CodeContext`.
The returned map (JSON-like, bounded) becomes the result's values; ``ctx.output`` files its outputs.

``sandboxed = True``: the agent runs this kind only in an OS sandbox (agent/engine/sandbox.py).
Nothing here contains hostile code; this module only keeps honest mistakes clear and classified:
a module the agent lacks is ``unsupported`` (another agent may have it), an exception of the
code is the submitter's fault (``invalid_params``, failed once a second agent agrees), running out
of memory stays ``oom``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from jobs.code_bundle import check_tree, parse_entry, unpack
from jobs.code_context import CodeContext
from jobs.compare import CompareSpec
from jobs.errors import FailureClass, InvalidParams, PermanentError
from jobs.jsonlike import jsonlike_problem
from jobs.kinds.base import Cost, Kind, KindOutput, Param, RunContext
from security.errors import BadRequest

__all__ = ["CodeFault", "MissingModule", "PythonCode", "run_code"]

#: free-form params: bounded like a manifest's other fields, small enough to sign and store per task
MAX_PARAMS_BYTES = 65_536
#: what the returned values may weigh: they are signed, stored and compared on the board
MAX_VALUES_BYTES = 1 << 20
#: the cost estimate of a task of unknown code (see PythonCode.estimate)
NOMINAL_SECONDS = 60.0
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class CodeFault(PermanentError):
    """The submitted code failed in a way another agent would reproduce (its exception, a bad return)."""

    failure = FailureClass.INVALID_PARAMS


class MissingModule(PermanentError):
    """The code imports a module this agent lacks; another agent may have it."""

    failure = FailureClass.UNSUPPORTED


def _param_name_ok(key: object) -> bool:
    return (isinstance(key, str) and 0 < len(key) <= 64 and not key[0].isdigit()
            and set(key) <= _NAME_CHARS)


@dataclass(frozen=True)
class FreeParam(Param):
    """A free-form parameter: any JSON-like value (jobs/jsonlike.py bounds it)."""

    def check(self, name: str, value: Any) -> str | None:
        problem = jsonlike_problem(value, name, max_depth=8)
        return None if problem is None else f"{problem[0]}: {problem[1]}"

    def schema(self) -> dict[str, Any]:
        return {}


_FREE = FreeParam(object, None, doc="any JSON-like value, passed to run(params, ctx) as given")


class OpenParams(Mapping[str, Param]):
    """Every identifier-like name is a parameter (a free one): the code, not the catalog, defines them.

    Lets sweeps over any name pass the manifest's checks (``name in kind.params``) unchanged.
    """

    def __getitem__(self, key: str) -> Param:
        if _param_name_ok(key):
            return _FREE
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class OpenInputs(Mapping[str, bool]):
    """Input ``code`` (required) and any other input name the manifest lists (optional): the code knows
    what it reads. ``checkpoint`` stays the engine's (a resumed task's checkpoint, ``ctx.resume``)."""

    def __getitem__(self, key: str) -> bool:
        if key == "code":
            return True
        if key != "checkpoint" and isinstance(key, str) and key.islower() and _param_name_ok(key):
            return False
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("code",))

    def __len__(self) -> int:
        return 1


class PythonCode(Kind):
    #: metrics of training code differ in the last bits across CPUs, BLAS builds and GPUs (TF32 in
    #: convolutions) and training amplifies it: within 1e-2, as for mlp_train; a manifest may say
    #: compare: exact (deterministic code) or none (nothing comparable returned)
    compare = CompareSpec("tolerant", tolerance=1e-2, tf32=True)
    name = "python"
    summary = "run your own PyTorch code: run(params, ctx) from a signed code bundle (spec.code)"
    sandboxed: ClassVar[bool] = True
    inputs: ClassVar[Mapping[str, bool]] = OpenInputs()
    params: ClassVar[Mapping[str, Param]] = OpenParams()

    def validate(self, params: Mapping[str, Any], prefix: str = "spec.params") -> dict[str, Any]:
        """Free-form, but bounded: identifier-like names, JSON-like values, at most 64 KiB in all."""
        if not isinstance(params, Mapping):
            raise InvalidParams([(prefix, f"expected a map, got {params!r}")])
        errors = [(f"{prefix}.{key}", "parameter names are letters, digits and _ (not first a digit), "
                                      "at most 64") for key in params if not _param_name_ok(key)]
        problem = jsonlike_problem(dict(params), prefix, max_depth=9)
        if problem is not None:
            errors.append(problem)
        if not errors and len(json.dumps(dict(params), default=str)) > MAX_PARAMS_BYTES:
            errors.append((prefix, f"params are over {MAX_PARAMS_BYTES // 1024} KiB as JSON; "
                                   "ship data as spec.inputs"))
        if errors:
            raise InvalidParams(errors)
        return dict(params)

    def estimate(self, params: Mapping[str, Any]) -> Cost:
        """Unknown code has no FLOP count: a nominal minute, which the board's predictor corrects per
        agent from observed runtimes (hub/dispatch/predict.py) and which credits each task alike."""
        return Cost(seconds=NOMINAL_SECONDS)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                "description": "free-form: passed to run(params, ctx) as given"}

    def run(self, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
        bundle = ctx.inputs.get("code")
        if bundle is None:
            raise InvalidParams([("spec.code", "a python job needs its code (spec.code)")])
        return run_code(bundle, params, ctx)


def run_code(bundle: Path, params: Mapping[str, Any], ctx: RunContext) -> KindOutput:
    """Unpack, check, import and run the bundle's entry point (what the kind and ``run-local`` share)."""
    root = ctx.workdir / "code"
    shutil.rmtree(root, ignore_errors=True)
    try:
        entry, names = unpack(bundle, root)
    except BadRequest as exc:
        raise InvalidParams([("spec.code", exc.message)]) from exc
    problems = check_tree(root, entry, names)
    if problems:
        raise InvalidParams([("spec.code", str(p)) for p in problems])
    module_name, function = parse_entry(entry)
    rundir = ctx.workdir / "run"
    rundir.mkdir(parents=True, exist_ok=True)
    code_ctx = CodeContext(ctx, rundir)
    started = time.perf_counter()
    with _bundle_modules(root, names), _cwd(rundir):
        try:
            func = getattr(importlib.import_module(module_name), function, None)
            if not callable(func):
                raise CodeFault(f"{entry}: {function} is not a function")
            values = func(dict(params), code_ctx)
        except (PermanentError, MemoryError):
            raise
        except ModuleNotFoundError as exc:
            raise MissingModule(f"the code imports module {exc.name!r}, which this agent does not have"
                                f"{_where(exc, root)}; name it in requires or ship it in the code") from exc
        except SystemExit as exc:
            raise CodeFault(f"the code called sys.exit({exc.code!r}){_where(exc, root)}; "
                            "return a map of values instead") from exc
        except Exception as exc:
            if _is_oom(exc):
                raise
            raise CodeFault(f"{type(exc).__name__}: {str(exc)[:1000]}{_where(exc, root)}") from exc
    seconds = time.perf_counter() - started
    if not isinstance(values, Mapping):
        raise CodeFault(f"{entry} returned {type(values).__name__}; it must return a map of values "
                        "(e.g. {'val_acc': 0.93})")
    problem = jsonlike_problem(dict(values), "values")
    if problem is not None:
        raise CodeFault(f"{entry} returned a value that is not JSON-like: {problem[0]}: {problem[1]}")
    if len(json.dumps(dict(values))) > MAX_VALUES_BYTES:
        raise CodeFault(f"{entry} returned over {MAX_VALUES_BYTES // 2**20} MiB of values; "
                        "write large results with ctx.output")
    code_ctx.progress(1.0)
    return KindOutput(values=dict(values), metrics={"seconds": seconds}, files=dict(code_ctx.outputs),
                      notes=code_ctx.log_lines)


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def _where(exc: BaseException, root: Path) -> str:
    """`` (at train.py:12 in run)``: the innermost frames of the submitted code in a traceback."""
    base = str(root.resolve())
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(base)]
    if isinstance(exc, SyntaxError) and exc.filename and exc.filename.startswith(base):
        return f" (at {os.path.relpath(exc.filename, base)}:{exc.lineno})"
    if not frames:
        return ""
    shown = [f"{os.path.relpath(f.filename, base)}:{f.lineno} in {f.name}" for f in frames[-3:]]
    return " (at " + " <- ".join(reversed(shown)) + ")"


def _top_names(names: list[str]) -> set[str]:
    """Top-level module names the bundle provides (``train.py`` -> train, ``pkg/x.py`` -> pkg)."""
    return {n.split("/", 1)[0].removesuffix(".py") for n in names if n.endswith(".py")}


@contextlib.contextmanager
def _bundle_modules(root: Path, names: list[str]) -> Iterator[None]:
    """Import from ``root`` first, and leave the (warm, reused) worker as it was afterwards: modules
    of the same names loaded before (another job's ``train``, even one of the agent's) are set aside
    for the run and put back, and the bundle's own modules are forgotten."""
    tops = _top_names(names)

    def ours(key: str) -> bool:
        return key.split(".", 1)[0] in tops

    stash = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
    path = str(root.resolve())
    sys.path.insert(0, path)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(path)
        for key in [k for k in sys.modules if ours(k) or str(getattr(sys.modules[k], "__file__", "") or "")
                    .startswith(path)]:
            sys.modules.pop(key, None)
        sys.modules.update(stash)
        importlib.invalidate_caches()


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
