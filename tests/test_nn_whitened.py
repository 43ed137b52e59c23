"""whiten / unwhiten and the whitened layers, against the float64 oracle in reference_prong.py.

whiten must not change the function (U = I, c = 0); unwhiten must fold a trained, re-estimated
model back into plain layers with W = V U, b = d − W c (per kernel tap for Conv2d); the
state_dict must carry U, c, V, d. Relative tolerance 1e-12, float64, seeded random inputs.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_prong as ref
from natgrad.nn import PRONG, WhitenedConv2d, WhitenedLayer, WhitenedLinear, unwhiten, whiten

RTOL = 1e-12


@pytest.fixture(autouse=True)
def _seed_single_thread() -> Iterator[None]:
    """Seeded; one intra-op thread (tiny tensors: threads only cost, on a busy machine)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)
    ).double()


def cnn() -> nn.Sequential:
    """Inputs (N, 2, 7, 7): stride, symmetric/asymmetric ("same", even kernel) padding,
    dilation, with and without bias."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),                        # 4×4
        nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(1, 2), bias=False), nn.Tanh(),
        nn.Conv2d(4, 3, 2, stride=(1, 2), padding=(1, 0), dilation=(2, 1)), nn.Tanh(),  # 4×2
        nn.Flatten(), nn.Linear(24, 3),
    ).double()


def inputs(kind: str, n: int) -> torch.Tensor:
    shape = {"mlp": (n, 4), "seq": (n, 5, 4), "cnn": (n, 2, 7, 7)}[kind]
    return torch.randn(*shape, dtype=torch.float64) + 0.7


def train(model: nn.Module, prong: PRONG, steps: int, kind: str, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = inputs(kind, 16), torch.randint(0, 3, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        prong.step()


# ---------------------------------------------------------------------------------------------
# whiten


@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
def test_whiten_same_function(kind: str) -> None:
    plain = cnn() if kind == "cnn" else mlp()
    original = copy.deepcopy(plain)
    model = whiten(plain)
    x = inputs(kind, 9)
    assert model is plain
    for name, module in original.named_modules():
        new = model.get_submodule(name)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            assert type(new) is (WhitenedLinear if isinstance(module, nn.Linear)
                                 else WhitenedConv2d)
            assert torch.equal(new.V, module.weight)
            assert (new.d is None) == (module.bias is None)
            if module.bias is not None:
                assert torch.equal(new.d, module.bias)
            assert torch.equal(new.U, torch.eye(new.U.shape[0], dtype=torch.float64))
            assert torch.equal(new.c, torch.zeros_like(new.c))
            assert new.V.dtype == torch.float64
    for mode in (True, False):
        model.train(mode)
        original.train(mode)
        assert ref.rel_err(model(x), original(x)) <= RTOL


CONV_CONFIGS = [
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 0), "dilation": (2, 1),
     "bias": False},
    {"kernel_size": (2, 3), "padding": "same", "dilation": (1, 2)},
    {"kernel_size": 4, "padding": "same", "bias": False},
    {"kernel_size": 3, "padding": "valid", "dilation": 2},
    {"kernel_size": 1},
    {"kernel_size": 3, "stride": 3, "padding": 2, "bias": False},
]


@pytest.mark.parametrize("config", CONV_CONFIGS, ids=str)
def test_whiten_conv_configs(config: dict) -> None:
    plain = nn.Sequential(nn.Conv2d(2, 3, **config), nn.Tanh()).double()
    original = copy.deepcopy(plain)
    model = whiten(plain)
    assert type(model[0]) is WhitenedConv2d
    x = inputs("cnn", 3)
    assert ref.rel_err(model(x), original(x)) <= RTOL


def test_whiten_single_layer_returns_whitened_layer() -> None:
    lin = nn.Linear(4, 3).double()
    white = whiten(lin)
    assert type(white) is WhitenedLinear
    x = inputs("mlp", 5)
    assert ref.rel_err(white(x), lin(x)) <= RTOL


def test_whiten_named_layers_only() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, stride=2)),
        nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3),
    ).double()
    original = copy.deepcopy(model)
    keep = {"0.0": model[0][0], "4": model[4]}
    whiten(model, layers=["0.2", "2"])
    assert type(model[0][2]) is WhitenedConv2d
    assert type(model[2]) is WhitenedLinear
    for name, module in keep.items():
        assert model.get_submodule(name) is module
    assert len([m for m in model.modules() if isinstance(m, WhitenedLayer)]) == 2
    x = inputs("cnn", 4)
    assert ref.rel_err(model(x), original(x)) <= RTOL


@pytest.mark.parametrize("names", [["3"], ["1"], ["0", "nope"], ["0.weight"]])
def test_whiten_unknown_or_unsupported_names(names: list[str]) -> None:
    model = mlp()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="cannot whiten"):
        whiten(model, layers=names)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]


@pytest.mark.parametrize("layers", [None, ["2"]])
def test_whiten_grouped_conv_raises(layers: list[str] | None) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=2)).double()
    with pytest.raises(ValueError, match="groups"):
        whiten(model, layers=layers)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_whiten_padding_mode_raises(mode: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)).double()
    with pytest.raises(ValueError, match="padding_mode"):
        whiten(model)


def test_whiten_failure_leaves_model_unchanged() -> None:
    """A rejected layer must not leave the model half converted (the error is raised before
    any layer is replaced, as for unknown names)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=2)).double()
    with pytest.raises(ValueError):
        whiten(model)
    assert type(model[0]) is nn.Conv2d


