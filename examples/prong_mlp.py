"""Natural Neural Networks: whiten an MLP, train it with PRONG + SGD, export a plain model.

natgrad.nn.whiten swaps every Linear for a WhitenedLinear computing a = V U (h − c) + d (same
function at first: U = I, c = 0). PRONG re-estimates c = mean(h) and U = (Λ + εI)^{-1/2} Eᵀ from
training inputs every `period` steps while keeping the network's function; SGD on (V, d) is
then K-FAC with G = I. natgrad.nn.unwhiten folds W = V U, b = d − W c back into plain layers.

    python examples/prong_mlp.py            # 10 epochs
    python examples/prong_mlp.py --tiny     # 2 epochs (what the tests run)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import load_digits
from natgrad.models import mlp


def train(whitened: bool, epochs: int) -> torch.nn.Module:
    data = load_digits(seed=0)
    torch.manual_seed(0)
    model = mlp((64, 64, 10))
    if whitened:
        model = natgrad.nn.whiten(model)  # in place; returns the model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prong = None
    if whitened:
        # `data` is re-iterated at every re-estimation: any iterable of batches works (a
        # shuffling DataLoader gives fresh samples). The first estimate happens right here.
        prong = natgrad.nn.PRONG(model, [data.x_train], period=20, num_samples=1000,
                                 epsilon=1e-2, optimizer=optimizer, optimizer_state="reset")
    name = "PRONG + SGD" if whitened else "SGD"
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(data.x_train))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
            if prong is not None:
                prong.step()  # after the optimizer: re-estimates every `period` calls
        with torch.no_grad():
            loss = F.cross_entropy(model(data.x_train), data.y_train).item()
            acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        print(f"{name:11s} epoch {epoch:2d}  train loss {loss:.4f}  test accuracy {acc:.3f}")
    if prong is not None:
        print(prong)
        print(f"re-estimations: {prong.reestimations}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="test-speed settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the models are tiny, and more "
                             "threads only cost on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = 2 if args.tiny or os.environ.get("NATGRAD_EXAMPLES_TINY") == "1" else 10
    train(False, epochs)
    model = train(True, epochs)

    x_test = load_digits(seed=0).x_test
    with torch.no_grad():
        before = model(x_test)
        plain = natgrad.nn.unwhiten(model)  # in place: WhitenedLinear → Linear
        after = plain(x_test)
    kinds = sorted({type(m).__name__ for m in plain.modules() if m is not plain})
    gap = (after - before).abs().max().item()
    print(f"exported modules: {', '.join(kinds)}; parameters: {list(plain.state_dict())}")
    print(f"exported model computes the same outputs: max |difference| = {gap:.2e}")
    if gap > 1e-4:
        raise SystemExit("unwhiten changed the network's function")


if __name__ == "__main__":
    main()
