"""``--model SPEC`` and ``--data SPEC``: the user's own model and data in ``natgrad`` commands.

A SPEC names a callable as ``package.module:factory`` (imported like ``python -m`` would, with
the current folder on the path) or ``path/to/file.py:factory`` (loaded from that file). The
contract, for ``train``, ``compare`` and ``fisher`` alike:

- **model factory**: ``factory() -> torch.nn.Module``, called with no arguments after
  ``torch.manual_seed(seed)`` (so ``--seed`` fixes the initialisation). Its ``forward`` takes the
  input batch and returns one tensor f, the parameters of p(y | f) for the likelihood
  (DESIGN.md §1): logits for "categorical" and "bernoulli", the mean for "gaussian".
- **data factory**: ``factory() -> (train, test, likelihood)`` or a :class:`UserData`. ``train``
  and ``test`` are each a ``(inputs, targets)`` pair of tensors, a map-style
  ``torch.utils.data.Dataset`` of ``(input, target)`` pairs, or a ``DataLoader`` yielding
  ``(inputs, targets)`` batches; ``likelihood`` is "categorical", "gaussian" or "bernoulli".
  The data are read once into tensors (the CLI's seeded data order and exact ``--resume`` need
  indexable data, so the data set must fit in memory); a loader's own batch size and shuffling
  are not used — ``--batch-size`` and the seed decide.

``--model`` alone replaces a built-in task's model (its data and likelihood stay); ``--data``
needs ``--model``. The loss is the batch mean of −log p(y | f): cross-entropy (categorical,
``ignore_index`` −100), ½‖y − f‖² summed over outputs (gaussian), sigmoid cross-entropy summed
over outputs (bernoulli) — the scaling natgrad's Fisher assumes. Both specs are saved in
``config.json``, so ``--resume`` and ``natgrad fisher --checkpoint`` rebuild the same run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from natgrad.cli.tasks import Task, get_task
from natgrad.data import Dataset

__all__ = ["CUSTOM", "CustomTask", "UserCodeError", "UserData", "add_user_code_options",
           "load_object", "resolve_task"]

CUSTOM = "custom"
"""The task name of a run on ``--data`` (its folder default is runs/custom-OPTIMIZER)."""
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


class UserCodeError(ValueError):
    """A ``--model``/``--data`` spec that cannot be loaded or breaks the contract."""


@dataclass
class UserData:
    """What a ``--data`` factory may return (a plain ``(train, test, likelihood)`` tuple is the
    same without ``batch_size``, the default ``--batch-size`` of the data)."""

    train: Any
    test: Any
    likelihood: str
    batch_size: int | None = None


def _import_module(module: str, option: str, spec: str) -> Any:
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module).resolve()
        if not path.is_file():
            raise UserCodeError(f"{option} {spec}: file {module} does not exist")
        name = "natgrad_user_" + path.stem
        loader_spec = importlib.util.spec_from_file_location(name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod
        loader_spec.loader.exec_module(mod)
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            raise UserCodeError(
                f"{option} {spec}: cannot import {module!r} ({err}); run natgrad from the "
                "folder that holds it, add that folder to PYTHONPATH, or give a file path "
                "(path/to/file.py:factory)") from None
        raise


def load_object(spec: str, option: str) -> Callable[..., Any]:
    """The callable named by ``spec`` ("module:attr" or "file.py:attr"); ``option`` (e.g.
    "--model") names the option in errors."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise UserCodeError(f"{option} {spec!r}: expected package.module:factory or "
                            "path/to/file.py:factory")
    mod = _import_module(module, option, spec)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserCodeError(f"{option} {spec}: {module} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserCodeError(f"{option} {spec}: {attr} is not callable")
    return obj


def build_user_model(spec: str) -> nn.Module:
    """Call the ``--model`` factory and check that it returned an ``nn.Module``."""
    model = load_object(spec, "--model")()
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"--model {spec}: the factory must return a torch.nn.Module, got "
                            f"{type(model).__name__}")
    return model


