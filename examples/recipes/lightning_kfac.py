"""natgrad's K-FAC in PyTorch Lightning: return it from ``configure_optimizers``.

K-FAC takes the network (``self.net``, which returns the logits), so build it inside
``configure_optimizers``; Lightning's automatic optimization then runs forward, ``backward`` and
``optimizer.step(closure)`` as for any torch optimizer, and K-FAC's hooks see each training
forward pass of ``self.net``. Validation runs without gradients and records nothing.

    python examples/recipes/lightning_kfac.py [--tiny]
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from natgrad.optim import KFAC


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return KFAC(self.net, lr=0.1, damping=0.1, likelihood="categorical", momentum=0.9)


def blobs(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])
    return TensorDataset(centres[y] + 0.3 * torch.randn(n, 2, generator=g), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    model = Classifier()
    data = blobs(1024, 0)
    x, y = data.tensors
    before = F.cross_entropy(model.net(x), y).item()
    trainer = L.Trainer(max_steps=30 if args.tiny else 300, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))
    kfac = trainer.optimizers[0]
    with torch.no_grad():
        after = F.cross_entropy(model.net(x), y).item()
    print(f"K-FAC in Lightning: {trainer.global_step} steps, train loss {before:.4f} -> "
          f"{after:.4f}; curvature updates: {kfac.preconditioner.curvature.steps}")


if __name__ == "__main__":
    main()
