"""Your own model and data, trained and analysed by the ``natgrad`` command line.

The command line needs two functions (natgrad.cli.user_code states the contract):

- a model factory, ``model() -> nn.Module``, whose output is what the likelihood expects
  (here: logits of a categorical distribution);
- a data factory, ``data() -> (train, test, likelihood)``; train and test may be tensor pairs,
  map-style Datasets of (input, target) pairs (as here) or DataLoaders.

Use them from the shell (run from the repository root, or give the file's path):

    natgrad train   --model examples/user_model.py:model --data examples/user_model.py:data \\
                    --optimizer kfac --steps 300 --out runs/spirals-kfac
    natgrad compare --model examples/user_model.py:model --data examples/user_model.py:data \\
                    --optimizers sgd,adam,kfac --out runs/spirals
    natgrad fisher  --checkpoint runs/spirals-kfac

``python examples/user_model.py [--tiny]`` runs the first and the last of these in a temporary
folder and prints what they report.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


class Spirals(Dataset):
    """Three interleaved 2-D spirals with a little noise: (point, arm) pairs."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        arm = torch.randint(0, 3, (size,), generator=g)
        r = torch.rand(size, generator=g)
        angle = 3.0 * r + arm * (2 * math.pi / 3)
        noise = 0.05 * torch.randn(size, 2, generator=g)
        self.x = torch.stack([r * angle.cos(), r * angle.sin()], dim=1) + noise
        self.y = arm

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def model() -> nn.Module:
    """The model factory: a small tanh MLP giving 3 logits."""
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 3))


def data() -> tuple[Dataset, Dataset, str]:
    """The data factory: (train, test, likelihood)."""
    return Spirals(1500, seed=0), Spirals(500, seed=1), "categorical"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is tiny)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from natgrad.cli.main import main as natgrad

    here = Path(__file__).resolve()
    spec = ["--model", f"{here}:model", "--data", f"{here}:data"]
    steps = "40" if args.tiny else "400"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spirals-kfac"
        status = natgrad(["train", *spec, "--optimizer", "kfac", "--steps", steps,
                          "--eval-every", "20", "--batch-size", "50", "--threads", "1",
                          "--device", "cpu", "--out", str(out)])
        if status:
            return status
        return natgrad(["fisher", "--checkpoint", str(out), "--examples", "50",
                        "--threads", "1", "--device", "cpu"])


if __name__ == "__main__":
    sys.exit(main())
