"""K-FAC in a plain PyTorch training loop on the 8×8 digits, next to SGD with momentum.

natgrad.optim.KFAC is a torch.optim.Optimizer: the loop is the usual zero_grad / forward /
backward / step. Its hooks capture the layer inputs ā and the output gradients g during the
forward pass, so nothing else changes.

    python examples/kfac_training_loop.py            # 15 epochs, ~10 s on a laptop CPU
    python examples/kfac_training_loop.py --tiny     # 2 epochs (what the tests run)
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import load_digits
from natgrad.models import mlp


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, without gradients (so K-FAC's hooks stay idle)."""
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(name: str, epochs: int, batch_size: int) -> float:
    data = load_digits(seed=0)
    torch.manual_seed(0)  # the same initial weights and batch order for both optimizers
    model = mlp((64, 64, 10))
    if name == "K-FAC":
        # kl_clip bounds the step's predicted KL change: without it the first steps, taken
        # with a tiny curvature at initialisation, can throw the network far away.
        optimizer = natgrad.optim.KFAC(model, lr=0.3, damping=3e-2, likelihood="categorical",
                                       momentum=0.5, kl_clip=1e-3, inverse_update_period=10)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(data.x_train))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
        train_loss, _ = evaluate(model, data.x_train, data.y_train)
        _, test_acc = evaluate(model, data.x_test, data.y_test)
        print(f"{name:5s} epoch {epoch:2d}  train loss {train_loss:.4f}  "
              f"test accuracy {test_acc:.3f}")
    print(f"{name:5s} {time.perf_counter() - start:.1f} s for {epochs} epochs")
    return train_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="test-speed settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the models are tiny, and more "
                             "threads only cost on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = args.tiny or os.environ.get("NATGRAD_EXAMPLES_TINY") == "1"
    epochs = 2 if tiny else 15
    losses = {name: train(name, epochs, batch_size=64) for name in ("K-FAC", "SGD")}
    print(f"final train loss: K-FAC {losses['K-FAC']:.4f}, SGD {losses['SGD']:.4f}")


if __name__ == "__main__":
    main()
