"""The Fisher of a small network in every structure natgrad offers, against the exact one.

For a tanh MLP on the digits, in float64: the exact ("true") dense Fisher F, then per structure
the relative Frobenius error ‖F̂ − F‖ / ‖F‖, the same error restricted to the layers' diagonal
blocks (what K-FAC and EK-FAC approximate), and how well the damped natural-gradient direction
(F̂ + δI)⁻¹ g points along the exact (F + δI)⁻¹ g (cosine). Then the Monte-Carlo and empirical
Fisher against the true one.

    python examples/fisher_structures.py            # 64-16-10 MLP, 512 examples
    python examples/fisher_structures.py --tiny     # 64-8-10 MLP, 64 examples
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import natgrad
from natgrad.data import load_digits
from natgrad.models import mlp

DAMPING = 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="test-speed settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the models are tiny, and more "
                             "threads only cost on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = args.tiny or os.environ.get("NATGRAD_EXAMPLES_TINY") == "1"
    hidden, n = (8, 64) if tiny else (16, 512)

    data = load_digits(seed=0)
    x, y = data.x_train[:n].double(), data.y_train[:n]
    torch.manual_seed(0)
    model = mlp((64, hidden, 10)).double()
    batches = list(zip(x.split(128), y.split(128), strict=True))  # any iterable of batches

    exact = natgrad.fisher_matrix(model, batches, "categorical", "true", "dense")
    F_exact = exact.to_dense()
    loss = F.cross_entropy(model(x), y)
    g = torch.cat([p.flatten() for p in torch.autograd.grad(loss, model.parameters())])
    step = exact.solve(g, DAMPING)  # (F + δI)⁻¹ g; the update is −η times it
    blocks = natgrad.fisher_matrix(model, batches, "categorical", "true", "block_diagonal")
    mask = torch.zeros_like(F_exact)
    for _, sl, _ in blocks.blocks:  # one (module name, slice of θ, dense block) per layer
        mask[sl, sl] = 1.0

    def report(label: str, approx: natgrad.FisherMatrix) -> float:
        diff = approx.to_dense() - F_exact
        err = (torch.linalg.norm(diff) / torch.linalg.norm(F_exact)).item()
        in_blocks = (torch.linalg.norm(diff * mask) / torch.linalg.norm(F_exact * mask)).item()
        cos = F.cosine_similarity(approx.solve(g, DAMPING), step, dim=0).item()
        print(f"{label:24s} {err:11.3e} {in_blocks:11.3e} {cos:10.4f}")
        return in_blocks

    print(f"MLP 64-{hidden}-10, P = {exact.num_params} parameters, N = {n} examples, "
          f"damping {DAMPING:g}")
    header = f"{'rel. error':>11s} {'in blocks':>11s} {'cos(step)':>10s}"
    print(f"{'structure (true Fisher)':24s} {header}")
    errors = {s: report(s, natgrad.fisher_matrix(model, batches, "categorical", "true", s))
              for s in ("dense", "block_diagonal", "kfac", "ekfac", "diagonal")}
    print(f"EK-FAC error <= K-FAC error: {errors['ekfac'] <= errors['kfac'] + 1e-12}")

    print(f"{'fisher type (dense)':24s} {header}")
    for samples in (1, 100):
        generator = torch.Generator().manual_seed(0)
        report(f"mc, {samples} sample(s)", natgrad.fisher_matrix(
            model, batches, "categorical", "mc", "dense", mc_samples=samples,
            generator=generator))
    report("empirical", natgrad.fisher_matrix(model, batches, "categorical", "empirical",
                                              "dense"))


if __name__ == "__main__":
    main()
