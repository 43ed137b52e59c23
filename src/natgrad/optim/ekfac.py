"""EK-FAC as a drop-in ``torch.optim`` optimizer (George et al. 2018).

The same update as :class:`~natgrad.optim.kfac.KFAC`, with each layer's curvature
Q diag(vec S) Qᵀ: Q = Q_G ⊗ Q_A from K-FAC's factors (refreshed every
``inverse_update_period`` steps) and S the second moment of per-example gradients projected into
that basis (re-estimated every ``scale_update_period`` steps).
"""

from __future__ import annotations

from natgrad.optim.kfac import KFAC
from natgrad.optim.preconditioner import EKFACPreconditioner

__all__ = ["EKFAC"]


class EKFAC(KFAC):
    """EK-FAC optimizer; arguments as :class:`KFAC` plus ``scale_update_period`` (steps
    between re-estimates of the eigenvalues S, default ``factor_update_period``);
    ``damping_mode`` must be "exact".

    The step is KFAC's with (F̂_l + δI)⁻¹ V = Q_G [(Q_Gᵀ V Q_A) ⊘ (S + δ)] Q_Aᵀ,
    S_ij = (1/N) Σₙ Σₖ [(Q_Gᵀ Γₙₖ Q_A)_ij]² (Γₙₖ the per-example gradient of V = [W | b]).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = EKFAC(model, lr=0.1, damping=1e-2, scale_update_period=1)
        >>> nn.functional.cross_entropy(model(torch.randn(16, 4)),
        ...                             torch.randint(0, 3, (16,))).backward()
        >>> opt.step()
    """

    _preconditioner_class = EKFACPreconditioner