class TiedLinears(nn.Module):
    """Two Linears sharing one weight (distinct biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TiedLanguageModel(nn.Module):
    """A GPT-2-style head registered before the embedding it is tied to."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 7, bias=False)
        self.mix = nn.Linear(4, 4)
        self.embed = nn.Embedding(7, 4)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


@pytest.mark.parametrize(("make", "tied", "partner", "rest"), [
    (TiedLinears, ["a", "b"], "'a' shares its parameters with ['b']", ["out"]),
    (TiedLanguageModel, ["head"], "'head' shares its parameters with ['embed']", ["mix"]),
])
def test_whiten_refuses_tied_weights(make: type, tied: list[str], partner: str,
                                     rest: list[str]) -> None:
    """Issue 12 item 14: whitening gives a layer its own V, which silently untied tied weights
    (more parameters, diverging copies). It is refused, naming the tied modules and the
    ``layers=`` list that leaves them out; the model is unchanged; that list works and keeps
    the tie."""
    model = make().double()
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="tied weights") as err:
        whiten(model)
    assert partner in str(err.value) and f"whiten(model, layers={rest})" in str(err.value)
    with pytest.raises(ValueError, match="tied weights") as err:
        whiten(model, layers=tied[:1])
    assert partner in str(err.value)
    assert dict(model.named_parameters()) == before
    whiten(model, layers=rest)
    assert len(list(model.parameters())) == len(before)  # still tied
    assert all(isinstance(model.get_submodule(n), WhitenedLayer) for n in rest)
    assert not any(isinstance(model.get_submodule(n), WhitenedLayer) for n in tied)


