"""What README.md, docs/ and the examples promise holds: the safe checkpoint loading they
recommend works for every natgrad state, the files they cite exist, and the facts they state
(dependencies, run times, the KL-clip rule, benchmark figures) agree with their sources."""

from __future__ import annotations

import io
import re
from pathlib import Path

import tomllib
import torch
from torch import nn

import natgrad
from natgrad.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDE = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
MATH = (ROOT / "docs" / "math.md").read_text(encoding="utf-8")
RESULTS = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_every_natgrad_state_loads_with_weights_only() -> None:
    """guide §6: each optimizer, preconditioner and PRONG state, after a step, survives
    ``torch.load(..., weights_only=True)`` and loads into a fresh object."""
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    makers = {
        "KFAC": lambda m: natgrad.optim.KFAC(m, lr=0.1, damping=0.1, kl_clip=1e-2,
                                            generator=torch.Generator().manual_seed(0)),
        "EKFAC": lambda m: natgrad.optim.EKFAC(m, lr=0.1, damping=0.1),
        "NGD": lambda m: natgrad.optim.NGD(m, lr=0.1, damping=0.1,
                                          generator=torch.Generator().manual_seed(0)),
        "KFACPreconditioner": lambda m: natgrad.optim.KFACPreconditioner(m, damping=0.1),
        "EKFACPreconditioner": lambda m: natgrad.optim.EKFACPreconditioner(m, damping=0.1),
        "PRONGPreconditioner": lambda m: natgrad.nn.PRONGPreconditioner(
            m, [x], period=1, num_samples=16, epsilon=0.1),
    }
    for name, make in makers.items():
        model = _model()
        obj = make(model)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        obj.step()
        state = _roundtrip({"model": model.state_dict(), "state": obj.state_dict()})
        fresh_model = _model()
        fresh_model.load_state_dict(state["model"])
        make(fresh_model).load_state_dict(state["state"])
        assert name  # reached: loaded with weights_only=True
    model = natgrad.nn.whiten(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    prong = natgrad.nn.PRONG(model, [x], period=1, num_samples=16, epsilon=0.1, optimizer=opt)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    prong.step()
    state = _roundtrip({"model": model.state_dict(), "prong": prong.state_dict(),
                        "optimizer": opt.state_dict()})
    fresh = natgrad.nn.whiten(_model())
    fresh.load_state_dict(state["model"])
    natgrad.nn.PRONG(fresh, [x], period=1, num_samples=16, epsilon=0.1,
                     initial=False).load_state_dict(state["prong"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


def test_docs_and_examples_recommend_only_safe_loading() -> None:
    texts = {"README.md": README, "docs/guide.md": GUIDE}
    texts.update({f"examples/{p.name}": p.read_text()
                  for p in (ROOT / "examples").glob("*.py")})
    for name, text in texts.items():
        assert not re.search(r"torch\.load\([^)]*weights_only=False", text), name
    assert "torch.load(path, weights_only=True)" in GUIDE
    assert "weights_only=True" in (ROOT / "examples" / "resume_checkpoint.py").read_text()


def test_cited_files_exist() -> None:
    """README links the design document (here), and math.md names the note it corrects (an
    unpublished draft by its author, cited, not redistributed)."""
    assert "[docs/design.md](docs/design.md)" in README and "`DESIGN.md`" not in README
    assert (ROOT / "docs" / "design.md").read_text().startswith("# natgrad — design")
    head = " ".join(MATH[:600].split())
    assert "Thomas George, *Demystifying Natural Neural Networks*" in head, head
    for target in re.findall(r"\]\((?!https?:)([^)#]+)", README):
        assert (ROOT / target).exists(), target


def test_readme_names_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ \[]", d)[0] for d in project["dependencies"]]
    sentence = next(line for line in README.splitlines() if line.startswith("The library needs"))
    for name in names:
        assert name in sentence, (name, sentence)


def test_guide_describes_the_cli_as_it_is() -> None:
    assert "being written" not in GUIDE and "At the time of writing" not in GUIDE


def test_guide_uses_f_only_for_the_fisher() -> None:
    code = "\n".join(re.findall(r"```python\n(.*?)```", GUIDE, re.S))
    assert "functional as F" not in GUIDE
    assert not re.search(r"(?<![\w.])F\.(cross_entropy|mse_loss|binary_cross_entropy)", GUIDE)
    assert "F.solve(" in code  # F is the Fisher object there


def test_kl_clip_help_states_the_math_rule() -> None:
    """--kl-clip bounds η²⟨P∇, ∇⟩, twice the predicted KL change (math.md §10)."""
    assert "so κ bounds twice the predicted KL change of the step" in MATH
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["train"]
    action = next(a for a in sub._actions if "--kl-clip" in a.option_strings)
    assert "twice their predicted KL change" in action.help and "η²" in action.help


def test_flagship_time_agrees_with_its_last_runs() -> None:
    """README and Makefile state the wall time RESULTS.md records for make bench-autoencoder."""
    times = [int(m) for m in re.findall(
        r"\(= `make bench-autoencoder`\); (\d+) min wall time", RESULTS)]
    assert times
    makefile = (ROOT / "Makefile").read_text()
    assert f"About {max(times)} min on 2 cores" in makefile
    assert "make bench-autoencoder  " in README and f"~{max(times)} min on 2 cores" in README


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d+", text))


def test_readme_benchmark_figures_come_from_results() -> None:
    """Every decimal figure README quotes from the benchmarks is in benchmarks/RESULTS.md,
    which the benchmark scripts write (--write) from their own runs."""
    section = README[README.index("## Benchmarks"):]
    prong_row = next(line for line in README.splitlines() if "natgrad.nn.whiten" in line)
    for number in _numbers(section) | _numbers(prong_row):
        assert number in RESULTS, number


def test_readme_demo_figures_are_the_demo_runs() -> None:
    """The figures README quotes from `make demo` are those of docs/demo/ (the copies `make
    demo` makes of its summary.md and fisher.json), which ran with the Makefile's settings."""
    import json

    summary = (ROOT / "docs" / "demo" / "summary.md").read_text()
    fisher = json.loads((ROOT / "docs" / "demo" / "fisher.json").read_text())
    makefile = (ROOT / "Makefile").read_text()
    settings = re.search(r"DEMO_SETTINGS := (.*?)\n\n", makefile, re.S).group(1)
    steps, batch, seed = (re.search(rf"--{k} (\S+)", settings).group(1)
                          for k in ("steps", "batch-size", "seed"))
    assert f"Seed {seed}, {steps} steps of {batch} examples" in summary
    assert "--examples 100" in makefile and fisher["examples"] == 100
    assert re.search(r"--damping (\S+)", settings).group(1) == f"{fisher['damping']:g}"
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in summary.splitlines() if line.startswith("| ") and "---" not in line}
    target = re.search(r"Target: train loss (\S+), the best final train loss among the "
                       r"baselines \(sgd\)", summary).group(1)
    text = " ".join(README.split())
    assert f"SGD ends at train loss {target} after {steps} steps" in text
    reached = {name: rows[name][-2] for name in ("kfac", "ekfac", "prong")}
    assert (f"K-FAC reaches it in {reached['kfac']} steps, EK-FAC in {reached['ekfac']} and "
            f"PRONG in {reached['prong']}.") in text
    cos = {k: f"{v['cosine']:.2f}" for k, v in fisher["approximations"].items()}
    assert (f"(δ = {fisher['damping']:g}): block-diagonal {cos['block_diagonal']}, K-FAC "
            f"{cos['kfac']}, EK-FAC {cos['ekfac']}, PRONG {cos['prong']}, diagonal "
            f"{cos['diagonal']}, plain gradient {cos['identity (SGD)']}.") in text


def test_docs_cite_only_tests_that_exist() -> None:
    """Every test a promise in the guide or math.md points to (``test_…``, with or without
    its file) is a test function of tests/."""
    defined = {name for path in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M)}
    cited = set(re.findall(r"\b(test_\w+)(?:\[[^\]]*\])?`", GUIDE + MATH))
    cited = {name for name in cited if not name.endswith("_py")}
    assert cited, "the docs cite no test"
    assert cited <= defined, sorted(cited - defined)
