"""The training loop behind ``natgrad train`` and ``natgrad compare``.

Data order: epoch e visits the training set in the order of a permutation drawn from a
``torch.Generator`` seeded by (seed, e); step k takes batch k mod S of epoch ⌊k / S⌋, S = ⌊N / B⌋
(the last partial batch of an epoch is dropped). The order therefore depends on the seed and the
batch size only — it is the same for every optimizer — and a resumed run continues it exactly.
The model is initialised from ``torch.manual_seed(seed)``; Monte-Carlo Fisher samples come from
a generator seeded by ``seed`` (under torch.distributed, rank r > 0 seeds its own from
(seed, r): see :func:`sampling_seed`). Everything a step depends on is saved in the checkpoint
(every rank's sampling generator state included), so a run of 2N steps and a run of N steps
resumed to 2N give bitwise identical parameters and losses.

Divergence: a run stops as "diverged" when a batch loss is not finite (the step is not taken)
or when an evaluated train loss exceeds :data:`DIVERGENCE_FACTOR` (10) times the train loss at
step 0 (or is not finite); the checkpoint of the last healthy evaluation is kept.

Stopping: the first Ctrl-C (SIGINT) or SIGTERM stops the run after the current step and saves
a checkpoint; a second Ctrl-C stops at once, keeping the last saved checkpoint (or saving the
state before the unfinished step); from the loop's end until the final checkpoint is written,
both signals are ignored.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from natgrad import distributed
from natgrad.cli.device import dataset_to, resolve_device
from natgrad.cli.optimizers import SampleSource, Training, build_training
from natgrad.cli.records import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    STEP_INFO,
    Row,
    RunConfig,
    SettingsError,
    is_writer,
    load_checkpoint,
    remove_temporary,
    save_checkpoint,
    state_mismatch,
    write_json,
    write_metrics,
)
from natgrad.cli.schedule import (
    LoopSettings,
    clear_history,
    keep_copy,
    lr_factor,
    refuse_lost_checkpoint,
)
from natgrad.cli.tasks import EVAL_TRAIN_EXAMPLES, Task, batch_targets, evaluate, get_task
from natgrad.cli.tensorboard import EventLog, clear_events
from natgrad.data import Dataset

__all__ = ["DIVERGENCE_FACTOR", "BatchOrder", "Outcome", "ResumeError", "run_training"]

DIVERGENCE_FACTOR = 10.0
"""A run whose evaluated train loss exceeds this multiple of its step-0 train loss diverged."""


class ResumeError(ValueError):
    """A checkpoint that cannot continue as asked (e.g. already past the requested steps)."""


class BatchOrder:
    """Which training examples step k uses (see the module docstring)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if batch_size > num_examples:
            raise ValueError(f"--batch-size {batch_size} is larger than the {num_examples} "
                             "training examples")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        """The visiting order of epoch ``epoch``."""
        if epoch != self._epoch:
            seed = np.random.SeedSequence([self.seed, 0, epoch]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            self._epoch = epoch
            self._perm = torch.randperm(self.num_examples, generator=generator)
        return self._perm

    def indices(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]


@dataclass
class Outcome:
    """How a run ended: ``status`` is "finished", "interrupted" or "diverged"; ``reason`` says
    why a run diverged ("diverged at step k: ...") or which signal interrupted it."""

    status: str
    step: int
    seconds: float
    rows: list[Row]
    message: str = ""
    reason: str = ""


_STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class _StopRequest:
    """While active (main thread only): the first Ctrl-C or SIGTERM asks the loop to stop after
    the current step; a second one raises ``KeyboardInterrupt`` at once, later ones are
    ignored. On leaving, both signals stay ignored (no gap in which one could interrupt the
    final checkpoint) until :meth:`restore` puts the previous handlers back. ``signal_name`` is
    the first signal's name (``None`` if none came)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._forced = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handler(self, signum: int, frame: object) -> None:
        if self.signal_name is None:
            self.signal_name = _STOP_SIGNALS.get(signum, f"signal {signum}")
            print(f"\n{self.signal_name}: stopping after this step and saving a checkpoint "
                  "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        elif not self._forced:
            self._forced = True
            raise KeyboardInterrupt

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)

    def restore(self) -> None:
        """Put back the handlers that were installed before :meth:`__enter__`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class _Progress:
    """Progress on standard error: a tqdm bar on a terminal; otherwise (a log file, a batch
    job, CI) one line every ``every`` seconds of wall-clock time (rank 0 only)."""

    def __init__(self, config: RunConfig, step: int, enabled: bool, every: float) -> None:
        self.config, self.every = config, every
        enabled = enabled and distributed.rank() == 0
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=config.steps, initial=step, desc=config.optimizer, unit="step",
                        file=sys.stderr, disable=not (enabled and terminal),
                        dynamic_ncols=True)
        self.lines = enabled and not terminal
        self.start = self.last = time.monotonic()

    def update(self, step: int, loss: float, speed: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}", ex_s=f"{speed:.0f}", refresh=False)
        now = time.monotonic()
        if self.lines and now - self.last >= self.every:
            self.last = now
            print(f"{self.config.optimizer}: step {step}/{self.config.steps}, batch loss "
                  f"{loss:.4g}, {speed:.0f} examples/s, {now - self.start:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class _Run:
    """One run's state: model, optimizer, counters, metrics; checkpointing."""

    def __init__(self, config: RunConfig, data: Dataset, out: Path, resume: bool,
                 task: Task | None = None) -> None:
        self.out = out
        self.config, self.task = config, task or get_task(config.task)
        self.device = resolve_device(config.device)
        self.data = data = dataset_to(data, self.device)
        self.order = BatchOrder(data.x_train.shape[0], config.batch_size, config.seed)
        torch.manual_seed(config.seed)
        model = self.task.build_model(data.image_shape).to(self.device)
        self.generator = torch.Generator(self.device).manual_seed(
            sampling_seed(config.seed, distributed.rank()))
        hp = config.hyperparameters
        self.source = SampleSource(data.x_train, hp.get("num_samples", 2), config.seed)
        checkpoint = None
        if resume and (out / CHECKPOINT).exists():
            checkpoint = load_checkpoint(out / CHECKPOINT, config)
        elif resume:
            refuse_lost_checkpoint(out)  # a run past its start: never restarted from 0
        if resume and checkpoint is None and distributed.rank() == 0:
            print(f"natgrad: {out} holds no {CHECKPOINT} (the run stopped before its first "
                  "one): starting it from step 0", file=sys.stderr)
        saved_type = (checkpoint or {}).get("device_type", "cpu")
        if checkpoint is not None and saved_type != self.device.type:
            raise ResumeError(f"the run in {out} was trained on {saved_type} and cannot "
                              f"continue on {self.device.type} (its random-number states "
                              f"belong to {saved_type}); resume it with --device {saved_type}")
        start = time.perf_counter()
        self.training: Training = build_training(
            config.optimizer, model, hp, self.task.likelihood, self.generator, self.source,
            initial=checkpoint is None)
        # data parallel: DDP averages the gradients, natgrad sums its statistics over ranks
        self.forward_model = (nn.parallel.DistributedDataParallel(
            self.training.model, device_ids=None if self.device.type == "cpu" else [self.device])
            if distributed.is_distributed() else self.training.model)
        self.loop = LoopSettings.from_dict(config.loop)
        self.base_lrs = [group["lr"] for group in self.training.optimizer.param_groups]
        self.step, self.seconds = 0, time.perf_counter() - start
        self.rows: list[Row] = []
        self.pending: list[float] = []
        self.updating = False
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            clear_history(out)
            clear_events(out)
        self.saved_step = self.step
        self.events = EventLog(out, self.loop.tensorboard, self.step)
        self.eval_x = data.x_train[:EVAL_TRAIN_EXAMPLES]
        self.eval_y = data.y_train[:EVAL_TRAIN_EXAMPLES]

    # -- checkpoints ---------------------------------------------------------------------------
    def _restore(self, ckpt: dict[str, Any]) -> None:
        if int(ckpt["step"]) > self.config.steps:
            raise ResumeError(f"the run in {self.out} has already done {ckpt['step']} steps; "
                              f"pass --steps of at least {ckpt['step']} to continue it")
        training = self.training
        fresh = self.generator.get_state()
        try:
            training.model.load_state_dict(ckpt["model"])
            training.optimizer.load_state_dict(ckpt["optimizer"])
            if training.prong is not None:
                training.prong.load_state_dict(ckpt["prong"])
            self.source.draws = int(ckpt["prong_draws"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt["rng"].get("cuda") is not None:  # dropout and other sampling on the GPU
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
            # after the optimizer's state, which holds rank 0's generator state
            own = rank_generator_state(ckpt["rng"], distributed.rank())
            self.generator.set_state(fresh if own is None else own)
            self.step, self.seconds = int(ckpt["step"]), float(ckpt["seconds"])
            self.rows, self.pending = list(ckpt["rows"]), list(ckpt["pending"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise state_mismatch(self.out / CHECKPOINT, err) from None
        # A last row off the evaluation grid only marked the end of the earlier run.
        if self.rows and self.rows[-1]["step"] % self.config.eval_every and (
                self.step < self.config.steps):
            self.rows.pop()

    def save(self) -> None:
        """Write checkpoint.pt and metrics.csv (every rank must call it: every rank's sampling
        generator state is gathered, and rank 0 writes them all)."""
        training = self.training
        generators = gather_generator_states(self.generator)
        save_checkpoint(self.out / CHECKPOINT, {
            "format": 1,
            "config": asdict(self.config),
            "step": self.step,
            "seconds": self.seconds,
            "rows": self.rows,
            "pending": self.pending,
            "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "prong": None if training.prong is None else training.prong.state_dict(),
            "prong_draws": self.source.draws,
            "rng": {"torch": torch.get_rng_state(), "generator": generators[0],
                    "generators": generators,
                    "cuda": (torch.cuda.get_rng_state(self.device)
                             if self.device.type == "cuda" else None)},
            "device_type": self.device.type,
        })
        write_metrics(self.out / METRICS, self.rows)
        every = self.loop.checkpoint_every
        if every and self.step % every == 0 and is_writer():
            keep_copy(self.out / CHECKPOINT, self.step, self.loop.keep_last)
        self.saved_step = self.step

    def checkpoint_due(self) -> bool:
        """Whether ``--checkpoint-every`` asks for a save at this step (not yet saved)."""
        every = self.loop.checkpoint_every
        return bool(every) and self.step % every == 0 and self.saved_step != self.step

    def write_config(self) -> None:
        data = self.data
        write_json(
            self.out / CONFIG, self.config,
            likelihood=self.task.likelihood,
            steps_per_epoch=self.order.steps_per_epoch,
            train_examples=data.x_train.shape[0], test_examples=data.x_test.shape[0],
            eval_train_examples=self.eval_x.shape[0],
            num_params=sum(p.numel() for p in self.training.model.parameters()),
            torch_threads=torch.get_num_threads(), device_used=str(self.device),
            model=repr(self.training.model),
        )

    # -- steps ---------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Append the metrics row of the current step (the batch losses since the last row
        are averaged; they are kept unless the row is on the evaluation grid)."""
        model = self.training.model
        train_loss, _ = evaluate(self.task, model, self.eval_x, self.eval_y)
        test_loss, accuracy = evaluate(self.task, model, self.data.x_test, self.data.y_test)
        batch = sum(self.pending) / len(self.pending) if self.pending else None
        info = getattr(self.training.optimizer, "last_step_info", None) or {}
        self.rows.append({"step": self.step, "seconds": self.seconds, "batch_loss": batch,
                          "train_loss": train_loss, "test_loss": test_loss,
                          "test_accuracy": accuracy,
                          **{key: info.get(key) for key in STEP_INFO}})
        if self.step % self.config.eval_every == 0:
            self.pending = []
        self.events.row(self.rows[-1])

    def train_step(self) -> float:
        """One step; returns the batch loss (the step is not taken if it is not finite)."""
        idx = self.order.indices(self.step)
        total = idx.numel()
        if distributed.is_distributed():  # this rank's contiguous share of the global batch
            idx = shard(idx, distributed.rank(), distributed.world_size())
        idx = idx.to(self.device)
        x = self.data.x_train[idx]
        targets = batch_targets(self.task, x, self.data.y_train[idx])
        opt = self.training.optimizer
        factor = lr_factor(self.step, self.config.steps, self.loop)
        for group, base in zip(opt.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        opt.zero_grad(set_to_none=True)
        loss = self.task.loss(self.forward_model(x), targets)
        value = float(loss.detach())
        if distributed.is_distributed():
            # Shards may differ in size (99 examples on 2 ranks: 50 and 49). DDP averages the
            # ranks' gradients, so rank r's mean loss L_r is weighted by R n_r / N: the average
            # (1/R) Σ_r (R n_r / N) ∇L_r = (1/N) Σ_r n_r ∇L_r is the global batch's mean
            # gradient. The logged loss is likewise (1/N) Σ_r n_r L_r, the same on all ranks.
            weight = distributed.world_size() * idx.numel() / total
            value = distributed.sum_across_ranks(
                [torch.tensor([value * idx.numel()], dtype=torch.float64, device=loss.device)]
            )[0].item() / total
            loss = loss * weight
        if not math.isfinite(value):
            return value
        loss.backward()
        if self.loop.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.training.model.parameters(), self.loop.clip_grad_norm)
        self.events.lr(self.step, opt.param_groups[0]["lr"])
        self.updating = True
        opt.step()
        if self.training.prong is not None:
            self.training.prong.step()
        self.updating = False
        return value


def sampling_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s Monte-Carlo sampling generator: ``seed`` itself on rank 0
    (a single process samples as it always has), a seed derived from (``seed``, rank) on the
    others, so that the ranks draw independent samples for their examples."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, 2, rank]).generate_state(1)[0])


def gather_generator_states(generator: torch.Generator) -> list[Tensor]:
    """Every rank's state of its ``generator``, by rank (all ranks must call it; alone, the
    list holds this process's state)."""
    state = generator.get_state()
    if not distributed.is_distributed():
        return [state]
    states: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(states, state)
    return [torch.as_tensor(s) for s in states]


def rank_generator_state(rng: dict[str, Any], rank: int) -> Tensor | None:
    """The sampling generator state a checkpoint's ``rng`` saved for ``rank``: its own entry
    of ``generators``; ``generator`` (rank 0's) for a checkpoint written before the ranks'
    states were saved; ``None`` (keep the rank's freshly seeded generator) for a rank the
    checkpoint's run did not have."""
    states = rng.get("generators")
    if states is None:
        return rng["generator"]
    return states[rank] if rank < len(states) else None


def shard(indices: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s contiguous part of a global batch split over ``world`` ranks: sizes
    differ by at most one, the larger parts first (99 on 2 ranks: 50, 49)."""
    if indices.numel() < world:
        raise ValueError(f"a batch of {indices.numel()} examples cannot be split over {world} "
                         "ranks; pass --batch-size of at least --nproc-per-node")
    return indices.tensor_split(world)[rank]


def grown(rows: list[Row]) -> str | None:
    """Why the last row shows divergence by growth (see the module docstring), or None."""
    start, last = rows[0].get("train_loss"), rows[-1].get("train_loss")
    if start is None or last is None or len(rows) < 2:
        return None
    if not math.isfinite(last):
        return f"train loss {last}"
    if last > DIVERGENCE_FACTOR * start:
        return (f"train loss {last:.4g} > {DIVERGENCE_FACTOR:g} × its step-0 value "
                f"{start:.4g}")
    return None


def _diverged(run: _Run, value: float, why: str | None) -> Outcome:
    if why is None:  # a non-finite batch loss: the step was not taken
        run.rows.append({"step": run.step + 1, "seconds": run.seconds, "batch_loss": value,
                         "train_loss": None, "test_loss": None, "test_accuracy": None})
        why = f"batch loss {value}"
    write_metrics(run.out / METRICS, run.rows)
    reason = f"diverged at step {run.rows[-1]['step']}: {why}"
    lr = run.config.hyperparameters.get("lr")
    return Outcome("diverged", run.step, run.seconds, run.rows,
                   f"{run.config.optimizer} {reason}; metrics so far are in "
                   f"{run.out / METRICS}. Try a smaller --lr (was "
                   f"{lr if isinstance(lr, str) else format(lr, 'g')})" + (
                       " or a larger --damping" if "damping" in run.config.hyperparameters
                       else ""), reason)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (all ranks must call it: they then stop together);
    the collective runs on ``device`` (NCCL needs the rank's GPU)."""
    if not distributed.is_distributed():
        return flag
    total = distributed.sum_across_ranks([torch.tensor([float(flag)], device=device)])[0]
    return bool(total.item() > 0)


def run_training(
    config: RunConfig, data: Dataset, out: Path, *, resume: bool = False, progress: bool = True,
    task: Task | None = None,
    progress_every: float = 30.0,
) -> Outcome:
    """Train as ``config`` says, writing config.json, metrics.csv and checkpoint.pt in ``out``
    (which :func:`~natgrad.cli.records.prepare_folder` has cleared or kept for ``resume``).

    ``progress``: a bar on a terminal, else a line every ``progress_every`` seconds."""
    threads = config.threads or (task or get_task(config.task)).threads
    if threads:
        torch.set_num_threads(threads)
    run = _Run(config, data, out, resume, task)
    remove_temporary(out)
    run.write_config()
    start_step, start_seconds = run.step, run.seconds
    bar = _Progress(config, run.step, progress, progress_every)
    status, value, why = "finished", 0.0, None
    stop = _StopRequest()
    try:  # the signals stay ignored from the loop's end until the final checkpoint
        try:
            with stop:
                while True:
                    on_grid = run.step % config.eval_every == 0 or run.step == config.steps
                    if on_grid and (not run.rows or run.rows[-1]["step"] != run.step):
                        run.evaluate()
                        why = grown(run.rows)
                        if why is not None:
                            status = "diverged"
                            break
                        run.save()
                    elif run.checkpoint_due():
                        run.save()
                    if run.step >= config.steps:
                        break
                    if _any_rank(stop.requested, run.device):
                        raise KeyboardInterrupt
                    value = _timed_step(run)
                    if not math.isfinite(value):
                        status = "diverged"
                        break
                    speed = (run.step - start_step) * config.batch_size / max(
                        run.seconds - start_seconds, 1e-9)
                    bar.update(run.step, value, speed)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            bar.close()
            run.events.close()
        return _finish(run, status, value, why, stop.signal_name or "Ctrl-C")
    finally:
        stop.restore()


def _finish(run: _Run, status: str, value: float, why: str | None, signal_name: str
            ) -> Outcome:
    """The outcome of the loop's end (the final checkpoint written for an interruption)."""
    config, out = run.config, run.out
    if status == "diverged":
        return _diverged(run, value, why)
    if status == "interrupted":
        # Half an update (on any rank: they save together, gathering their generator states):
        # keep the checkpoint of the last evaluation.
        if _any_rank(run.updating, run.device):
            return Outcome("interrupted", run.rows[-1]["step"], run.seconds, run.rows,
                           "interrupted in the middle of a parameter update; the checkpoint "
                           f"and metrics of step {run.rows[-1]['step']} in {out} were kept",
                           signal_name)
        run.save()
        return Outcome("interrupted", run.step, run.seconds, run.rows,
                       f"interrupted at step {run.step} of {config.steps}; checkpoint and "
                       f"metrics saved in {out}", signal_name)
    return Outcome("finished", run.step, run.seconds, run.rows)


def _timed_step(run: _Run) -> float:
    """One training step, timed into ``run.seconds``; a Ctrl-C before the update begins
    restores the random states so that the saved checkpoint is the exact state before it."""
    rng = (torch.get_rng_state(), run.generator.get_state(), run.source.draws)
    t0 = time.perf_counter()
    try:
        value = run.train_step()
    except KeyboardInterrupt:
        if not run.updating:
            torch.set_rng_state(rng[0])
            run.generator.set_state(rng[1])
            run.source.draws = rng[2]
        raise
    except ValueError as err:  # refused, nothing changed: say why in one line, exit 2
        text = " ".join(str(err).split())
        raise SettingsError(f"the optimizer refused step {run.step}: {text}") from None
    if math.isfinite(value):
        run.seconds += time.perf_counter() - t0
        run.step += 1
        run.pending.append(value)
    return value
