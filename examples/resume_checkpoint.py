"""Checkpoint and resume K-FAC: the resumed run equals the uninterrupted one, bit for bit.

KFAC.state_dict() holds torch's optimizer state (momentum, param groups with the current
damping) plus the Kronecker factors, their eigendecompositions, the step counter and the state
of the sampling generator, so a run can stop after any step and continue exactly.

    python examples/resume_checkpoint.py            # 60 steps, checkpoint after 25
    python examples/resume_checkpoint.py --tiny     # 12 steps, checkpoint after 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import load_digits
from natgrad.models import mlp


def build(seed: int) -> tuple[torch.nn.Module, natgrad.optim.KFAC]:
    torch.manual_seed(seed)
    model = mlp((64, 32, 10))
    # The Monte-Carlo Fisher samples ŷ with this generator; its state is checkpointed.
    optimizer = natgrad.optim.KFAC(model, lr=0.3, damping=3e-2, momentum=0.5, kl_clip=1e-3,
                                   inverse_update_period=4,
                                   generator=torch.Generator().manual_seed(seed))
    return model, optimizer


def run(steps: int, stop_at: int | None, folder: Path) -> torch.nn.Module:
    """Train for `steps` steps; if `stop_at`, save after that many, rebuild and resume."""
    data = load_digits(seed=0)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(1))
    batches = order.split(64)
    model, optimizer = build(seed=0)
    for step in range(steps):
        if step == stop_at:
            path = folder / "checkpoint.pt"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step}, path)
            model, optimizer = build(seed=123)  # a fresh process: other weights, other seed
            checkpoint = torch.load(path, weights_only=True)  # tensors and plain data only
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            print(f"saved after step {step}, resumed from {path.name}")
        idx = batches[step % len(batches)]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        optimizer.step()
    print(f"{'resumed' if stop_at is not None else 'uninterrupted'} run: "
          f"{steps} steps, last batch loss {loss.item():.4f}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="test-speed settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the models are tiny, and more "
                             "threads only cost on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = args.tiny or os.environ.get("NATGRAD_EXAMPLES_TINY") == "1"
    steps, stop_at = (12, 5) if tiny else (60, 25)
    with tempfile.TemporaryDirectory() as folder:
        straight = run(steps, None, Path(folder))
        resumed = run(steps, stop_at, Path(folder))
    same = all(torch.equal(a, b) for a, b in
               zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True))
    print(f"resumed run equals the uninterrupted run bitwise: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
