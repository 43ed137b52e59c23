"""The ``natgrad`` command line, in process through ``natgrad.cli.main.main`` (tiny settings),
plus one smoke test of the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from natgrad.cli import runner
from natgrad.cli.compare import summary_markdown
from natgrad.cli.fisher import choose_damping
from natgrad.cli.fisher_analysis import analyse
from natgrad.cli.main import main
from natgrad.cli.optimizers import OPTIMIZERS
from natgrad.cli.records import COLUMNS, RunConfig, read_metrics, write_json
from natgrad.cli.runner import BatchOrder, Outcome
from test_data import make_folder, write_idx

TINY = ["--steps", "4", "--eval-every", "2", "--batch-size", "50"]
LOSSES = ("step", "batch_loss", "train_loss", "test_loss", "test_accuracy")


@pytest.fixture(autouse=True)
def _keep_torch_globals():
    """main() sets torch's thread count and seeds its RNG: restore them for other tests."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def train(out: Path, *extra: str) -> int:
    return main(["train", *TINY, "--out", str(out), *extra])


def losses(folder: Path) -> list[tuple]:
    return [tuple(row[c] for c in LOSSES) for row in read_metrics(folder / "metrics.csv")]


def params(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# -- train ---------------------------------------------------------------------------------------
def test_train_with_adaptive_lr_logs_the_chosen_step(tmp_path: Path, capsys) -> None:
    """--lr adaptive builds KFAC without lr (μ chosen, δ 1e-2, no KL clip): each row after
    step 0 carries α > 0, the μ chosen, δ and the predicted KL; the config records it and a
    resumed run keeps it. --lr adaptive for sgd is refused naming the option."""
    out = tmp_path / "run"
    assert train(out, "--optimizer", "kfac", "--lr", "adaptive") == 0
    config = json.loads((out / "config.json").read_text())
    hp = config["hyperparameters"]
    assert (hp["lr"], hp["momentum"], hp["damping"], hp["kl_clip"]) == ("adaptive", None, None,
                                                                        0.0)
    rows = read_metrics(out / "metrics.csv")
    for row in rows[1:]:
        assert row["alpha"] > 0 and row["damping"] == 1e-2 and row["predicted_kl"] > 0
        assert row["mu"] is not None and row["rho"] is None
    assert (out / "diagnostics.png").exists()
    assert main(["train", "--out", str(out), "--resume", "--steps", "6"]) == 0
    assert read_metrics(out / "metrics.csv")[-1]["step"] == 6
    with pytest.raises(SystemExit) as info:
        train(tmp_path / "sgd", "--optimizer", "sgd", "--lr", "adaptive")
    assert info.value.code == 2 and "--lr" in capsys.readouterr().err


def test_train_logs_and_plots_each_rows_step_diagnostics(tmp_path: Path, capsys) -> None:
    """kfac: each row after step 0 carries its last step's α (the lr), μ, δ (ρ and the KL
    stay empty with a fixed lr, whose damping is not adapted); diagnostics.png is drawn.
    sgd: the columns stay empty and there is no plot."""
    assert train(tmp_path / "kfac", "--optimizer", "kfac", "--lr", "0.2", "--damping", "0.5",
                 "--momentum", "0.5") == 0
    rows = read_metrics(tmp_path / "kfac" / "metrics.csv")
    assert all(rows[0][c] is None for c in ("alpha", "mu", "damping", "rho", "predicted_kl"))
    for row in rows[1:]:
        assert (row["alpha"], row["mu"], row["damping"]) == (0.2, 0.5, 0.5)
        assert row["rho"] is None and row["predicted_kl"] is None
    assert (tmp_path / "kfac" / "diagnostics.png").stat().st_size > 0
    assert "diagnostics.png" in capsys.readouterr().out
    assert train(tmp_path / "sgd", "--optimizer", "sgd") == 0
    rows = read_metrics(tmp_path / "sgd" / "metrics.csv")
    assert all(r[c] is None for r in rows for c in ("alpha", "mu", "damping", "rho"))
    assert not (tmp_path / "sgd" / "diagnostics.png").exists()


def test_train_writes_config_metrics_checkpoint(tmp_path: Path, capsys) -> None:
    assert train(tmp_path / "run", "--optimizer", "sgd") == 0
    out = tmp_path / "run"
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == COLUMNS
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["batch_loss"] is None and all(r["test_accuracy"] is None for r in rows)
    assert all(r["train_loss"] > 0 and r["test_loss"] > 0 for r in rows)
    assert [r["seconds"] for r in rows] == sorted(r["seconds"] for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "digits-autoencoder" and config["optimizer"] == "sgd"
    assert config["steps"] == 4 and config["batch_size"] == 50 and config["seed"] == 0
    assert config["hyperparameters"] == {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}
    assert config["likelihood"] == "bernoulli" and config["num_params"] == 5544
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["rows"]) == 3
    assert {"model", "optimizer", "prong", "rng", "seconds"} <= ckpt.keys()
    assert "results in" in capsys.readouterr().out


def test_classification_reports_accuracy(tmp_path: Path) -> None:
    assert train(tmp_path, "--task", "digits-mlp", "--optimizer", "adam") == 0
    rows = read_metrics(tmp_path / "metrics.csv")
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains(tmp_path: Path, optimizer: str) -> None:
    extra = ["--num-samples", "200"] if optimizer.startswith("prong") else []
    assert main(["train", "--optimizer", optimizer, "--steps", "3", "--eval-every", "3",
                 "--batch-size", "40", *extra, "--out", str(tmp_path)]) == 0
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["train_loss"])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_kfac_damping_mode_reaches_the_optimizer(tmp_path: Path, monkeypatch) -> None:
    """--damping-mode factored builds KFAC(damping_mode="factored") and is recorded."""
    import natgrad.cli.optimizers as cli_optimizers

    built = []

    class Spy(cli_optimizers.KFAC):
        def __init__(self, *args, **kwargs) -> None:
            built.append(kwargs.get("damping_mode"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cli_optimizers, "KFAC", Spy)
    assert train(tmp_path / "run", "--optimizer", "kfac", "--damping-mode", "factored") == 0
    assert built[-1] == "factored"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["hyperparameters"]["damping_mode"] == "factored"


def test_cnn_with_kfac_and_epochs(tmp_path: Path) -> None:
    assert main(["train", "--task", "digits-cnn", "--optimizer", "kfac", "--epochs", "1",
                 "--batch-size", "400", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["epochs"] == 1 and config["steps"] == config["steps_per_epoch"] == 3


def test_data_order_is_deterministic_and_shared() -> None:
    a, b = BatchOrder(103, 10, seed=3), BatchOrder(103, 10, seed=3)
    first = [a.indices(k) for k in range(25)]
    assert all(torch.equal(x, b.indices(k)) for k, x in enumerate(first))
    epoch0 = torch.cat(first[:10])
    assert len(set(epoch0.tolist())) == 100  # one epoch: no repeats, last partial batch dropped
    assert not torch.equal(first[0], first[10])  # a new permutation each epoch
    assert not torch.equal(first[0], BatchOrder(103, 10, seed=4).indices(0))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_equals_uninterrupted_run(tmp_path: Path, optimizer: str) -> None:
    extra = ["--optimizer", optimizer, "--eval-every", "2", "--batch-size", "60"]
    if "kfac" in optimizer:
        extra += ["--inverse-update-period", "3"]
    if optimizer.startswith("prong"):
        extra += ["--prong-period", "3", "--num-samples", "300"]
    if optimizer == "prong":  # and low-rank whitening, whose buffers the checkpoint carries
        extra += ["--prong-rank", "0.25"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", "--steps", "10", "--out", str(whole), *extra]) == 0
    # 5 is off the evaluation grid: its final row must not survive the resume
    assert main(["train", "--steps", "5", "--out", str(split), *extra]) == 0
    assert read_metrics(split / "metrics.csv")[-1]["step"] == 5
    assert main(["train", "--out", str(split), "--resume", "--steps", "10"]) == 0
    assert_same_run(whole, split)


def _interrupt_at(monkeypatch, step: int, how: str) -> None:
    """Interrupt the training loop when it reaches ``step``."""
    original = runner._Run.train_step

    def train_step(self):
        if self.step == step:
            if how == "raise":  # KeyboardInterrupt before the update
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: stop after this step
        return original(self)

    monkeypatch.setattr(runner._Run, "train_step", train_step)


@pytest.mark.parametrize("how", ["raise", "signal"])
def test_ctrl_c_saves_checkpoint_and_resumes_exactly(tmp_path: Path, monkeypatch, capsys,
                                                       how: str) -> None:
    extra = ["--optimizer", "kfac", "--steps", "8", "--eval-every", "2", "--batch-size", "60"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "--out", str(whole), *extra]) == 0
    _interrupt_at(monkeypatch, 3, how)
    assert main(["train", "--out", str(cut), *extra]) == 130
    message = capsys.readouterr().err
    assert "--resume" in message and str(cut) in message
    saved = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert saved["step"] == (3 if how == "raise" else 4)
    assert [r["step"] for r in read_metrics(cut / "metrics.csv")] == [0, 2] + (
        [4] if how == "signal" else [])
    monkeypatch.undo()
    assert main(["train", "--out", str(cut), "--resume"]) == 0
    assert_same_run(whole, cut)


def test_existing_folder_is_refused(tmp_path: Path, capsys) -> None:
    assert train(tmp_path, "--optimizer", "sgd") == 0
    with pytest.raises(SystemExit) as info:
        train(tmp_path, "--optimizer", "sgd")
    assert info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    assert train(tmp_path, "--optimizer", "adam", "--overwrite") == 0
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"] == "adam"
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's files are replaced


def test_resume_refuses_changed_settings_and_missing_runs(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "none"), "--resume"])
    assert info.value.code == 2 and "holds no run" in capsys.readouterr().err
    assert train(tmp_path, "--optimizer", "sgd") == 0
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--resume", "--lr", "0.5", "--steps", "6"])
    assert "--lr 0.5 differs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--resume", "--steps", "2"])
    assert "already done 4 steps" in capsys.readouterr().err


