"""The language-model benchmark (benchmarks/lm.py, ``make bench-lm``): its model and data are
what the issue states, and its main path runs end to end on a tiny configuration."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lm

import natgrad

pytestmark = pytest.mark.usefixtures("one_thread")


def test_data_is_the_sorted_stdlib_with_the_last_tenth_held_out() -> None:
    files = lm.stdlib_files()
    assert files == sorted(files) and all(p.suffix == ".py" for p in files)
    train, val = lm.load_text()
    data = b"".join(p.read_bytes() for p in files)
    assert len(train) + len(val) == len(data)
    assert len(val) == len(data) - int(len(data) * 0.9)
    assert bytes(val[-100:].tolist()) == data[-100:]
    assert train.dtype == torch.uint8


def test_model_is_the_stated_decoder() -> None:
    """4 layers, d 256, 4 heads, context 128, tied head, pre-norm, causal: a change to a later
    token does not change earlier logits."""
    model = lm.build_model()
    assert model.head.weight is model.tokens.weight
    assert len(model.blocks) == 4 and all(b.norm_first for b in model.blocks)
    assert model.positions.weight.shape == (128, 256)
    assert model.blocks[0].self_attn.num_heads == 4
    small = lm.build_model(layers=2, d_model=32, heads=2, context=16, flat_logits=False)
    x = torch.randint(0, 256, (2, 16))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = small(x), small(x2)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_coverage_counts_each_parameter_once_by_kind() -> None:
    model = lm.build_model(layers=2, d_model=32, heads=2, context=16)
    opt = natgrad.optim.KFAC(model, lr=0.1, damping=1e-2)
    cov = lm.coverage(model, opt.preconditioner)
    assert sum(t for _, t in cov.values()) == sum(p.numel() for p in model.parameters())
    assert cov["Linear"] == (2 * (32 * 128 + 128 + 128 * 32 + 32),) * 2
    assert cov["tied (Embedding + Linear)"] == (0, 256 * 32)
    # attention's projections and the learned positions are covered; norms are not
    assert cov["MultiheadAttention"] == (2 * (3 * 32 * 32 + 3 * 32 + 32 * 32 + 32),) * 2
    assert cov["Embedding"] == (16 * 32,) * 2
    assert cov["LayerNorm"] == (0, 5 * 64)
    x = torch.randint(0, 256, (2, 16))
    F.cross_entropy(model(x), x.reshape(-1)).backward()
    opt.step()  # still the same after the first pass
    assert lm.coverage(model, opt.preconditioner) == cov


def test_main_path_end_to_end(tmp_path: Path) -> None:
    """Tiny config under a time budget: every requested method trains, RESULTS.md gets the
    section (table, coverage, goals, plot) and the plot is written; other sections stay."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    res = lm.main(["--layers", "2", "--d-model", "32", "--heads", "2", "--context", "16",
                   "--batch", "4", "--minutes", "0.004", "--eval-every", "2",
                   "--val-sequences", "4", "--factor-period", "2", "--inverse-period", "3",
                   "--threads", "1", "--methods", "adamw-1e-3,kfac,ekfac-pre",
                   "--write", str(results)])
    outcomes = res["outcomes"]
    assert list(outcomes) == ["adamw-1e-3", "kfac", "ekfac-pre"]
    for o in outcomes.values():
        assert o.steps >= 1 and len(o.step_times) == o.steps
        assert o.seconds >= 0.004 * 60 or o.steps == 100_000
        assert o.curve[0][0] == 0 and o.curve[-1][0] == o.steps
    assert outcomes["kfac"].coverage is not None
    text = results.read_text()
    assert "## Other\n\nkept" in text
    assert lm.HEADING in text
    for method in outcomes:
        assert re.search(rf"^\| \**{re.escape(method)}\** \|", text, flags=re.M), text
    assert "| Linear |" in text and "parameters under a curvature block" in text
    assert "![validation loss against steps and seconds](lm.png)" in text
    assert (tmp_path / "lm.png").stat().st_size > 1000


def test_bad_method_is_refused() -> None:
    with pytest.raises(SystemExit):
        lm.parse_args(["--methods", "sgd"])


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    assert lm.lr_factor(0.025, 0.05) == pytest.approx(0.5)
    assert lm.lr_factor(0.05, 0.05) == pytest.approx(1.0)
    assert lm.lr_factor(1.0, 0.05) == pytest.approx(0.1)
    assert lm.lr_factor(0.525, 0.05) == pytest.approx(0.55)


def test_gpt_rejects_a_sequence_longer_than_its_context() -> None:
    model = lm.build_model(layers=1, d_model=16, heads=2, context=8)
    with pytest.raises(ValueError, match="exceeds the context 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    assert isinstance(model.blocks[0], nn.TransformerEncoderLayer)


def test_cycle_cost_weights_the_step_kinds_by_their_periods() -> None:
    """factors every 2 steps, eigendecompositions every 6: per cycle 1 eig, 2 factor and 3
    plain steps."""
    cfg = lm.Config(factor_period=2, inverse_period=6)
    kinds = [lm.step_kind(i, cfg) for i in range(7)]
    assert kinds == ["eig", "plain", "factor", "plain", "factor", "plain", "eig"]
    times = {"eig": 10.0, "factor": 4.0, "plain": 1.0}
    o = lm.Outcome("kfac", "", step_times=[times[k] for k in kinds], step_kinds=kinds)
    assert lm.cycle_cost(o, cfg) == pytest.approx((3 * 1 + 2 * 4 + 10) / 6)
    o = lm.Outcome("kfac", "", step_times=[10.0, 1.0], step_kinds=["eig", "plain"])
    assert lm.cycle_cost(o, cfg) != lm.cycle_cost(o, cfg)  # NaN: no factor step measured
