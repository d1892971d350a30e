"""How long `panal results --merge` takes to join shard outputs, and what memory it needs.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_merge.py /tmp/merge-bench [--gib 2] [--shards 16]

Writes the shard files once (float32, 4096 columns), then merges them in a fresh process, so the
peak RSS printed is the merge's (the shards are not loaded: byte ranges are copied). Compare with
loading every shard and ``torch.cat`` (``--naive``), which holds the whole output in memory twice.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

COLS = 4096


def make(folder: Path, gib: float, shards: int) -> list[tuple[Path, int, int, str]]:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    per = int(gib * 2**30 / 4 / COLS) // shards
    parts = []
    for i in range(shards):
        path = folder / f"shard-{i}.safetensors"
        if not path.exists():
            save_file({"y": np.full((per, COLS), i, dtype=np.float32)}, str(path),
                      {"row_start": str(i * per), "row_end": str((i + 1) * per)})
        parts.append((path, i * per, (i + 1) * per, f"shard {i}"))
    return parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--naive", action="store_true")
    ap.add_argument("--merge-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    parts = make(args.folder, args.gib, args.shards)
    if not args.merge_only:   # measure in a fresh process: making the shards must not count
        extra = ["--naive"] if args.naive else []
        subprocess.run([sys.executable, __file__, str(args.folder), "--gib", str(args.gib), "--shards",
                        str(args.shards), "--merge-only", *extra], check=True)
        return
    start = time.perf_counter()
    dest = args.folder / "merged.safetensors"
    if args.naive:
        import torch
        from safetensors.torch import load_file, save_file

        save_file({"y": torch.cat([load_file(str(p))["y"] for p, *_ in parts])}, str(dest))
    else:
        from agent.client.merge import merge_safetensors

        merge_safetensors(parts, dest)
    seconds = time.perf_counter() - start
    size = dest.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'naive torch.cat' if args.naive else 'merge_safetensors'}: {size / 2**30:.2f} GiB from "
          f"{len(parts)} shards in {seconds:.2f} s ({size / 2**20 / seconds:.0f} MiB/s), peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
