"""2-rank gloo runs on CPU, launched from pytest: data-parallel K-FAC, EK-FAC and PRONG give
the same parameters as one process on the whole batch, each eigendecomposition is computed on
exactly one rank, and checkpoints move between distributed and single-process runs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import natgrad

STEPS = 20
GLOBAL_BATCH = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=g)
    return x, y


def _optimizer(kind: str, model: nn.Module, fisher_type: str):
    if kind.startswith("kfac-adaptive"):  # no lr: α, μ from the exact Fisher, LM damping
        # every 2 steps (its loss change from the closure, or from the labels read off ∂L/∂f)
        return natgrad.optim.KFAC(model, fisher_type=fisher_type, inverse_update_period=3,
                                  damping_adaptation_period=2)
    if kind in ("kfac", "kfac-factored"):
        mode = "factored" if kind == "kfac-factored" else "exact"
        return natgrad.optim.KFAC(model, lr=0.2, damping=0.05, momentum=0.5,
                                  fisher_type=fisher_type, inverse_update_period=3,
                                  ema_decay=0.9, damping_mode=mode)
    if kind == "ekfac":
        return natgrad.optim.EKFAC(model, lr=0.2, damping=0.05, fisher_type=fisher_type,
                                   inverse_update_period=4, scale_update_period=2)
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)


def _train(kind: str, fisher_type: str, rank: int, world: int, start: int, stop: int,
           load: str | None, save: str | None, first: int | None = None
           ) -> tuple[nn.Module, object, object]:
    """Steps [start, stop) on this rank's share of each global batch: equal shares, or with
    ``first`` the first ``first`` examples on rank 0 and the rest on rank 1, each rank's loss
    weighted by world × its share / the global batch (as ``natgrad train`` does)."""
    model = _model()
    if kind == "prong":
        model = natgrad.nn.whiten(model)
    x, y = _data()
    share = GLOBAL_BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    if first is not None and world > 1:
        rows = slice(0, first) if rank == 0 else slice(first, GLOBAL_BATCH)
    weight = world * (rows.stop - rows.start) / GLOBAL_BATCH
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = _optimizer(kind, wrapped, fisher_type)
    prong = None
    if kind == "prong":
        # each rank whitens from its own half of the first batches: together, all of them
        prong = natgrad.nn.PRONG(wrapped, [x[i, rows] for i in range(4)], period=5,
                                 num_samples=4 * GLOBAL_BATCH, epsilon=1e-2, optimizer=opt,
                                 optimizer_state="keep", initial=load is None)
    if load is not None:
        state = torch.load(load, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if prong is not None:
            prong.load_state_dict(state["prong"])
    for step in range(start, stop):
        def closure(step: int = step) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(wrapped(x[step, rows]), y[step, rows]) * weight
            loss.backward()
            return loss

        if kind == "kfac-adaptive":
            opt.step(closure)
        else:
            closure()
            opt.step()
        if prong is not None:
            prong.step()
    if save is not None and rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "prong": None if prong is None else prong.state_dict()}, save)
    return model, opt, prong


def _init(rank: int, world: int, store: str) -> None:
    """Join a gloo group through a FileStore: unlike env://'s TCPStore, it has no server that
    lives in rank 0 and vanishes when rank 0 exits first."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)


def _worker(rank: int, world: int, store: str, job: dict) -> None:
    torch.set_num_threads(1)
    _init(rank, world, store)
    try:
        model, opt, _ = _train(job["kind"], job["fisher_type"], rank, world, job["start"],
                               job["stop"], job.get("load"), job.get("save"), job.get("first"))
        computed = 0
        if hasattr(opt, "preconditioner"):
            computed = opt.preconditioner.curvature.eigendecompositions_computed
        torch.save({"params": [p.detach().clone() for p in model.parameters()],
                    "eigs": computed}, f"{job['out']}.rank{rank}")
        # leave together: a rank tearing gloo down while the other still saves its
        # checkpoint can abort that rank ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(job: dict, world: int = 2) -> list[dict]:
    mp.start_processes(_worker, args=(world, f"{job['out']}.store", job), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(f"{job['out']}.rank{r}", weights_only=False) for r in range(world)]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for p, q in zip(a, b, strict=True):
        err = (p - q).norm() / q.norm()
        assert err < 1e-10, f"relative difference {err:.3g}"


