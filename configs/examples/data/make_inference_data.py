"""Make the small model and inputs that ``configs/examples/inference.yaml`` runs.

    .venv/bin/python configs/examples/data/make_inference_data.py

Writes ``model.pt2`` (a torch.export archive of a tiny MLP with a dynamic batch dimension) and
``inputs.safetensors`` (tensor ``x``: 64 rows of 8 features) beside this script. Deterministic:
the same torch version writes the same tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROWS, FEATURES, HIDDEN, CLASSES = 64, 8, 16, 3


def make(out: Path = HERE) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    example = torch.randn(4, FEATURES, generator=gen)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    model_path, data_path = out / "model.pt2", out / "inputs.safetensors"
    torch.export.save(program, str(model_path))
    save_file({"x": torch.randn(ROWS, FEATURES, generator=gen)}, str(data_path))
    return model_path, data_path


if __name__ == "__main__":
    for path in make(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
