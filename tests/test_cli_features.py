"""The command line's features for real work: --device, --model/--data (the user's own code),
learning-rate schedules, gradient clipping, periodic checkpoints, --seeds, TensorBoard and the
Fisher report for models above the dense limit. In process through ``natgrad.cli.main.main``
with tiny settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from natgrad.cli import device as cli_device
from natgrad.cli import launch, runner
from natgrad.cli.device import DeviceError, _Machine, backend_for, dataset_to, resolve_device
from natgrad.cli.main import main
from natgrad.cli.records import read_metrics
from natgrad.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
USER = ROOT / "examples" / "user_model.py"
SPEC = ["--model", f"{USER}:model", "--data", f"{USER}:data"]
TINY = ["--steps", "4", "--eval-every", "2", "--batch-size", "50", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_torch_globals():
    """main() sets torch's thread count and seeds its RNG: restore them for other tests."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def usage_error(argv: list[str], capsys) -> str:
    """Run ``natgrad argv``, expect exit status 2, return stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def same_parameters(a: Path, b: Path) -> None:
    pa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    pb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# -- --device --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("requested", "machine", "expected"), [
    (None, _Machine(0, None), "cpu"),
    (None, _Machine(2, None), "cuda:0"),
    ("cpu", _Machine(2, None), "cpu"),
    ("cuda", _Machine(2, None), "cuda:0"),
    ("cuda:1", _Machine(2, None), "cuda:1"),
    (None, _Machine(4, 3), "cuda:3"),  # torchrun rank with LOCAL_RANK 3: its own GPU
    ("cuda", _Machine(2, 1), "cuda:1"),
    ("cpu", _Machine(2, 1), "cpu"),
])
def test_device_placement_logic(requested, machine, expected) -> None:
    assert resolve_device(requested, machine) == torch.device(expected)


@pytest.mark.parametrize(("requested", "machine", "message"), [
    ("cuda", _Machine(0, None), "no CUDA device is available"),
    ("cuda:2", _Machine(2, None), "has 2 CUDA device(s)"),
    ("cuda:0", _Machine(2, 1), "every rank would use the same GPU"),
    (None, _Machine(2, 2), "a rank needs cuda:2"),  # more ranks than GPUs
])
def test_device_errors_say_what_exists(requested, machine, message) -> None:
    with pytest.raises(DeviceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(requested, machine)


def test_backend_follows_the_device() -> None:
    gpus = _Machine(2, 0)
    assert backend_for(None, gpus) == backend_for("cuda", gpus) == "nccl"
    assert backend_for("cpu", gpus) == "gloo"
    assert backend_for(None, _Machine(0, 0)) == "gloo"


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch) -> None:
    """Under torchrun with NCCL, rank LOCAL_RANK sets cuda:LOCAL_RANK before joining the group
    (a fake machine with 2 GPUs; the process group is not really created)."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli_device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli_device.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch.torch.cuda, "set_device", lambda d: calls.append(("device", d)))
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.dist, "init_process_group",
                        lambda backend: calls.append(("backend", backend)))
    monkeypatch.setattr(launch.dist, "get_rank", lambda: 0)
    launch.init_from_environment(None)
    assert calls == [("device", torch.device("cuda", 1)), ("backend", "nccl")]
    calls.clear()
    launch.init_from_environment("cpu")
    assert calls == [("backend", "gloo")]


def test_dataset_to_moves_every_tensor() -> None:
    data = Dataset("d", torch.rand(5, 3), torch.arange(5), torch.rand(2, 3), torch.arange(2),
                   (1, 3))
    assert dataset_to(data, torch.device("cpu")) is data
    moved = dataset_to(data, torch.device("meta"))
    assert {t.device.type for t in (moved.x_train, moved.y_train, moved.x_test,
                                    moved.y_test)} == {"meta"}


