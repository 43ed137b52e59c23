"""The note's form of the Fisher, with the Jacobian of the *probabilities* and a diagonal D, is
exact (docs/math.md §4): J_pᵀ diag(1/p) J_p = J_zᵀ (diag(p) − p pᵀ) J_z for a softmax, and
J_pᵀ diag(1/(p(1 − p))) J_p = J_zᵀ diag(p(1 − p)) J_z for independent sigmoids, because
J_p = (∂p/∂z) J_z and (∂p/∂z)ᵀ diag(1/p) (∂p/∂z) = diag(p) − p pᵀ. Checked in float64 against
natgrad's dense Fisher, which uses the logit form.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import natgrad


def _per_example_jacobian(model: nn.Module, x: Tensor, link) -> Tensor:
    """(C, P): ∂ link(f(x; θ)) / ∂θ for one example x (no batch dimension)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: link(functional_call(model, p, (x.unsqueeze(0),))[0]))(params)
    return torch.cat([j.flatten(1) for j in jac.values()], dim=1)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_probability_jacobian_with_diagonal_d_equals_the_logit_form(likelihood: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    if likelihood == "categorical":
        link, d_inverse = (lambda z: torch.softmax(z, -1)), (lambda p: 1 / p)
    else:
        link, d_inverse = torch.sigmoid, (lambda p: 1 / (p * (1 - p)))
    P = sum(p.numel() for p in model.parameters())
    note = torch.zeros(P, P, dtype=torch.float64)
    logit = torch.zeros(P, P, dtype=torch.float64)
    for xn in x:
        with torch.no_grad():
            z = model(xn.unsqueeze(0))[0]
        p = link(z)
        J_p = _per_example_jacobian(model, xn, link)
        J_z = _per_example_jacobian(model, xn, lambda f: f)
        note += J_p.T @ torch.diag(d_inverse(p)) @ J_p
        D = torch.diag(p) - torch.outer(p, p) if likelihood == "categorical" else torch.diag(
            p * (1 - p))
        logit += J_z.T @ D @ J_z
    note, logit = note / len(x), logit / len(x)
    scale = logit.abs().max()
    assert (note - logit).abs().max() <= 1e-13 * scale
    natgrad_F = natgrad.fisher_matrix(model, x, likelihood, "true", "dense").to_dense()
    assert (note - natgrad_F).abs().max() <= 1e-13 * scale
