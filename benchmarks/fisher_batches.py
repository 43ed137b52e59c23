"""fisher_matrix over a DataLoader: the same examples in 1, 4 and 16 batches, against the peers.

For each case (K-FAC with one MC sample and with the true Fisher on the MLP
784-1000-500-250-30-10 with N = 2048; the dense true Fisher on the MLP 20-50-50-10 with
N = 512) and each layout (1, 4, 16 batches of N/b examples), natgrad, NNGeometry and (K-FAC)
curvlinops compute the Fisher from the same DataLoader-like list of batches. Every round times
every (layout, method) once, the order rotated; reported are medians over rounds of the times
and of the ratios within a round (the machine is shared: ratios of runs made back to back
cancel most of its drift). Writes the section "Fisher over many batches (issue 16)" of
RESULTS.md with --write.

    .venv-bench/bin/python benchmarks/fisher_batches.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import ForeignLoad, command_line, machine_info, write_section
from fisher_peers import DENSE_DIMS, KFAC_DIMS, SEED, data, mlp
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

THREADS = 2
LAYOUTS = (1, 4, 16)
CASES = {  # case -> (fisher_type, structure, dims, N, peers)
    "kfac_mc": ("mc", "kfac", KFAC_DIMS, 2048, ("NNGeometry", "curvlinops")),
    "kfac_true": ("true", "kfac", KFAC_DIMS, 2048, ("NNGeometry", "curvlinops")),
    "dense": ("true", "dense", DENSE_DIMS, 512, ("NNGeometry",)),
}
TITLES = {"kfac_mc": "K-FAC, 1 MC sample", "kfac_true": "K-FAC, true Fisher",
          "dense": "dense true Fisher"}
BOUNDS = {"kfac_mc": {"NNGeometry": 0.75, "curvlinops": 0.75},
          "kfac_true": {"NNGeometry": 0.8, "curvlinops": 0.5}, "dense": {"NNGeometry": 0.5}}
SPREAD_BOUND = 1.15  # natgrad: 16 batches / 1 batch


def loader(x: Tensor, y: Tensor, batches: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=len(x) // batches)


def method(name: str, model: nn.Module, batches: list[tuple[Tensor, Tensor]],
           dl: DataLoader, fisher_type: str, structure: str) -> Callable[[], object]:
    """A zero-argument callable computing the whole Fisher with ``name``."""
    if name == "natgrad":
        import natgrad

        def run() -> object:
            gen = torch.Generator().manual_seed(SEED) if fisher_type == "mc" else None
            return natgrad.fisher_matrix(model, dl, "categorical", fisher_type, structure,
                                         generator=gen)
        return run
    if name == "NNGeometry":
        from nngeometry.metrics import FIM, FIM_MonteCarlo
        from nngeometry.object import PMatDense, PMatKFAC

        rep = PMatKFAC if structure == "kfac" else PMatDense

        def run() -> object:
            if fisher_type == "mc":
                torch.manual_seed(SEED)
                return FIM_MonteCarlo(model, dl, rep, variant="classif_logits", trials=1)
            return FIM(model, dl, rep, variant="classif_logits")
        return run
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(b[0]) for b in batches)

    def run() -> object:
        op = KFACLinearOperator(
            model, nn.CrossEntropyLoss(), params, dl,
            fisher_type="type-2" if fisher_type == "true" else "mc", mc_samples=1,
            kfac_approx="expand", separate_weight_and_bias=False, seed=SEED,
            check_deterministic=False, num_data=n, num_per_example_loss_terms=1)
        op.compute_kronecker_factors()
        return op
    return run


def measure(case: str, rounds: int) -> dict:
    fisher_type, structure, dims, n, peers = CASES[case]
    model = mlp(dims)
    x, y = data(n, dims[0])
    fns: dict[tuple[int, str], Callable[[], object]] = {}
    for b in LAYOUTS:
        dl = loader(x, y, b)
        batches = list(dl)
        for name in ("natgrad", *peers):
            fns[b, name] = method(name, model, batches, dl, fisher_type, structure)
    for fn in fns.values():  # warm-up
        fn()
    keys = list(fns)
    wall: dict[tuple[int, str], list[float]] = {k: [] for k in keys}
    cpu: dict[tuple[int, str], list[float]] = {k: [] for k in keys}
    loads = []
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        probe = ForeignLoad()
        probe.start()
        for k in order:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            out = fns[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            del out
        loads.append(probe.stop())
    return {"wall": wall, "cpu": cpu, "loads": loads, "peers": peers, "n": n}


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def render(results: dict[str, dict], rounds: int) -> str:
    info = machine_info()
    loads = [v for r in results.values() for v in r["loads"]]
    out = [f"Command: `{command_line('fisher_batches.py')}`", "",
           "Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".", "",
           f"{rounds} rounds per case; each round runs every (layout, method) once, order "
           "rotated. The same examples (fixed seed) in 1, 4 or 16 batches of a "
           "`DataLoader(TensorDataset(x, y), batch_size=N/b)`, handed as is to all three "
           "libraries (natgrad: `fisher_matrix(model, loader, \"categorical\", type, "
           "structure)`; NNGeometry `FIM`/`FIM_MonteCarlo(..., trials=1)`; curvlinops "
           "`KFACLinearOperator(..., loader, ...)` + `compute_kronecker_factors()`). Other "
           f"processes used median {100 * statistics.median(loads):.0f}% (max "
           f"{100 * max(loads):.0f}%) of the CPUs during the rounds: this 2-core machine is "
           "shared, so single times are noisy; the ratios of runs made back to back are "
           "the figures to read. *CPU* columns use this process's CPU time (both threads), "
           "which other processes' load disturbs less than wall time.", "",
           "| case | method | 1 batch ms | 4 batches ms | 16 batches ms | 16 / 1 (wall) "
           "| 16 / 1 (CPU) |", "|---|---|---:|---:|---:|---:|---:|"]
    for case, r in results.items():
        for name in ("natgrad", *r["peers"]):
            w = [statistics.median(r["wall"][b, name]) * 1e3 for b in LAYOUTS]
            spread = median_ratio(r["wall"][16, name], r["wall"][1, name])
            spread_cpu = median_ratio(r["cpu"][16, name], r["cpu"][1, name])
            out.append(f"| {TITLES[case]} | {name} | {w[0]:.1f} | {w[1]:.1f} | {w[2]:.1f} | "
                       f"{spread:.2f} | {spread_cpu:.2f} |")
    out += ["", "| target (median of same-round ratios) | 1 batch | 4 batches | 16 batches "
            "| bound | verdict |", "|---|---:|---:|---:|---:|---|"]
    for case, r in results.items():
        spread = median_ratio(r["wall"][16, "natgrad"], r["wall"][1, "natgrad"])
        spread_cpu = median_ratio(r["cpu"][16, "natgrad"], r["cpu"][1, "natgrad"])
        ok = "PASS" if spread <= SPREAD_BOUND else "FAIL"
        out.append(f"| {TITLES[case]}: natgrad 16 batches / 1 batch (CPU time: "
                   f"{spread_cpu:.2f}) | – | – | {spread:.2f} | ≤ {SPREAD_BOUND} | **{ok}** |")
        for peer in r["peers"]:
            ratios = [median_ratio(r["wall"][b, "natgrad"], r["wall"][b, peer])
                      for b in LAYOUTS]
            bound = BOUNDS[case][peer]
            ok = "PASS" if max(ratios) <= bound else "FAIL"
            out.append(f"| {TITLES[case]}: natgrad / {peer} | "
                       + " | ".join(f"{v:.2f}" for v in ratios) + f" | ≤ {bound} | **{ok}** |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="RESULTS.md to update")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads (default %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {case: measure(case, args.rounds) for case in args.cases.split(",")}
    body = render(results, args.rounds)
    print(body)
    if args.write:
        write_section(args.write, "## Fisher over many batches (issue 16)", body)


if __name__ == "__main__":
    sys.exit(main())