def test_model_and_batches_go_to_the_device(tmp_path: Path, monkeypatch) -> None:
    """The runner puts the model, the data and every batch on resolve_device(--device)."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(runner, "resolve_device", lambda requested: (
        seen.setdefault("requested", requested), torch.device("cpu"))[1])
    original = runner._Run.train_step

    def spy(self):
        seen["model"] = {p.device for p in self.training.model.parameters()}
        seen["data"] = {self.data.x_train.device, self.eval_x.device}
        return original(self)

    monkeypatch.setattr(runner._Run, "train_step", spy)
    assert main(["train", "--device", "cpu", *TINY, "--out", str(tmp_path / "r")]) == 0
    assert seen["requested"] == "cpu"
    assert seen["model"] == seen["data"] == {torch.device("cpu")}
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["device"] == "cpu" and config["device_used"] == "cpu"


def test_device_option_refuses_a_missing_gpu(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_device.torch.cuda, "is_available", lambda: False)
    for command in (["train"], ["compare", "--optimizers", "sgd"], ["fisher"]):
        err = usage_error([*command, "--device", "cuda", "--out", str(tmp_path / "x")], capsys)
        assert "no CUDA device is available" in err and "--device cpu" in err
    assert "expected cpu, cuda or cuda:N, got 'tpu'" in usage_error(["train", "--device", "tpu"],
                                                               capsys)


def test_resume_on_another_device_type_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["device_type"] = "cuda"
    torch.save(ckpt, out / "checkpoint.pt")
    err = usage_error(["train", "--resume", "--steps", "6", "--out", str(out)], capsys)
    assert "trained on cuda" in err and "--device cuda" in err


def test_gpu_check_script_runs_on_cpu(capsys, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_check.main(["--device", "cpu", "--steps", "3", "--synthetic",
                           "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 steps" in out and "ms/step" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--device", "cuda", "--steps", "3", "--synthetic"])
    assert info.value.code == 2 and "no CUDA device is available" in capsys.readouterr().err


# -- --model / --data ---------------------------------------------------------------------------
def test_user_model_and_data_train_and_resume_exactly(tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    base = ["train", *SPEC, "--optimizer", "kfac", "--eval-every", "2", "--batch-size", "50",
            "--threads", "1"]
    assert main([*base, "--steps", "6", "--out", str(full)]) == 0
    assert main([*base, "--steps", "3", "--out", str(part)]) == 0
    assert main(["train", "--resume", "--steps", "6", "--out", str(part)]) == 0
    same_parameters(full, part)
    config = json.loads((full / "config.json").read_text())
    assert config["task"] == "custom" and config["likelihood"] == "categorical"
    assert config["model_spec"] == f"{USER}:model" and config["data_spec"] == f"{USER}:data"
    assert config["num_params"] == 2 * 32 + 32 + 32 * 32 + 32 + 32 * 3 + 3
    assert config["train_examples"] == 1500 and config["test_examples"] == 500
    rows = read_metrics(full / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_user_model_in_compare_and_fisher(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *SPEC, "--optimizers", "sgd,kfac", *TINY, "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "# natgrad compare: custom" in summary and "test accuracy" in summary
    assert (out / "comparison.png").stat().st_size > 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["model"] == f"{USER}:model" and saved["data"] == f"{USER}:data"
    assert main(["compare", "--resume", "--steps", "6", "--out", str(out)]) == 0
    assert read_metrics(out / "kfac" / "metrics.csv")[-1]["step"] == 6
    assert main(["fisher", "--checkpoint", str(out / "kfac"), "--examples", "20",
                 "--threads", "1"]) == 0
    report = json.loads((out / "kfac" / "fisher" / "fisher.json").read_text())
    assert report["task"] == "custom" and report["num_params"] == 1251
    assert main(["fisher", *SPEC, "--examples", "20", "--threads", "1",
                 "--out", str(tmp_path / "fresh")]) == 0
    assert (tmp_path / "fresh" / "fisher.md").exists()


USER_FILE = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regressor():
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))


def digits_model():
    return nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))


def regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = torch.stack([x.sum(1), x[:, 0] * x[:, 1]], 1)
    test = DataLoader(TensorDataset(x[:50], y[:50]), batch_size=7, shuffle=True)
    return (x, y), test, "gaussian"


def not_a_model():
    return 3


def bad_likelihood():
    return (torch.zeros(4, 3), torch.zeros(4)), (torch.zeros(4, 3), torch.zeros(4)), "poisson"
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch) -> str:
    """An importable module (by its dotted name, from the current folder) with factories."""
    (tmp_path / "my_user_code.py").write_text(USER_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_user_code", raising=False)
    return "my_user_code"


def test_gaussian_tensor_and_loader_data_by_module_name(tmp_path: Path, user_module) -> None:
    out = tmp_path / "reg"
    assert main(["train", "--model", f"{user_module}:regressor", "--data",
                 f"{user_module}:regression", "--optimizer", "ekfac", *TINY,
                 "--out", str(out)]) == 0
    rows = read_metrics(out / "metrics.csv")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["test_accuracy"] is None for r in rows)
    # the loss is the batch mean of ½‖y − f‖² summed over outputs (gaussian, unit variance)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    sys.path.insert(0, str(tmp_path))
    import my_user_code

    model = my_user_code.regressor()
    model.load_state_dict(ckpt["model"])
    _, test, _ = my_user_code.regression()
    batches = list(test)  # (a shuffling loader: its order does not matter to the mean)
    xt, yt = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    expected = 0.5 * (model(xt) - yt).square().sum().item() / xt.shape[0]
    assert rows[-1]["test_loss"] == pytest.approx(expected, rel=1e-5)


def test_user_model_on_a_builtin_task(tmp_path: Path, user_module) -> None:
    out = tmp_path / "m"
    assert main(["train", "--task", "digits-mlp", "--model", f"{user_module}:digits_model",
                 "--optimizer", "kfac", *TINY, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "digits-mlp" and config["data_spec"] is None
    assert config["num_params"] == 64 * 20 + 20 + 20 * 10 + 10
    assert main(["train", "--resume", "--steps", "6", "--out", str(out)]) == 0
    assert read_metrics(out / "metrics.csv")[-1]["step"] == 6


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "my_user_code:regression"], "--data needs --model"),
    (["--model", "my_user_code"], "expected package.module:factory"),
    (["--model", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--model", "my_user_code:missing"], "has no attribute 'missing'"),
    (["--model", "my_user_code:not_a_model"], "must return a torch.nn.Module, got int"),
    (["--model", "my_user_code:regressor", "--data", "my_user_code:bad_likelihood"],
     "likelihood must be one of categorical, gaussian, bernoulli, got 'poisson'"),
    (["--model", "nowhere/file.py:f"], "file nowhere/file.py does not exist"),
    (["--task", "digits-mlp", "--model", "my_user_code:regressor", "--data",
      "my_user_code:regression"], "--task digits-mlp and --data exclude each other"),
])
def test_user_code_errors_are_clear(tmp_path: Path, user_module, capsys, args, message) -> None:
    err = usage_error(["train", *args, *TINY, "--out", str(tmp_path / "e")], capsys)
    assert message in err
    assert not (tmp_path / "e").exists()


# -- training loop: schedules, clipping, checkpoints, TensorBoard -------------------------------
def test_lr_factor_formulas() -> None:
    import math

    from natgrad.cli.schedule import LoopSettings, lr_factor

    warm = LoopSettings(warmup_steps=4)
    assert [lr_factor(k, 10, warm) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = LoopSettings(lr_schedule="cosine", warmup_steps=2, lr_min=0.1)
    # t = (k − W) / (T − W): 1 at k = W, m at the end, the half-way point at k = W + (T − W)/2
    assert lr_factor(2, 12, cos) == pytest.approx(1.0)
    assert lr_factor(7, 12, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(12, 12, cos) == pytest.approx(0.1)
    assert lr_factor(0, 12, cos) == pytest.approx(0.5)  # still warming up
    step = LoopSettings(lr_schedule="step", lr_step_every=3, lr_gamma=0.5)
    assert [lr_factor(k, 10, step) for k in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]


def _recorded_lrs(monkeypatch) -> list[float]:
    seen: list[float] = []
    original = runner._Run.train_step

    def spy(self):
        value = original(self)
        seen.append(self.training.optimizer.param_groups[0]["lr"])
        return value

    monkeypatch.setattr(runner._Run, "train_step", spy)
    return seen


def test_schedule_reaches_the_optimizer(tmp_path: Path, monkeypatch) -> None:
    seen = _recorded_lrs(monkeypatch)
    assert main(["train", "--optimizer", "kfac", "--lr", "0.2", "--warmup-steps", "2",
                 "--lr-schedule", "step", "--lr-step-every", "2", "--lr-gamma", "0.5",
                 *TINY, "--out", str(tmp_path / "r")]) == 0
    assert seen == pytest.approx([0.1, 0.2, 0.1, 0.1])
    loop = json.loads((tmp_path / "r" / "config.json").read_text())["loop"]
    assert loop["lr_schedule"] == "step" and loop["warmup_steps"] == 2


def test_scheduled_clipped_run_resumes_exactly(tmp_path: Path, capsys) -> None:
    loop = ["--optimizer", "kfac", "--lr-schedule", "cosine", "--warmup-steps", "2",
            "--clip-grad-norm", "1.0", "--eval-every", "2", "--batch-size", "50",
            "--threads", "1"]
    assert main(["train", *loop, "--steps", "6", "--out", str(tmp_path / "full")]) == 0
    # the same 6-step schedule, interrupted after 3 steps: checkpoint-every 3 saves there
    part = tmp_path / "half"
    assert main(["train", *loop, "--steps", "6", "--checkpoint-every", "3", "--keep-last", "5",
                 "--out", str(part)]) == 0
    copy = torch.load(part / "checkpoints" / "step-0000003.pt", weights_only=True)
    assert copy["step"] == 3
    torch.save(copy, part / "checkpoint.pt")
    assert main(["train", "--resume", "--out", str(part)]) == 0
    same_parameters(tmp_path / "full", part)
    err = usage_error(["train", "--resume", "--lr-schedule", "step", "--lr-step-every", "2",
                       "--out", str(part)], capsys)
    assert "--lr-schedule step differs from the saved run's cosine" in err


def test_gradient_clipping_bounds_the_gradient(tmp_path: Path, monkeypatch) -> None:
    norms: list[float] = []
    original = torch.optim.SGD.step

    def spy(self, closure=None):
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for g in self.param_groups for p in g["params"]
             if p.grad is not None]))))
        return original(self, closure)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    assert main(["train", "--optimizer", "sgd", *TINY, "--out", str(tmp_path / "a")]) == 0
    assert min(norms) > 0.5
    norms.clear()
    assert main(["train", "--optimizer", "sgd", "--clip-grad-norm", "0.5", *TINY,
                 "--out", str(tmp_path / "b")]) == 0
    assert len(norms) == 4 and max(norms) == pytest.approx(0.5, rel=1e-5)


def test_checkpoint_every_keeps_the_last_k(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    assert main(["train", "--steps", "7", "--eval-every", "5", "--batch-size", "50",
                 "--checkpoint-every", "2", "--keep-last", "2", "--out", str(out)]) == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-0000004.pt", "step-0000006.pt"]
    assert torch.load(out / "checkpoints" / kept[0], weights_only=True)["step"] == 4
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 7
    # a fresh run in the folder (--overwrite) does not keep the old copies
    assert main(["train", "--steps", "2", "--batch-size", "50", "--overwrite",
                 "--out", str(out)]) == 0
    assert not list((out / "checkpoints").glob("*.pt"))
    assert "--keep-last needs --checkpoint-every" in usage_error(
        ["train", "--keep-last", "2", "--out", str(tmp_path / "x")], capsys)


def test_tensorboard_event_files_next_to_metrics(tmp_path: Path) -> None:
    from natgrad.cli.tensorboard import available

    out = tmp_path / "r"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    events = list(out.glob("events.out.tfevents.*"))
    if not available():  # natgrad[tensorboard] not installed: nothing written, nothing fails
        assert events == []
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(events) == 1
    acc = EventAccumulator(str(out))
    acc.Reload()
    rows = read_metrics(out / "metrics.csv")
    train = acc.Scalars("loss/train")
    assert [e.step for e in train] == [r["step"] for r in rows]
    assert [e.value for e in train] == pytest.approx([r["train_loss"] for r in rows])
    assert [e.step for e in acc.Scalars("lr")] == [0, 1, 2, 3]
    assert main(["train", *TINY, "--no-tensorboard", "--out", str(tmp_path / "off")]) == 0
    assert not list((tmp_path / "off").glob("events.out.tfevents.*"))


def test_compare_seeds_mean_and_spread(tmp_path: Path, capsys) -> None:
    import statistics

    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "sgd,kfac", "--seeds", "0,3", *TINY,
                 "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    for name in ("sgd", "kfac"):
        finals = [read_metrics(out / name / f"seed-{s}" / "metrics.csv")[-1]["train_loss"]
                  for s in (0, 3)]
        assert finals[0] != finals[1]  # the seeds differ
        mean, sd = statistics.fmean(finals), statistics.stdev(finals)
        assert f"| {name} | 2/2 | {mean:.4g} ± {sd:.4g} |" in summary
    assert "Seeds 0, 3" in summary and (out / "comparison.png").stat().st_size > 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["seeds"] == [0, 3]
    # seed 0 of a multi-seed comparison is the same run as a single-seed one
    assert main(["train", "--optimizer", "kfac", *TINY, "--out", str(tmp_path / "one")]) == 0
    same_parameters(out / "kfac" / "seed-0", tmp_path / "one")
    assert main(["compare", "--resume", "--steps", "6", "--out", str(out)]) == 0
    assert read_metrics(out / "sgd" / "seed-3" / "metrics.csv")[-1]["step"] == 6
    assert "--seed and --seeds exclude each other" in usage_error(
        ["compare", "--seed", "1", "--seeds", "0,1", "--out", str(tmp_path / "x")], capsys)


# -- natgrad fisher above the dense limit --------------------------------------------------------
def test_layerwise_blocks_match_the_reference() -> None:
    """Each analysed layer's exact block and gradient are the float64 oracle's, and the cosine
    of the identity (SGD) row is cos(g_l, (F_l + δI)⁻¹ g_l) computed from them."""
    import reference as ref
    from natgrad.cli.fisher_layers import analyse_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                          nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    loss = nn.functional.cross_entropy
    report = analyse_layers(model, x, y, "categorical", loss, 0.1, max_params=30)
    assert report.skipped == {"0": 30} or report.skipped == {"2": 35}  # the 4→6 or 6→5 layer
    assert set(report.analysed) == {"4"} | ({"0", "2"} - set(report.skipped))
    assert all(p.requires_grad for p in model.parameters())  # restored
    F = ref.dense_fisher(model, (x, y), "categorical")
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss(model(x), y),
                                                                list(model.parameters()))])
    slices = ref.theta_slices(model)
    for name, analysis in report.analysed.items():
        sl = slice(slices[f"{name}.weight"].start, slices[f"{name}.bias"].stop)
        assert ref.rel_err(analysis.exact, F[sl, sl]) < 1e-10
        g = grad[sl]
        direction = torch.linalg.solve(F[sl, sl] + 0.1 * torch.eye(g.numel(),
                                                                   dtype=torch.float64), g)
        expected = float(g @ direction / (g.norm() * direction.norm()))
        identity = next(c for c in analysis.comparisons if c.name == "identity (SGD)")
        assert identity.cosine == pytest.approx(expected, rel=1e-9)
        assert [c.name for c in analysis.comparisons] == ["identity (SGD)", "kfac", "ekfac",
                                                          "prong", "diagonal"]


def test_fisher_above_the_dense_limit_reports_per_layer(tmp_path: Path, capsys) -> None:
    """digits-mlp (2410 parameters) with --max-params 400: the layer that fits gets the same
    errors as in the dense analysis' per-layer columns; the larger one is reported skipped."""
    common = ["fisher", "--task", "digits-mlp", "--examples", "20", "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "dense")]) == 0
    assert main([*common, "--max-params", "400", "--out", str(tmp_path / "layers")]) == 0
    dense = json.loads((tmp_path / "dense" / "fisher.json").read_text())
    layers = json.loads((tmp_path / "layers" / "fisher.json").read_text())
    assert layers["mode"] == "layerwise" and layers["skipped"] == {"0": 2080}
    assert list(layers["layers"]) == ["2"]
    found = layers["layers"]["2"]["approximations"]
    for approx in ("kfac", "ekfac", "diagonal", "prong"):
        assert found[approx]["error"] == pytest.approx(
            dense["approximations"][approx]["layer_errors"]["2"], rel=1e-6)
    report = (tmp_path / "layers" / "fisher.md").read_text()
    assert "more than --max-params 400" in report and "layer 0 (2080 parameters)" in report
    assert (tmp_path / "layers" / "fisher_blocks.png").stat().st_size > 0
    err = usage_error([*common, "--max-params", "100", "--out", str(tmp_path / "none")], capsys)
    assert "no layer block of at most --max-params 100 (the smallest has 330)" in err


def test_random_subset_matches_the_reference() -> None:
    """F_SS from Fisher-vector products is the oracle's principal submatrix; each
    approximation's F̂_SS and its reported errors follow from its dense matrix."""
    import reference as ref
    from natgrad.cli.fisher_subset import analyse_subset
    from natgrad.fisher import fisher_matrix

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    report = analyse_subset(model, x, "categorical", 12, seed=3)
    S = report.indices
    assert S.numel() == 12 and len(set(S.tolist())) == 12
    F = ref.dense_fisher(model, (x, torch.zeros(9, dtype=torch.long)), "categorical")
    assert ref.rel_err(report.exact, F[S][:, S]) < 1e-10
    kfac = fisher_matrix(model, [(x, None)], "categorical", "true", "kfac").to_dense()[S][:, S]
    error, _ = report.errors["kfac"]
    expected = float(torch.linalg.matrix_norm(kfac - F[S][:, S]) / torch.linalg.matrix_norm(
        F[S][:, S]))
    assert error == pytest.approx(expected, rel=1e-8)
    assert set(report.errors) == {"kfac", "ekfac", "prong"}


def test_fisher_subset_section_in_the_report(tmp_path: Path) -> None:
    out = tmp_path / "sub"
    assert main(["fisher", "--task", "digits-mlp", "--examples", "10", "--threads", "1",
                 "--max-params", "400", "--subset", "30", "--out", str(out)]) == 0
    assert "## Random subset of 30 parameters across all layers (seed 0)" in (
        out / "fisher.md").read_text()
    subset = json.loads((out / "fisher.json").read_text())["subset"]
    assert len(subset["indices"]) == 30 and max(subset["indices"]) < 2410
    assert all(0 <= v["error"] < 10 for k, v in subset["errors"].items() if k != "prong")