class SharedModule(nn.Module):
    """One Linear object registered under two names and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.again = self.first
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.again(torch.tanh(self.first(x)))))


def test_whiten_keeps_a_shared_module_shared() -> None:
    """A module reused under two names is replaced by one whitened layer under both (it was
    replaced under its first name only, leaving the second use on the old weight). PRONG then
    whitens the inputs of both uses together, keeping the function; unwhiten keeps it
    shared."""
    model = SharedModule().double()
    original = copy.deepcopy(model)
    count = len(list(model.parameters()))
    for layers in (None, ["again"]):
        model = whiten(copy.deepcopy(original), layers=layers)
        assert model.first is model.again and isinstance(model.first, WhitenedLinear)
    model = whiten(model)
    assert len(list(model.parameters())) == count
    x = inputs("mlp", 9)
    assert ref.rel_err(model(x), original(x)) <= RTOL
    prong = PRONG(model, [inputs("mlp", 40)], period=1, num_samples=40, epsilon=1e-2)
    train(model, prong, 2, "mlp")
    assert not torch.equal(model.first.U, torch.eye(4, dtype=torch.float64))
    expected = model(x)
    plain = unwhiten(model)
    assert plain.first is plain.again and type(plain.first) is nn.Linear
    assert len(list(plain.parameters())) == count
    assert ref.rel_err(plain(x), expected) <= 1e-10


# ---------------------------------------------------------------------------------------------
# unwhiten and state_dict, after training with re-estimations (U, c, V non-trivial)


def trained(kind: str, whitening: str = "pca") -> tuple[nn.Module, nn.Module]:
    """(whitened model after SGD steps and 3 re-estimations, an untouched plain copy)."""
    plain = cnn() if kind == "cnn" else mlp()
    blank = copy.deepcopy(plain)
    model = whiten(plain)
    data = [(inputs(kind, 20), None), (inputs(kind, 20), None)]
    prong = PRONG(model, data, period=2, num_samples=32, epsilon=1e-2, whitening=whitening)
    train(model, prong, 4, kind)
    assert prong.reestimations == 3
    return model, blank


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_unwhiten_same_function_and_canonical_weights(kind: str) -> None:
    model, _ = trained(kind)
    layers = ref.whitened_layers(model)
    assert all(not torch.equal(m.U, torch.eye(m.U.shape[0], dtype=torch.float64))
               for m in layers.values())
    expected = ref.canonical_params(model)
    centred = {n: m.d is not None for n, m in layers.items()}
    x = inputs(kind, 7)
    out = model(x)
    white_ids = {n: id(m) for n, m in layers.items()}
    plain = unwhiten(model)
    assert not any(isinstance(m, WhitenedLayer) for m in plain.modules())
    for name, (W, b) in expected.items():
        layer = plain.get_submodule(name)
        assert type(layer) is (nn.Linear if W.dim() == 2 else nn.Conv2d)
        assert id(layer) != white_ids[name]
        assert ref.rel_err(layer.weight, W) <= RTOL
        if centred[name]:
            assert ref.rel_err(layer.bias, b) <= RTOL
        else:  # uncentred layer: c = 0, no bias to create
            assert layer.bias is None
    assert ref.rel_err(plain(x), out) <= RTOL


@pytest.mark.parametrize("config", CONV_CONFIGS, ids=str)
def test_unwhiten_conv_configs(config: dict) -> None:
    model = whiten(nn.Sequential(nn.Conv2d(2, 3, **config), nn.Tanh()).double())
    with torch.no_grad():  # arbitrary whitening: U any invertible map, c any centre
        model[0].U.copy_(torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(2, 2))
        model[0].c.copy_(torch.randn(2))
    x = inputs("cnn", 3)
    out = model(x)
    W, b = ref.canonical_conv(model[0].V.detach(), model[0].U, model[0].c,
                              None if model[0].d is None else model[0].d.detach())
    plain = unwhiten(model)
    assert type(plain[0]) is nn.Conv2d
    assert ref.rel_err(plain[0].weight, W) <= RTOL
    assert ref.rel_err(plain[0].bias, b) <= RTOL  # c ≠ 0: even a bias-free layer gets one
    assert ref.rel_err(plain(x), out) <= RTOL


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_state_dict_round_trip(kind: str) -> None:
    model, blank = trained(kind, "zca")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = whiten(blank)
    fresh.load_state_dict(torch.load(buffer))
    for name, m in ref.whitened_layers(model).items():
        f = fresh.get_submodule(name)
        for attr in ("U", "c", "V", "d"):
            a, b = getattr(m, attr), getattr(f, attr)
            assert (a is None and b is None) or torch.equal(a, b), (name, attr)
    x = inputs(kind, 6)
    assert torch.equal(fresh(x), model(x))


def test_layers_whose_parent_reads_their_weight_stay_plain() -> None:
    """torch's TransformerEncoderLayer reads linear1.weight on its eval-mode fast path: a
    whitened linear1 crashed there (AttributeError, found by a red team). whiten() leaves such
    layers plain with a warning, and refuses them by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(5 * 16, 3))
    X = torch.randn(4, 5, 16)
    with torch.no_grad():
        expected = model.eval()(X)
    with pytest.warns(RuntimeWarning, match=r"left \['0.linear1', '0.linear2'\] plain"):
        w = whiten(copy.deepcopy(model))
    assert isinstance(w[2], WhitenedLinear)
    assert type(w[0].linear1) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(w.eval()(X), expected)
    with pytest.raises(ValueError, match=r"reads their \.weight directly"):
        whiten(copy.deepcopy(model), layers=["0.linear1"])
