"""Post-processing shared by evaluation, batch prediction and the served model.

Test-time augmentation (`tta`), blending across models and views (`blending`) and balancing a closed set
to equal class counts (`balancing`): one implementation, so every consumer gets the same predictions.
"""
from camid.inference.balancing import BALANCERS, balance_to_quota
from camid.inference.blending import BLENDS, UnknownMethodError, blend
from camid.inference.tta import D4, d4_view, d4_views, fold_views

__all__ = [
    "BALANCERS",
    "BLENDS",
    "D4",
    "UnknownMethodError",
    "balance_to_quota",
    "blend",
    "d4_view",
    "d4_views",
    "fold_views",
]
