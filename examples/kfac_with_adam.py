"""K-FAC as a preconditioner in front of torch.optim.Adam (or any torch optimizer).

After loss.backward(), KFACPreconditioner.step() replaces each Linear/Conv2d layer's gradient
by (G ⊗ Ā + δI)⁻¹ ∇L; the base optimizer then steps on the rewritten gradients, so schedulers,
gradient clipping and weight decay work as usual. Compared here with plain Adam on the digits.

    python examples/kfac_with_adam.py            # 10 epochs
    python examples/kfac_with_adam.py --tiny     # 2 epochs (what the tests run)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import load_digits
from natgrad.models import mlp


def train(use_kfac: bool, epochs: int) -> float:
    data = load_digits(seed=0)
    torch.manual_seed(0)
    model = mlp((64, 64, 10))
    preconditioner = None
    if use_kfac:
        # Construct it before the first forward pass: its hooks record ā and g from then on.
        preconditioner = natgrad.optim.KFACPreconditioner(
            model, damping=0.1, likelihood="categorical", inverse_update_period=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    name = "K-FAC + Adam" if use_kfac else "Adam"
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(data.x_train))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            if preconditioner is not None:
                preconditioner.step()  # .grad ← (F̂ + δI)⁻¹ .grad; False if it skipped
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            loss = F.cross_entropy(model(data.x_train), data.y_train).item()
            acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        print(f"{name:12s} epoch {epoch:2d}  train loss {loss:.4f}  test accuracy {acc:.3f}")
    if preconditioner is not None:
        print(preconditioner)  # which layers are preconditioned, and how
        preconditioner.close()  # remove the hooks when done
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="test-speed settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the models are tiny, and more "
                             "threads only cost on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = 2 if args.tiny or os.environ.get("NATGRAD_EXAMPLES_TINY") == "1" else 10
    with_kfac, plain = train(True, epochs), train(False, epochs)
    print(f"final train loss: K-FAC + Adam {with_kfac:.4f}, Adam {plain:.4f}")


if __name__ == "__main__":
    main()