BAD = [
    (["train", "--task", "imagenet"], ["invalid choice", "digits-autoencoder", "fashion-cnn"]),
    (["train", "--optimizer", "rmsprop"], ["invalid choice", "kfac", "prong-adam"]),
    (["train", "--lr", "-1"], ["argument --lr: must be > 0"]),
    (["train", "--lr", "nan"], ["argument --lr: must be finite"]),
    (["train", "--momentum", "1.5"], ["argument --momentum: must lie in [0, 1)"]),
    (["train", "--damping", "-0.1"], ["argument --damping: must be >= 0"]),
    (["train", "--steps", "0"], ["argument --steps: must be >= 1"]),
    (["train", "--batch-size", "x"], ["argument --batch-size: expected an integer"]),
    (["train", "--steps", "3", "--epochs", "1"], ["not allowed with argument"]),
    (["train", "--num-samples", "1", "--optimizer", "prong"], ["--num-samples: must be >= 2"]),
    (["train", "--epsilon", "0"], ["argument --epsilon: must be > 0"]),
    (["train", "--structure", "full"], ["--structure", "matrix_free"]),
    (["train", "--optimizer", "prong", "--prong-rank", "1.5"],
     ["--prong-rank: must be auto, full, a fraction in (0, 1) or an integer >= 1"]),
    (["train", "--optimizer", "kfac", "--prong-rank", "4"],
     ["--prong-rank does not apply to kfac", "prong, prong-adam"]),
    (["train", "--optimizer", "kfac", "--damping-mode", "tikhonov"],
     ["--damping-mode: invalid choice 'tikhonov'", "exact, factored"]),
    (["train", "--optimizer", "ekfac", "--damping-mode", "factored"],
     ["--damping-mode does not apply to ekfac", "kfac"]),
    (["train", "--optimizer", "adam", "--damping", "0.1"],
     ["--damping does not apply to adam", "kfac"]),
    (["train", "--wat"], ["unrecognized arguments: --wat"]),
    (["train", "--batch-size", "5000"], ["--batch-size: 5000 is larger than the 1438"]),
    (["train", "--data-dir", "/tmp"], ["--data-dir applies to the fashion-* tasks only"]),
    (["compare", "--optimizers", "sgd,lbfgs"], ["lbfgs", "sgd, adam, ngd, kfac"]),
    (["compare", "--optimizers", "sgd,kfac", "--lr", "adam=0.1"], ["not among --optimizers"]),
    (["compare", "--optimizers", "sgd,kfac", "--damping", "sgd=0.1"],
     ["--damping does not apply to sgd"]),
    (["compare", "--lr", "kfac=-2"], ["argument --lr: must be > 0"]),
    (["fisher", "--examples", "0"], ["argument --examples: must be >= 1"]),
    (["fisher", "--task", "fashion-autoencoder", "--data-dir", "/nonexistent"],
     ["apt-get install dataset-fashion-mnist"]),
    (["frobnicate"], ["invalid choice", "train", "compare", "fisher"]),
]


