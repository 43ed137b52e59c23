"""Natural-gradient optimizers: NGD, K-FAC, EK-FAC, and K-FAC/EK-FAC as preconditioners."""

from natgrad.optim.ekfac import EKFAC
from natgrad.optim.fallback import AdamFallback
from natgrad.optim.kfac import KFAC
from natgrad.optim.ngd import NGD
from natgrad.optim.preconditioner import EKFACPreconditioner, KFACPreconditioner

__all__ = ["EKFAC", "KFAC", "NGD", "AdamFallback", "EKFACPreconditioner", "KFACPreconditioner"]
