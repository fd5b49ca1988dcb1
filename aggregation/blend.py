"""The blend: non-negative stacking of candidate predictions in log-odds, fitted on out-of-fold predictions.

logit p_blend = c + sum_k w_k logit(p_k), with w_k >= 0 (a member's rising probability never lowers the blend),
one set of weights for the seven levels (pooled rows) and one for patient_overall; then patient_overall is
never below the largest level probability. The members' probabilities are clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP]
before the log-odds. Fitted by `aggregation.monotone.fit_monotone_logistic` with each entry's weight in the
per-study competition metric (`aggregation.metric.per_study_weights`; none when model.sample_weights is "none")
and the L2 penalty `candidates.l2` on the weights. `aggregation.candidates` fits it on the members' out-of-fold
predictions, and scores it by cross-fitting (weights for fold k learnt on the other folds' rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import expit, logit

from data_prep.runs import registry

from .metric import per_study_weights
from .monotone import fit_monotone_logistic

LOGIT_CLIP = 1e-4
"""Member probabilities are clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP] before log-odds (a 0 or 1 is not infinite)."""
N_LEVELS = len(registry.LEVELS)


def _logits(probs: Sequence[np.ndarray]) -> np.ndarray:
    """Return (n, 8, K) log-odds of K (n, 8) probability arrays."""
    return logit(np.clip(np.stack([np.asarray(p, dtype=float) for p in probs], axis=-1), LOGIT_CLIP, 1 - LOGIT_CLIP))


def fit_blend(members: Sequence[str], probs: Sequence[np.ndarray], y: np.ndarray, *, l2: float,
              sample_weights: str) -> dict[str, Any]:
    """Fit the blend weights of `members` (their (n, 8) probabilities) to (n, 8) labels; return plain numbers."""
    z = _logits(probs)
    y = np.asarray(y, dtype=float)
    k = z.shape[-1]
    out: dict[str, Any] = {"members": list(members)}
    weights = per_study_weights(y) if sample_weights == "metric" else None
    for part, cols in (("level", slice(0, N_LEVELS)), ("patient", slice(N_LEVELS, None))):
        X = z[:, cols, :].reshape(-1, k)
        yy = y[:, cols].reshape(-1)
        w = None if weights is None else weights[:, cols].reshape(-1)
        coef, c = fit_monotone_logistic(X, yy, weights=w, increasing=np.ones(k, bool), penalised=np.ones(k, bool),
                                        l2=l2)
        out[part] = {"coef": coef.tolist(), "intercept": c}
    return out


def predict_blend(blend: Mapping[str, Any], probs: Sequence[np.ndarray]) -> np.ndarray:
    """Return the blend's (n, 8) probabilities from its members' (n, 8) probabilities (in `members` order)."""
    z = _logits(probs)
    out = np.empty(z.shape[:2])
    for part, cols in (("level", slice(0, N_LEVELS)), ("patient", slice(N_LEVELS, None))):
        out[:, cols] = expit(blend[part]["intercept"] + z[:, cols, :] @ np.asarray(blend[part]["coef"]))
    out[:, N_LEVELS] = np.maximum(out[:, N_LEVELS], out[:, :N_LEVELS].max(axis=1))
    return out