@pytest.mark.parametrize(("argv", "expected"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_fails_with_a_clear_message(tmp_path: Path, capsys, argv: list[str],
                                              expected: list[str]) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(out)] if argv[0] != "frobnicate" else argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert "Traceback" not in err
    assert not out.exists()  # refused before any work


def test_missing_and_corrupt_data_exit_2_without_traceback(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "fashion-mlp", "--data-dir", str(tmp_path / "missing"),
              "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "apt-get install dataset-fashion-mnist" in err
    assert "--data-dir" in err and "Traceback" not in err
    make_folder(tmp_path / "bad", size=(8, 8))
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03abc")
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "fashion-mlp", "--data-dir", str(tmp_path / "bad"),
              "--out", str(tmp_path / "run")])
    assert info.value.code == 2 and "truncated" in capsys.readouterr().err


def test_any_mnist_format_folder(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", n_train=60, n_test=20, size=(8, 8))
    assert main(["train", "--task", "fashion-mlp", "--data-dir", str(tmp_path / "data"),
                 "--optimizer", "ekfac", "--steps", "2", "--batch-size", "20",
                 "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_examples"] == 60


def test_non_square_images_train_the_cnn(tmp_path: Path) -> None:
    """fashion-cnn on 8x6 images (its classifier sized from both dimensions)."""
    make_folder(tmp_path / "data", n_train=40, n_test=10, size=(8, 6))
    assert main(["train", "--task", "fashion-cnn", "--data-dir", str(tmp_path / "data"),
                 "--optimizer", "kfac", "--steps", "2", "--batch-size", "20",
                 "--out", str(tmp_path / "run")]) == 0
    assert read_metrics(tmp_path / "run" / "metrics.csv")[-1]["step"] == 2


def _damage_deflate(folder: Path) -> None:
    """Flip bytes inside the Huffman-coded stream of a compressible image file: zlib.error."""
    images = np.random.default_rng(0).integers(0, 4, size=(20, 8, 8), dtype=np.uint8)
    path = write_idx(folder / "train-images-idx3-ubyte.gz", images, gz=True)
    data = bytearray(path.read_bytes())
    for i in range(40, 100):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "message"), [
    (_damage_deflate, "cannot read"),
    (lambda folder: make_folder(folder, n_train=20, n_test=0, size=(8, 8), gz=True),
     "t10k-images-idx3-ubyte.gz holds 0 test examples"),
], ids=["damaged deflate data", "empty test split"])
def test_damaged_or_empty_data_exit_2_with_one_line(tmp_path: Path, capsys, damage,
                                                    message: str) -> None:
    make_folder(tmp_path / "data", n_train=20, n_test=5, size=(8, 8), gz=True)
    damage(tmp_path / "data")
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "fashion-mlp", "--data-dir", str(tmp_path / "data"),
              "--steps", "1", "--batch-size", "10", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_diverging_run_stops_and_keeps_metrics(tmp_path: Path, capsys) -> None:
    assert main(["train", "--optimizer", "sgd", "--lr", "1e38", "--steps", "20",
                 "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "diverged at step" in err and "--lr" in err
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows[0]["step"] == 0 and not np.isfinite(rows[-1]["batch_loss"])


# -- compare -------------------------------------------------------------------------------------
def test_compare_writes_plot_and_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "sgd,adam,kfac,prong", "--steps", "4",
                 "--eval-every", "2", "--batch-size", "50", "--lr", "sgd=0.05,kfac=0.2",
                 "--num-samples", "200", "--out", str(out)]) == 0
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    for name in ("sgd", "adam", "kfac", "prong"):
        assert f"| {name} |" in summary
        assert losses(out / name)[0] == losses(out / "sgd")[0]  # same init and data
    assert "best final train loss among the baselines" in summary
    assert json.loads((out / "kfac" / "config.json").read_text())["hyperparameters"]["lr"] == 0.2
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(f"summary: {out / 'summary.md'}")
    with pytest.raises(SystemExit):
        main(["compare", "--optimizers", "sgd", "--steps", "2", "--out", str(out)])


