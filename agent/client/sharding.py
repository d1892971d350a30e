"""At submit: a row-sharded input becomes one blob per shard, so each agent downloads only its rows.

``data: {path: x.safetensors, shard: {by: rows, count: N}}`` is split here into N files by byte ranges
(:func:`jobs.shardfiles.split_rows`, streamed), in a scratch folder removed when the process ends;
``data: {paths: ["part-*.safetensors"]}`` names files that already are the shards (globs expanded and
sorted), uploaded as they are. Either way the manifest to sign lists every shard's digest, size and
row count in row order (jobs/inputs.py), and the files go up like any other input.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from pathlib import Path

from agent.client.blobcache import hash_file
from jobs.inputs import InputRef, ShardRef, expand_paths
from jobs.kinds.inference import shard_rows
from jobs.shardfiles import file_rows, split_rows

__all__ = ["shard_input"]


def shard_input(ref: InputRef, base_dir: Path, scratch: Path | None = None) -> tuple[InputRef, list[tuple[str, Path]]]:
    """``ref`` as uploaded shard blobs, and the (sha256, file) pairs to upload for it."""
    if ref.paths is not None:
        files = expand_paths(ref.paths, base_dir)
        shards, uploads = [], []
        for path in files:
            sha, size = hash_file(path)
            shards.append(ShardRef(sha, size, file_rows(path)))
            uploads.append((sha, path))
        label = ref.paths[0] if len(ref.paths) == 1 else ", ".join(ref.paths)
    else:
        assert ref.path is not None and ref.shard_count is not None
        path = base_dir / ref.path
        total = file_rows(path)
        bounds = [shard_rows(total, ref.shard_count, i) for i in range(ref.shard_count)]
        written = split_rows(path, bounds, scratch or _scratch())
        shards = [ShardRef(s.sha256, s.size, s.end - s.start) for s in written]
        uploads = [(s.sha256, s.path) for s in written]
        label = Path(ref.path).name
    done = dataclasses.replace(ref, path=None, paths=None, blob=None, size=None, label=label,
                               rows=sum(s.rows for s in shards), shard_count=len(shards), shards=tuple(shards))
    return done, uploads


_SCRATCH: list[Path] = []


def _scratch() -> Path:
    """One folder per process for split shards (they are needed until uploaded), removed at exit."""
    if not _SCRATCH:
        path = Path(tempfile.mkdtemp(prefix="panal-shards-"))
        atexit.register(shutil.rmtree, path, True)
        _SCRATCH.append(path)
    return _SCRATCH[0]