@pytest.mark.parametrize(
    ("kind", "fisher_type"),
    [("kfac", "true"), ("kfac", "empirical"), ("kfac-factored", "true"), ("ekfac", "true"),
     ("prong", "true"), ("kfac-adaptive", "true"), ("kfac-adaptive-noclosure", "true")],
)
def test_two_ranks_equal_one_process(tmp_path: Path, kind: str, fisher_type: str) -> None:
    ranks = _launch({"kind": kind, "fisher_type": fisher_type, "start": 0, "stop": STEPS,
                     "out": str(tmp_path / "dist")})
    model, opt, _ = _train(kind, fisher_type, 0, 1, 0, STEPS, None, None)
    single = [p.detach() for p in model.parameters()]
    for r in ranks:
        _assert_close(r["params"], single)
    if kind not in ("prong", "kfac-factored"):  # factored: Cholesky on every rank instead
        # every eigendecomposition computed once, spread over both ranks
        alone = opt.preconditioner.curvature.eigendecompositions_computed
        assert sum(r["eigs"] for r in ranks) == alone
        assert all(r["eigs"] > 0 for r in ranks)
    if kind.startswith("kfac-adaptive"):  # δ was adapted, with or without the closure
        assert opt.damping_note is None and opt.last_reduction_ratio is not None
    # the run moved: a broken data-parallel step would not be caught by comparing no-ops
    assert (single[0] - _model()[0].weight).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["ekfac"])
def test_unequal_shards_weighted_by_size_equal_one_process(tmp_path: Path, kind: str) -> None:
    """Shards of 9 and 7 examples, each rank's loss weighted by 2 n_r / 16: the same step as
    one process on all 16 (K-FAC's statistics are sums and counts over the ranks)."""
    ranks = _launch({"kind": kind, "fisher_type": "true", "start": 0, "stop": STEPS,
                     "out": str(tmp_path / "uneven"), "first": 9})
    model, _, _ = _train(kind, "true", 0, 1, 0, STEPS, None, None)
    for r in ranks:
        _assert_close(r["params"], [p.detach() for p in model.parameters()])


def test_checkpoint_moves_between_distributed_and_single(tmp_path: Path) -> None:
    half = STEPS // 2
    model, _, _ = _train("kfac", "true", 0, 1, 0, STEPS, None, None)
    reference = [p.detach() for p in model.parameters()]
    # distributed first half -> single-process second half
    ckpt = str(tmp_path / "from_dist.pt")
    _launch({"kind": "kfac", "fisher_type": "true", "start": 0, "stop": half, "save": ckpt,
             "out": str(tmp_path / "a")})
    model, _, _ = _train("kfac", "true", 0, 1, half, STEPS, ckpt, None)
    _assert_close([p.detach() for p in model.parameters()], reference)
    # single-process first half -> distributed second half
    ckpt = str(tmp_path / "from_single.pt")
    _train("kfac", "true", 0, 1, 0, half, None, ckpt)
    ranks = _launch({"kind": "kfac", "fisher_type": "true", "start": half, "stop": STEPS,
                     "load": ckpt, "out": str(tmp_path / "b")})
    for r in ranks:
        _assert_close(r["params"], reference)


def _mismatch_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    try:
        width = 4 if rank == 0 else 5
        model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))
        try:
            natgrad.optim.KFAC(model, lr=0.1)
            message = "no error"
        except ValueError as err:
            message = str(err)
        Path(f"{out}.rank{rank}").write_text(message)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_models_fail_on_every_rank(tmp_path: Path) -> None:
    out = str(tmp_path / "mismatch")
    mp.start_processes(_mismatch_worker, args=(2, f"{out}.store", out), nprocs=2, join=True,
                       start_method="spawn")
    for r in range(2):
        assert "ranks disagree" in Path(f"{out}.rank{r}").read_text()


def _dying_worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    model = _model()
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = natgrad.optim.KFAC(wrapped, lr=0.1, damping=0.1, fisher_type="true")
    if rank == 1:
        os._exit(3)  # dies without a word, before the first step
    x, y = _data()
    start = time.monotonic()
    try:
        loss = nn.functional.cross_entropy(wrapped(x[0, :8]), y[0, :8])
        loss.backward()
        opt.step()
        message = "no error"
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
    Path(out).write_text(f"{time.monotonic() - start:.1f}\n{message}")
    os._exit(0)


def test_a_rank_that_dies_stops_the_others_with_an_error(tmp_path: Path) -> None:
    out = tmp_path / "dying"
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_dying_worker, args=(r, 2, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode is not None for p in procs), "a rank hung"
    seconds, message = out.read_text().split("\n", 1)
    assert message != "no error"
    assert float(seconds) < 60  # within the process group's timeout (20 s), not a hang