def test_compare_resume_continues_every_run(tmp_path: Path) -> None:
    base = ["compare", "--optimizers", "sgd,ekfac", "--eval-every", "2", "--batch-size", "60"]
    assert main([*base, "--steps", "6", "--out", str(tmp_path / "whole")]) == 0
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "split")]) == 0
    assert main(["compare", "--out", str(tmp_path / "split"), "--resume", "--steps", "6"]) == 0
    for name in ("sgd", "ekfac"):
        assert_same_run(tmp_path / "whole" / name, tmp_path / "split" / name)


def test_summary_targets_and_dashes() -> None:
    def outcome(losses: list[float], status: str = "finished") -> Outcome:
        rows = [{"step": 10 * i, "seconds": float(i), "train_loss": x, "test_loss": x,
                 "test_accuracy": None, "batch_loss": None} for i, x in enumerate(losses)]
        return Outcome(status, 10 * (len(losses) - 1), float(len(losses) - 1), rows)

    outcomes = {"sgd": outcome([5, 4, 3]), "adam": outcome([5, 3.5, 2.5]),
                "kfac": outcome([5, 2, 1]), "prong": outcome([5, 4.5, 4]),
                "ekfac": outcome([5, float("inf")], "diverged")}
    settings = {"seed": 0, "steps": 20, "batch_size": 10, "eval_every": 10}
    text = summary_markdown("digits-autoencoder", settings, outcomes,
                            {n: {"lr": 0.1} for n in outcomes})
    assert "train loss 2.5, the best final train loss among the baselines (adam)" in text
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()
             if line.startswith("| ")}
    assert lines["kfac"].endswith("| 10 | 1.0 |")  # reaches 2.5 at step 10, 1 s
    assert lines["adam"].endswith("| 20 | 2.0 |")
    assert lines["prong"].endswith("| — | — |")
    assert "diverged at step 11" in lines["ekfac"]


# -- fisher --------------------------------------------------------------------------------------
def test_fisher_report_on_a_checkpoint_single_example_is_exact(tmp_path: Path, capsys) -> None:
    """A PRONG run's checkpoint (whitened layers, unwhitened for the report) and one example:
    each layer block is then exactly G ⊗ Ā, so K-FAC and EK-FAC are exact per layer."""
    run = tmp_path / "run"
    assert main(["train", "--task", "digits-mlp", "--optimizer", "prong", "--steps", "2",
                 "--num-samples", "100", "--out", str(run)]) == 0
    assert main(["fisher", "--checkpoint", str(run / "checkpoint.pt"), "--examples", "1"]) == 0
    out = run / "fisher"
    report = json.loads((out / "fisher.json").read_text())
    approx = report["approximations"]
    assert report["examples"] == 1 and report["num_params"] == 2410
    assert "checkpoint" in report["source"] and set(report["layers"]) == {"0", "2"}
    for name in ("block_diagonal", "kfac", "ekfac"):
        assert max(approx[name]["layer_errors"].values()) < 1e-10
        assert approx[name]["cosine"] == pytest.approx(approx["block_diagonal"]["cosine"],
                                                       abs=1e-6)
    for values in approx.values():
        assert values["error"] is None or 0 <= values["error"] < float("inf")
        assert -1 <= values["cosine"] <= 1
    assert 0 < approx["block_diagonal"]["cosine"] <= 1
    assert (out / "fisher_blocks.png").read_bytes()[:4] == b"\x89PNG"
    assert "| kfac |" in (out / "fisher.md").read_text()
    assert "fisher_blocks.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the report exists now
        main(["fisher", "--checkpoint", str(run), "--examples", "1"])


