"""A small CNN on the shapes data set, for `panal run-local` and `panal submit` (task: python).

run(params, ctx) is the whole contract: params are the manifest's params plus this task's sweep
point; ctx gives the device, thread budget, inputs, progress, checkpoints and outputs. It returns a
map of plain values (numbers, text, lists, maps): here the held-out accuracy `val_acc`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from shapes import make_shapes


def make_model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),             # 16 -> 8
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 8 -> 4
        nn.Flatten(), nn.Linear(2 * width * 16, 4),
    )


def load_data(params: dict, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    if "data" in ctx.inputs:                       # spec.inputs.data: a file made by shapes.py
        tensors = load_file(str(ctx.inputs["data"]))
        return tensors["x"], tensors["y"]
    return make_shapes(params.get("samples", 3000), seed=params.get("data_seed", 0))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x.to(device)).argmax(dim=1) == y.to(device)).float().mean())


def run(params: dict, ctx) -> dict:
    device = torch.device(ctx.device)
    seed, epochs, batch = params.get("seed", 0), params.get("epochs", 4), params.get("batch_size", 64)
    x, y = load_data(params, ctx)
    n_val = len(x) // 5                            # the last fifth is held out: never trained on
    x_train, y_train, x_val, y_val = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]

    torch.manual_seed(seed)
    model = make_model(params["width"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=0.9)
    start = 0
    if ctx.resume is not None:                     # a retry after an interruption: carry on
        state = load_file(str(ctx.resume))
        start = int(state.pop("epoch"))
        model.load_state_dict(state)
        ctx.log(f"resumed at epoch {start}")

    losses = []
    for epoch in range(start, epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x_train))
        ctx.progress((epoch + 1) / epochs)
        save_file({**model.state_dict(), "epoch": torch.tensor(epoch + 1)}, "checkpoint.safetensors")
        ctx.checkpoint("checkpoint.safetensors")   # (momentum restarts on resume: fine for a demo)

    ctx.output("model", model.state_dict())        # -> model.safetensors among the task's outputs
    return {"val_acc": accuracy(model, x_val, y_val, device),
            "train_acc": accuracy(model, x_train, y_train, device),
            "train_loss": losses[-1] if losses else None,
            "parameters": sum(p.numel() for p in model.parameters())}
