"""A small, real image data set made by a script: 16x16 grey images of four shapes, labelled.

Squares, discs, triangles and crosses of random size and position, with random brightness and
pixel noise, so a classifier has to learn shape rather than position or intensity. The same seed
gives the same images on every machine (only torch's seeded generator is used).

    python shapes.py shapes.safetensors 4000     # write it as a file, to ship as spec.inputs.data
"""

from __future__ import annotations

import sys

import torch

CLASSES = ("square", "disc", "triangle", "cross")
SIZE = 16


def make_shapes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (float32, n x 1 x 16 x 16, values 0..1) and their labels (int64, 0..3)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=gen)
    half = torch.randint(3, 7, (n,), generator=gen).float()                   # half the shape's width
    cy = torch.rand(n, generator=gen) * (SIZE - 2 * half) + half - 0.5          # centre, shape inside
    cx = torch.rand(n, generator=gen) * (SIZE - 2 * half) + half - 0.5
    bright = 0.5 + 0.5 * torch.rand(n, generator=gen)
    ys = torch.arange(SIZE).float().view(1, SIZE, 1)
    xs = torch.arange(SIZE).float().view(1, 1, SIZE)
    dy = ys - cy.view(n, 1, 1)
    dx = xs - cx.view(n, 1, 1)
    h = half.view(n, 1, 1)
    square = (dy.abs() <= h) & (dx.abs() <= h)
    disc = dy**2 + dx**2 <= h**2
    triangle = (dy.abs() <= h) & (dx.abs() <= (dy + h) / 2)                     # apex up, base down
    cross = ((dy.abs() <= h / 3) & (dx.abs() <= h)) | ((dx.abs() <= h / 3) & (dy.abs() <= h))
    masks = torch.stack([square, disc, triangle, cross], dim=1)                  # n x 4 x H x W
    shape = masks[torch.arange(n), labels].float()
    noise = 0.15 * torch.randn(n, SIZE, SIZE, generator=gen)
    images = (shape * bright.view(n, 1, 1) + noise).clamp(0.0, 1.0)
    return images.unsqueeze(1), labels


if __name__ == "__main__":
    from safetensors.torch import save_file

    path, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4000
    x, y = make_shapes(count)
    save_file({"x": x, "y": y}, path)
    print(f"wrote {count} images of {', '.join(CLASSES)} to {path}")