def test_fisher_refuses_models_without_a_block_small_enough(tmp_path: Path, capsys) -> None:
    """Above --max-params the report goes layer by layer (tests/test_cli_features.py); with
    no layer block that small there is nothing to compare."""
    make_folder(tmp_path / "data", n_train=10, n_test=5, size=(28, 28))
    with pytest.raises(SystemExit) as info:
        main(["fisher", "--task", "fashion-mlp", "--data-dir", str(tmp_path / "data"),
              "--max-params", "1000", "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no layer block of at most --max-params 1000" in err


def test_kronecker_exact_for_a_gaussian_linear_model() -> None:
    """One Linear layer with a unit-variance Gaussian: F = I ⊗ Ā exactly, so K-FAC, EK-FAC and
    PRONG's Ā ⊗ I all equal the exact Fisher, for any number of examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    analysis = analyse(model, x, y, "gaussian",
                       lambda f, t: 0.5 * ((f - t) ** 2).sum() / f.shape[0], 1e-3)
    for c in analysis.comparisons:
        if c.name in ("block_diagonal", "kfac", "ekfac", "prong"):
            assert c.error < 1e-12 and c.cosine == pytest.approx(1.0, abs=1e-10), c.name
    diagonal = next(c for c in analysis.comparisons if c.name == "diagonal")
    assert 0 < diagonal.error < 1


def test_ekfac_never_worse_than_kfac_on_a_deeper_model() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    analysis = analyse(model, x, y, "categorical", nn.functional.cross_entropy, 1e-3)
    by_name = {c.name: c for c in analysis.comparisons}
    for layer, error in by_name["kfac"].layer_errors.items():
        assert error > 0 and by_name["ekfac"].layer_errors[layer] <= error + 1e-12
        assert by_name["block_diagonal"].layer_errors[layer] < 1e-12
    assert by_name["block_diagonal"].error <= by_name["kfac"].error + 1e-12


# -- the installed console script ----------------------------------------------------------------
def test_help_documents_the_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "per-optimizer defaults" in text and "--kl-clip" in text and "prong-adam" in text


def test_console_script_smoke(tmp_path: Path) -> None:
    script = shutil.which("natgrad", path=str(Path(sys.executable).parent)) or shutil.which(
        "natgrad")
    assert script is not None, "the natgrad console script is not installed (pip install -e .)"
    result = subprocess.run([script, "train", "--optimizer", "kfac", "--steps", "2",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "results in" in result.stdout and (tmp_path / "run" / "metrics.csv").exists()


def test_data_parallel_run_writes_once_and_resumes_in_one_process(tmp_path: Path) -> None:
    """--nproc-per-node 2 relaunches under torchrun: each rank trains on its share of every
    batch (99 examples: 50 and 49, each rank's loss weighted by its share, so that the run
    equals one process to float32 rounding, logged losses included), only rank 0 writes, and
    its checkpoint continues in a single process."""
    script = shutil.which("natgrad") or str(Path(sys.executable).parent / "natgrad")
    out, single = tmp_path / "dp", tmp_path / "single"
    common = ["--optimizer", "sgd", "--batch-size", "99", "--eval-every", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([script, "train", *common, "--steps", "10", "--out", str(out),
                             "--nproc-per-node", "2"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("results in") == 1  # rank 1 prints nothing
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 5, 10]
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 10
    assert main(["train", *common, "--steps", "10", "--out", str(single)]) == 0
    for a, b in zip(losses(out)[1:], losses(single)[1:], strict=True):
        assert a[0] == b[0] and a[2:4] == pytest.approx(b[2:4], rel=1e-6)  # evaluations
        assert a[1] == pytest.approx(b[1], rel=1e-6)  # the logged batch loss
    pa, pb = params(out), params(single)
    for name in pb:
        assert float((pa[name] - pb[name]).norm() / pb[name].norm()) < 1e-6, name
    assert main(["train", "--out", str(out), "--resume", "--steps", "15"]) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 5, 10, 15]
    assert all(np.isfinite(r["train_loss"]) for r in rows)


def test_prong_samples_are_distinct_across_ranks(monkeypatch) -> None:
    """Under torch.distributed each rank yields its own ⌈N / ranks⌉ examples of the shared
    draw: 2 ranks together read exactly the N examples one process reads (they used to read
    the same N / 2 twice)."""
    from natgrad import distributed
    from natgrad.cli.optimizers import SampleSource

    x = torch.arange(100.0).unsqueeze(1)
    alone = next(iter(SampleSource(x, 40, seed=3, draws=5)))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        source = SampleSource(x, 40, seed=3, draws=5)
        parts.append(next(iter(source)))
        assert source.draws == 6
    assert [p.shape[0] for p in parts] == [20, 20]
    assert torch.equal(torch.cat(parts), alone)


def test_each_rank_samples_with_its_own_generator() -> None:
    """Rank 0 seeds its Monte-Carlo generator with --seed (a single process is unchanged),
    other ranks with a seed derived from (seed, rank); a checkpoint gives each rank its own
    saved state (older checkpoints: the one saved state; ranks it did not have: None)."""
    assert runner.sampling_seed(5, 0) == 5
    seeds = {runner.sampling_seed(5, r) for r in range(4)}
    assert len(seeds) == 4 and runner.sampling_seed(5, 1) != runner.sampling_seed(6, 1)
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    states = runner.gather_generator_states(a)
    assert len(states) == 1 and torch.equal(states[0], a.get_state())
    rng = {"generator": a.get_state(), "generators": [a.get_state(), b.get_state()]}
    assert torch.equal(runner.rank_generator_state(rng, 1), b.get_state())
    assert runner.rank_generator_state(rng, 2) is None
    assert torch.equal(runner.rank_generator_state({"generator": b.get_state()}, 1),
                       b.get_state())


def _torchrun(*argv: str) -> None:
    """``natgrad argv --nproc-per-node 2`` in a subprocess (torchrun, gloo on the CPU)."""
    script = shutil.which("natgrad") or str(Path(sys.executable).parent / "natgrad")
    result = subprocess.run([script, *argv, "--nproc-per-node", "2", "--no-tensorboard"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_data_parallel_prong_and_kfac_equal_one_process_and_resume_exactly(
        tmp_path: Path) -> None:
    """2 ranks (one launch of compare for both optimizers, each torchrun start is slow):
    PRONG estimates its whitening from the same --num-samples distinct examples as one
    process (to rounding); K-FAC with a batch that splits unevenly (99: 50 + 49) resumes
    exactly from a save of step 2, each rank continuing its own Monte-Carlo generator."""
    common = ["--steps", "4", "--eval-every", "2", "--batch-size", "99", "--prong-period",
              "2", "--num-samples", "400"]
    cmp = tmp_path / "cmp"
    _torchrun("compare", "--optimizers", "prong,kfac", *common, "--checkpoint-every", "2",
              "--keep-last", "2", "--out", str(cmp))
    one = tmp_path / "one"
    assert main(["train", "--optimizer", "prong", *common, "--out", str(one),
                 "--no-tensorboard"]) == 0
    for a, b in zip(losses(cmp / "prong")[1:], losses(one)[1:], strict=True):
        # reading N / 2 examples twice (the defect) was off by ~1e-4 here
        assert a[0] == b[0] and a[1:4] == pytest.approx(b[1:4], rel=1e-6)
    pa, pb = params(cmp / "prong"), params(one)
    for name in pb:  # whitened coordinates amplify rounding (~2e-5); the defect gave ~1
        assert float((pa[name] - pb[name]).norm() / pb[name].norm()) < 1e-3, name
    whole, split = cmp / "kfac", tmp_path / "split"
    shutil.copytree(whole, split)
    shutil.copy(whole / "checkpoints" / "step-0000002.pt", split / "checkpoint.pt")
    states = torch.load(split / "checkpoint.pt", weights_only=True)["rng"]["generators"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])
    _torchrun("train", "--out", str(split), "--resume")
    assert_same_run(whole, split)


def test_data_parallel_refuses_a_batch_smaller_than_the_ranks(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--batch-size", "1", "--nproc-per-node", "2",
              "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "--batch-size: 1 examples cannot be split over --nproc-per-node 2" in (
        capsys.readouterr().err)


# -- issue 15: compare's settings, divergence, stale folders, fisher's damping, progress ---------
def test_compare_bare_values_apply_to_every_optimizer_that_uses_them(tmp_path: Path) -> None:
    """A bare --lr/--momentum is for every optimizer using it; OPT=VALUE overrides it."""
    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "sgd,adam,kfac", "--momentum", "0.5", "--lr",
                 "0.02", "--damping", "kfac=0.2", "--steps", "1", "--eval-every", "1",
                 "--batch-size", "50", "--out", str(out)]) == 0
    hp = {n: json.loads((out / n / "config.json").read_text())["hyperparameters"]
          for n in ("sgd", "adam", "kfac")}
    assert hp["sgd"]["lr"] == hp["adam"]["lr"] == hp["kfac"]["lr"] == 0.02
    assert hp["sgd"]["momentum"] == hp["kfac"]["momentum"] == 0.5
    assert "momentum" not in hp["adam"] and hp["kfac"]["damping"] == 0.2
    summary = (out / "summary.md").read_text()
    assert "lr 0.02, momentum 0.5" in summary


def test_compare_refuses_a_bare_value_no_optimizer_uses(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["compare", "--optimizers", "sgd,adam", "--damping", "0.1",
              "--out", str(tmp_path / "cmp")])
    assert info.value.code == 2
    assert "--damping applies to none of --optimizers sgd,adam" in capsys.readouterr().err


def test_loss_growing_far_above_its_start_is_divergence(tmp_path: Path, capsys) -> None:
    """SGD at lr 100 stays finite but its train loss explodes (44.8 → ~2e4): exit status 1,
    the rule in the message, and the checkpoint of the last healthy evaluation kept."""
    assert main(["train", "--optimizer", "sgd", "--lr", "100", "--steps", "20",
                 "--eval-every", "2", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "diverged at step 2: train loss" in err and "10 × its step-0 value" in err
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert rows[-1]["step"] == 2 and rows[-1]["train_loss"] > 10 * rows[0]["train_loss"]
    assert params(tmp_path / "run") is not None
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 0
    out = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "sgd,adam", "--lr", "sgd=100", "--steps", "4",
                 "--eval-every", "2", "--batch-size", "50", "--out", str(out)]) == 1
    summary = (out / "summary.md").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("| sgd |"))
    assert "diverged at step 2: train loss" in line
    assert "exceeds 10× its value at step 0" in summary
    assert "diverged: sgd" in capsys.readouterr().err


def test_compare_overwrite_removes_the_previous_comparisons_runs(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    base = ["compare", "--steps", "1", "--eval-every", "1", "--batch-size", "50"]
    assert main([*base, "--optimizers", "sgd,adam", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main([*base, "--task", "digits-mlp", "--optimizers", "kfac", "--out", str(out),
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["kfac"]
    assert (out / "notes.txt").read_text() == "mine"


def test_fisher_uses_the_runs_damping_by_default(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "digits-mlp", "--optimizer", "kfac", "--damping", "0.2",
                 "--steps", "2", "--out", str(run)]) == 0
    assert main(["fisher", "--checkpoint", str(run), "--examples", "3"]) == 0
    report = json.loads((run / "fisher" / "fisher.json").read_text())
    assert report["damping"] == 0.2 and "kfac run trained with" in report["damping_source"]
    assert "damping δ = 0.2 (the damping the kfac run trained with)" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert choose_damping(1e-3, config) == (1e-3, "--damping")  # an explicit value wins
    assert choose_damping(None, {"optimizer": "sgd", "hyperparameters": {"lr": 0.1}})[0] == 1e-3
    assert choose_damping(None, None) == (1e-3, "the default")


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path, capsys) -> None:
    assert train(tmp_path / "run", "--optimizer", "sgd", "--progress-every", "1e-9") == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sgd: step")]
    assert [x.split(",")[0] for x in lines] == [f"sgd: step {k}/4" for k in (1, 2, 3, 4)]
    assert all("examples/s" in x for x in lines)


# -- issue 12 items 13, 15, 21 and issue 15 item 7: files, temp files, signals -----------------
def _kfac_run(folder: Path, *extra: str) -> None:
    assert train(folder, "--optimizer", "kfac", *extra) == 0


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


CORRUPTIONS = {
    "truncated": lambda run, other: _truncated(run / "checkpoint.pt"),
    "empty": lambda run, other: (run / "checkpoint.pt").write_bytes(b""),
    "random bytes": lambda run, other: (run / "checkpoint.pt").write_bytes(
        np.random.default_rng(0).bytes(4096)),
    "not a checkpoint": lambda run, other: torch.save({"weights": torch.ones(2)},
                                                      run / "checkpoint.pt"),
    "other task": lambda run, other: shutil.copy(other["digits-mlp"], run / "checkpoint.pt"),
    "other optimizer": lambda run, other: shutil.copy(other["sgd"], run / "checkpoint.pt"),
    "corrupt config.json": lambda run, other: (run / "config.json").write_text('{"task": '),
    "config.json not settings": lambda run, other: (run / "config.json").write_text("[1, 2]"),
    "config.json missing keys": lambda run, other: (run / "config.json").write_text(
        '{"task": "digits-autoencoder"}'),
}


@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("other")
    found = {}
    for name, extra in (("digits-mlp", ["--task", "digits-mlp", "--optimizer", "kfac"]),
                        ("sgd", ["--optimizer", "sgd"])):
        assert main(["train", *TINY, "--out", str(base / name), *extra]) == 0
        found[name] = base / name / "checkpoint.pt"
    return found


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unusable_run_files_exit_2_with_one_line(tmp_path: Path, capsys, other_checkpoints,
                                                 corruption: str) -> None:
    run = tmp_path / "run"
    _kfac_run(run)
    CORRUPTIONS[corruption](run, other_checkpoints)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(run), "--resume", "--steps", "6"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    name = "config.json" if "config" in corruption else "checkpoint.pt"
    assert str(run / name) in err and "--overwrite" in err and "Traceback" not in err
    if name == "checkpoint.pt":  # the fisher report refuses it the same way
        with pytest.raises(SystemExit) as info:
            main(["fisher", "--checkpoint", str(run), "--examples", "1"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and str(run / name) in err
        assert len(err.strip().splitlines()) == 1, err


def _refused_with_one_line(args: list[str], capsys) -> str:
    """Run ``natgrad ARGS`` expecting exit 2 with one line on stderr; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_resume_refuses_a_checkpoint_of_another_run_of_the_same_task(tmp_path: Path,
                                                                      capsys) -> None:
    """A checkpoint.pt copied from a run of the same task and optimizer but another seed,
    batch size and lr is refused naming what differs, nothing changed; --steps may still
    grow at --resume (test_resume_equals_uninterrupted_run)."""
    run, other = tmp_path / "run", tmp_path / "other"
    _kfac_run(run)
    _kfac_run(other, "--seed", "7", "--batch-size", "40", "--lr", "0.1")
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    before = _snapshot(run)
    err = _refused_with_one_line(["train", "--out", str(run), "--resume", "--steps", "6"],
                                 capsys)
    assert f"{run / 'checkpoint.pt'} belongs to another run" in err
    for difference in ("seed 7 (not 0)", "batch_size 40 (not 50)", "lr 0.1 (not 0.3)"):
        assert difference in err
    assert "nothing was changed" in err and "Traceback" not in err
    assert _snapshot(run) == before


def test_resume_refuses_a_lost_checkpoint_of_a_run_past_its_start(tmp_path: Path,
                                                                  capsys) -> None:
    """--resume without checkpoint.pt, but with metrics rows after step 0 or kept copies in
    checkpoints/: exit 2 naming the missing file and the copies, nothing changed (it used to
    restart from step 0 and delete the copies). The same for compare --resume."""
    run = tmp_path / "run"
    _kfac_run(run, "--checkpoint-every", "2", "--keep-last", "2")
    (run / "checkpoint.pt").unlink()
    before = _snapshot(run)
    err = _refused_with_one_line(["train", "--out", str(run), "--resume", "--steps", "6"],
                                 capsys)
    assert f"{run / 'checkpoint.pt'} is missing" in err and "step-0000004.pt" in err
    assert "steps up to 4" in err and "nothing was changed" in err
    assert _snapshot(run) == before
    shutil.rmtree(run / "checkpoints")  # metrics.csv alone also shows the run got past step 0
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(run), "--resume", "--steps", "6"])
    assert info.value.code == 2 and "steps up to 4" in capsys.readouterr().err
    cmp = tmp_path / "cmp"
    assert main(["compare", "--optimizers", "sgd,adam", "--steps", "4", "--eval-every", "2",
                 "--batch-size", "50", "--out", str(cmp)]) == 0
    (cmp / "adam" / "checkpoint.pt").unlink()
    before = _snapshot(cmp)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["compare", "--out", str(cmp), "--resume", "--steps", "6"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and str(cmp / "adam" / "checkpoint.pt") in err, err
    assert _snapshot(cmp) == before  # sgd was not continued either


def test_corrupt_compare_json_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text("{")
    with pytest.raises(SystemExit) as info:
        main(["compare", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and str(out / "compare.json") in err
    assert len(err.strip().splitlines()) == 1


def test_a_run_killed_before_its_first_checkpoint_resumes_or_restarts(tmp_path: Path) -> None:
    """What a start leaves before its first checkpoint (config.json, a temporary file):
    --resume starts the run from step 0; a plain rerun needs no --overwrite."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _kfac_run(whole)
    for again in (["--resume"], [*TINY, "--optimizer", "kfac"]):
        shutil.rmtree(cut, ignore_errors=True)
        _kfac_run(cut)
        (cut / "checkpoint.pt").unlink()
        (cut / "metrics.csv").unlink()
        (cut / "diagnostics.png").unlink()  # written at the end of a run
        (cut / "checkpoint.pt.1a2b3c.tmp").write_bytes(b"half")
        assert main(["train", "--out", str(cut), *again]) == 0
        assert_same_run(whole, cut)
        assert sorted(p.name for p in cut.iterdir() if not p.name.startswith("events.")) == [
            "checkpoint.pt", "config.json", "diagnostics.png", "metrics.csv"
        ]  # the temporary file is gone
    compare = tmp_path / "cmp"
    (compare / "sgd").mkdir(parents=True)
    write_json(compare / "compare.json", {"task": "digits-autoencoder", "optimizers": ["sgd"]})
    write_json(compare / "sgd" / "config.json",
               RunConfig("digits-autoencoder", "sgd", 0, 4, 50, 2))
    assert main(["compare", "--optimizers", "adam", "--steps", "1", "--batch-size", "50",
                 "--out", str(compare)]) == 0
    assert not (compare / "sgd").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path: contents)."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_config_json_is_never_taken_for_an_unfinished_start(tmp_path: Path,
                                                                     capsys) -> None:
    """Only natgrad's own config.json/compare.json (recognised by their content, where natgrad
    writes them) make an unfinished start; a folder holding the user's files of those names,
    in it or in sub-folders, is refused without --overwrite and left untouched."""
    mine = tmp_path / "mine"
    (mine / "experiment1").mkdir(parents=True)
    (mine / "config.json").write_text('{"my": "precious settings"}')
    (mine / "experiment1" / "config.json").write_text('{"lr": 1}')
    before = _snapshot(mine)
    for argv in (["train", *TINY, "--optimizer", "sgd"],
                 ["compare", "--optimizers", "sgd", "--steps", "1", "--batch-size", "50"]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--out", str(mine)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "already exists and is not empty" in err, err
        assert "--overwrite" in err and "nothing was changed" in err
        assert _snapshot(mine) == before
    # a natgrad run's config.json in a sub-folder (not where train writes it) is kept too
    _kfac_run(mine / "old")
    (mine / "old" / "checkpoint.pt").unlink()
    (mine / "old" / "metrics.csv").unlink()
    (mine / "config.json").unlink()
    (mine / "experiment1" / "config.json").unlink()
    before = _snapshot(mine)
    with pytest.raises(SystemExit):
        train(mine, "--optimizer", "sgd")
    assert _snapshot(mine) == before
    # a comparison's folder holding a user's compare.json, or user folders beside the runs
    cmp = tmp_path / "cmp"
    (cmp / "sgd").mkdir(parents=True)
    (cmp / "compare.json").write_text('{"task": "mine"}')
    with pytest.raises(SystemExit):
        main(["compare", "--optimizers", "sgd", "--steps", "1", "--out", str(cmp)])
    assert (cmp / "compare.json").read_text() == '{"task": "mine"}'
    write_json(cmp / "compare.json", {"task": "digits-autoencoder", "optimizers": ["sgd"]})
    (cmp / "notes").mkdir()
    (cmp / "notes" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["compare", "--optimizers", "sgd", "--steps", "1", "--out", str(cmp)])
    assert (cmp / "notes" / "config.json").read_text() == "{}"


def test_planted_temporary_symlinks_are_never_followed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _kfac_run(run)
    victims = {}
    for name in ("checkpoint.pt.tmp", "metrics.csv.tmp", "config.json.tmp"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (run / name).symlink_to(victim)
        victims[name] = victim
    assert main(["train", "--out", str(run), "--resume", "--steps", "6"]) == 0
    assert all(v.read_text() == "precious" for v in victims.values())
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6
    # a link planted at the target itself is replaced, not written through
    from natgrad.cli.records import save_checkpoint

    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.pt").symlink_to(victims["checkpoint.pt.tmp"])
    save_checkpoint(run / "checkpoint.pt", {"x": torch.ones(1)})
    assert not (run / "checkpoint.pt").is_symlink()
    assert victims["checkpoint.pt.tmp"].read_text() == "precious"


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    original = runner._Run.train_step

    def train_step(self):
        if self.step == step:
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(runner._Run, "train_step", train_step)


def test_sigterm_saves_like_ctrl_c(tmp_path: Path, monkeypatch, capsys) -> None:
    extra = ["--optimizer", "kfac", "--steps", "8", "--eval-every", "2", "--batch-size", "60"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "--out", str(whole), *extra]) == 0
    _signal_at(monkeypatch, 3, signal.SIGTERM)
    assert main(["train", "--out", str(cut), *extra]) == 143
    assert "SIGTERM: stopping after this step" in capsys.readouterr().err
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["step"] == 4
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    assert main(["train", "--out", str(cut), "--resume"]) == 0
    assert_same_run(whole, cut)


def test_ctrl_c_during_start_up_exits_130_quietly(tmp_path: Path, monkeypatch, capsys) -> None:
    from natgrad.cli import tasks

    def load(self, data_dir=None):
        raise KeyboardInterrupt  # e.g. while decompressing the data

    monkeypatch.setattr(tasks.Task, "load", load)
    assert main(["train", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_repeated_ctrl_c_exits_130_without_traceback(tmp_path: Path) -> None:
    """The console script, Ctrl-C pressed three times: status 130, no traceback, and a
    checkpoint that loads."""
    script = shutil.which("natgrad", path=str(Path(sys.executable).parent)) or "natgrad"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([script, "train", "--optimizer", "kfac", "--steps", "100000",
                                "--eval-every", "5", "--out", str(out)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if (out / "checkpoint.pt").exists() or process.poll() is not None:
                break
            time.sleep(0.05)
        for _ in range(3):
            process.send_signal(signal.SIGINT)
            time.sleep(0.02)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 0


def test_ctrl_c_while_torch_imports_exits_130_quietly() -> None:
    """The console entry point (natgrad_cli) catches a Ctrl-C during ``import torch`` (made
    to happen there by an import hook: a real Ctrl-C's timing is a race)."""
    code = ("import builtins, sys; sys.argv = ['natgrad', '--help']; "
            "real = builtins.__import__\n"
            "def interrupted(name, *a, **k):\n"
            "    if name == 'torch':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = interrupted\n"
            "import natgrad_cli; sys.exit(natgrad_cli.main())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_damping_zero_refused_by_the_optimizer_exits_2_with_one_line(tmp_path: Path,
                                                                      capsys) -> None:
    """``--damping 0`` on digits: K-FAC refuses the singular curvature (softmax makes G
    singular) without changing anything; the CLI says so in one line, exit 2, and the
    checkpoint it leaves is finite."""
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", "--task", "digits-mlp", "--optimizer", "kfac", "--damping", "0",
              "--steps", "3", "--eval-every", "1", "--threads", "1", "--out", str(run)])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "refused step 0" in err and "damping" in err, err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
