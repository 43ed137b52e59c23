"""GPU check: the flagship run (Fashion-MNIST deep autoencoder 784-1000-500-250-30 mirrored,
K-FAC with the command line's defaults, batch 250) for ``--steps`` steps on ``--device``.

1. The library loop, each step timed to completion (``torch.cuda.synchronize``): the first step
   (CUDA start-up and the first eigendecompositions) apart, then median / mean / p90 / max of
   the others, the steps that refresh the factors' eigendecompositions (every
   ``inverse_update_period``) reported separately, and examples per second.
2. The same model through the command line: ``natgrad train --device DEVICE`` for half the
   steps, then ``--resume`` to all of them (the model, every batch, the optimizer state and
   the random states on the device, and a resumed run continuing there).

    python benchmarks/gpu_check.py                       # cuda, 100 steps, Debian's data
    python benchmarks/gpu_check.py --data-dir DIR        # the four Fashion-MNIST IDX files
    python benchmarks/gpu_check.py --synthetic           # random images of the same shape
    python benchmarks/gpu_check.py --device cpu --steps 3 --synthetic   # smoke test

Without a CUDA device ``--device cuda`` stops at once with exit status 2 and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from natgrad.cli.optimizers import DEFAULTS
from natgrad.data import DEFAULT_FASHION_DIR, DataError, load_idx_folder
from natgrad.models import AUTOENCODER_SIZES, autoencoder
from natgrad.optim import KFAC

BATCH = 250


def flagship_model() -> nn.Module:
    """The flagship autoencoder (a ``--model`` factory for part 2 on synthetic data)."""
    return autoencoder(AUTOENCODER_SIZES)


def synthetic_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor,
                                                                        torch.Tensor], str]:
    """Random [0, 1] images of Fashion-MNIST's shape (a ``--data`` factory; autoencoder
    targets are the inputs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3000, 784, generator=g)
    return (x[:2500], x[:2500]), (x[2500:], x[2500:]), "bernoulli"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(x: torch.Tensor, device: torch.device, steps: int) -> list[float]:
    """Seconds of each of ``steps`` K-FAC steps on batches of ``x`` (on ``device``)."""
    torch.manual_seed(0)
    model = flagship_model().to(device)
    hp = DEFAULTS["kfac"]
    opt = KFAC(model, lr=hp["lr"], damping=hp["damping"], likelihood="bernoulli",
               momentum=hp["momentum"], kl_clip=hp["kl_clip"],
               inverse_update_period=hp["inverse_update_period"],
               generator=torch.Generator(device).manual_seed(0))
    x = x.to(device)
    order = torch.randperm(x.shape[0], device=device)
    times = []
    for k in range(steps):
        start = (k * BATCH) % (x.shape[0] - BATCH + 1)
        xb = x[order[start:start + BATCH]]
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(xb), xb, reduction="sum") / BATCH
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise SystemExit(f"the loss is not finite after {steps} steps: {loss.item()}")
    print(f"final batch loss {loss.item():.2f}")
    return times


def report(times: list[float], period: int) -> None:
    """Print the step-time summary (milliseconds)."""
    ms = [1000 * t for t in times]
    print(f"{len(ms)} steps; first step {ms[0]:.1f} ms (start-up, first eigendecompositions)")
    rest = ms[1:]
    if not rest:
        return
    refresh = [t for k, t in enumerate(ms) if k and k % period == 0]
    plain = [t for k, t in enumerate(ms) if k and k % period]
    q = statistics.quantiles(rest, n=10)[-1] if len(rest) > 1 else rest[0]
    print(f"steps 2..{len(ms)}: median {statistics.median(rest):.2f} ms/step, mean "
          f"{statistics.fmean(rest):.2f}, p90 {q:.2f}, max {max(rest):.2f}; "
          f"{1000 * BATCH / statistics.fmean(rest):.0f} examples/s")
    if refresh and plain:
        print(f"  steps that refresh the eigendecompositions (every {period}): median "
              f"{statistics.median(refresh):.2f} ms/step; the others "
              f"{statistics.median(plain):.2f}")


def cli_check(device: str, steps: int, data_dir: str | None, synthetic: bool) -> None:
    """``natgrad train`` for half the steps on ``device``, then ``--resume`` to all."""
    from natgrad.cli.main import main as natgrad

    here = Path(__file__).resolve()
    source = (["--model", f"{here}:flagship_model", "--data", f"{here}:synthetic_data"]
              if synthetic else ["--task", "fashion-autoencoder", "--data-dir",
                                 str(data_dir or DEFAULT_FASHION_DIR)])
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        common = ["--optimizer", "kfac", "--device", device, "--eval-every", str(steps),
                  "--batch-size", str(BATCH)]
        first = natgrad(["train", *source, *common, "--steps", str(max(1, steps // 2)),
                         "--out", out])
        second = natgrad(["train", "--resume", "--steps", str(steps), "--device", device,
                          "--out", out])
        if first or second:
            raise SystemExit(f"natgrad train failed (exit {first}, {second})")
        ckpt = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
        print(f"command line: {ckpt['step']} steps on {ckpt['device_type']} (half, then "
              "--resume), checkpoint saved")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data-dir", default=None,
                        help=f"Fashion-MNIST IDX folder (default {DEFAULT_FASHION_DIR})")
    parser.add_argument("--synthetic", action="store_true",
                        help="random images instead of Fashion-MNIST")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-cli", action="store_true", help="skip part 2")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"gpu_check: no CUDA device is available (torch {torch.__version__}, cuda "
                  f"build: {torch.version.cuda or 'no'}); run on a GPU machine or pass "
                  "--device cpu", file=sys.stderr)
            raise SystemExit(2)
        print(f"device: {torch.cuda.get_device_name(device)}")
    if args.synthetic:
        x = synthetic_data()[0][0]
    else:
        try:
            x = load_idx_folder(args.data_dir or DEFAULT_FASHION_DIR, name="fashion").x_train
        except DataError as err:
            print(f"gpu_check: {err}; or pass --synthetic", file=sys.stderr)
            raise SystemExit(2) from None
    print(f"torch {torch.__version__}, device {device}, flagship autoencoder "
          f"{sum(p.numel() for p in flagship_model().parameters())} parameters, batch {BATCH}")
    times = time_steps(x, device, args.steps)
    report(times, DEFAULTS["kfac"]["inverse_update_period"])
    if not args.no_cli:
        cli_check(args.device, args.steps, args.data_dir, args.synthetic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