def _tensors(part: Any, where: str) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of a tensor pair, a Dataset of pairs or a DataLoader of batches."""
    if isinstance(part, (tuple, list)) and len(part) == 2 and all(
            isinstance(t, Tensor) for t in part):
        x, y = part
    else:
        if isinstance(part, tuple) or (not hasattr(part, "__getitem__") and not hasattr(
                part, "__iter__")):
            raise UserCodeError(f"{where} must be an (inputs, targets) pair of tensors, a "
                                f"Dataset or a DataLoader, got {type(part).__name__}")
        loader = part if isinstance(part, DataLoader) else DataLoader(part, batch_size=1024)
        xs, ys = [], []
        for batch in loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise UserCodeError(f"{where} must yield (input, target) pairs, got "
                                    f"{type(batch).__name__}")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise UserCodeError(f"{where} is empty")
        x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise UserCodeError(f"{where}: {x.shape[0]} inputs and {y.shape[0]} targets (need the "
                            "same number, at least one)")
    return x, y


def load_user_data(spec: str) -> tuple[Dataset, str, int | None]:
    """Call the ``--data`` factory: (the data as tensors, likelihood, default batch size)."""
    found = load_object(spec, "--data")()
    if isinstance(found, UserData):
        train, test, likelihood, batch = found.train, found.test, found.likelihood, \
            found.batch_size
    elif isinstance(found, (tuple, list)) and len(found) == 3:
        (train, test, likelihood), batch = found, None
    else:
        raise UserCodeError(f"--data {spec}: the factory must return (train, test, likelihood) "
                            f"or natgrad.cli.user_code.UserData, got {type(found).__name__}")
    if likelihood not in LIKELIHOODS:
        raise UserCodeError(f"--data {spec}: likelihood must be one of {', '.join(LIKELIHOODS)}"
                            f", got {likelihood!r}")
    x_train, y_train = _tensors(train, f"--data {spec}: train")
    x_test, y_test = _tensors(test, f"--data {spec}: test")
    shape = (1, int(x_train[0].numel()))
    classes = int(y_train.max()) + 1 if likelihood == "categorical" else 0
    return Dataset(CUSTOM, x_train, y_train, x_test, y_test, shape, classes), likelihood, batch


@dataclass(frozen=True)
class CustomTask(Task):
    """A built-in task with the user's model (``data_spec`` None), or the user's data and
    model (``kind`` "custom"); used wherever the CLI uses a :class:`Task`."""

    model_spec: str | None = None
    data_spec: str | None = None
    user_likelihood: str | None = None

    @property
    def likelihood(self) -> str:
        return self.user_likelihood or super().likelihood

    @property
    def classification(self) -> bool:
        return self.likelihood == "categorical"

    def load(self, data_dir: str | Path | None = None) -> Dataset:
        if self.data_spec is None:
            return super().load(data_dir)
        return load_user_data(self.data_spec)[0]

    def build_model(self, image_shape: tuple[int, int]) -> nn.Module:
        if self.model_spec is None:
            return super().build_model(image_shape)
        return build_user_model(self.model_spec)

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """The batch mean of −log p(targets | output) (see the module docstring)."""
        if self.kind != CUSTOM:
            return super().loss(output, targets)
        n = output.shape[0]
        if self.likelihood == "categorical":
            return F.cross_entropy(output, targets)
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(output, targets.to(output.dtype),
                                                      reduction="sum") / n
        return 0.5 * (output - targets.to(output.dtype)).square().sum() / n


def resolve_task(name: str | None, model: str | None, data: str | None,
                 default: str = "digits-autoencoder") -> tuple[Task, Dataset | None]:
    """The task of ``--task name --model model --data data`` and, for ``--data``, its data
    (already loaded: the likelihood comes from the factory). Raises ``ValueError``."""
    if data is not None:
        if model is None:
            raise UserCodeError("--data needs --model (the model that fits your data)")
        if name is not None and name != CUSTOM:
            raise UserCodeError(f"--task {name} and --data exclude each other: --data brings "
                                "its own data")
        build_user_model(model)
        loaded, likelihood, batch = load_user_data(data)
        task = CustomTask(CUSTOM, CUSTOM, CUSTOM, batch or 100, f"--model {model} --data {data}",
                          None, model, data, likelihood)
        return task, loaded
    base = get_task(name or default)
    if model is None:
        return base, None
    build_user_model(model)  # import and check the factory now, before any folder is made
    return CustomTask(base.name, base.dataset, base.kind, base.batch_size,
                      f"{base.description}, model from --model {model}", base.threads,
                      model, None, None), None


def add_user_code_options(parser: Any) -> None:
    """--model and --data."""
    parser.add_argument("--model", default=None, metavar="MOD:FN",
                        help="your model: package.module:factory or path/to/file.py:factory, "
                             "a function returning an nn.Module (replaces the task's model)")
    parser.add_argument("--data", default=None, metavar="MOD:FN",
                        help="your data: a function returning (train, test, likelihood) "
                             "(see natgrad.cli.user_code; needs --model)")
