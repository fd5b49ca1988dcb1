"""Monotone building blocks: a logistic fit with non-negative slopes, and a Platt calibration that cannot invert.

- `fit_monotone_logistic`: weighted logistic regression (scipy L-BFGS-B) whose slopes on the `increasing`
  columns are bounded below by 0, with an L2 penalty on the penalised columns (never on the intercept).
  Weights are rescaled to mean 1, so `l2` counts in rows of average weight whatever the metric weights are.
  The max-score rule (`aggregation.rules`) and the blend (`aggregation.blend`) are such fits.
- `guard_sigmoid_calibration`: scikit-learn's Platt calibrator predicts `expit(-(a * f + b))` from the
  booster's decision value f; a fold whose fitted `a` is positive would turn a higher score into a lower
  probability. Such a calibrator gets `a = 0` and `b` = minus the log-odds of the weighted positive rate:
  that fold then says "no signal" (a constant), and the averaged calibrated model stays non-decreasing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit, logit

logger = logging.getLogger("aggregation")

MAX_ITER = 500
"""L-BFGS-B iterations of a monotone logistic fit (a handful of parameters: converges in tens)."""
RATE_CLIP = 1e-6
"""A constant calibrator's rate is kept within [RATE_CLIP, 1 - RATE_CLIP] (finite log-odds)."""


def fit_monotone_logistic(X: np.ndarray, y: np.ndarray, *, weights: np.ndarray | None = None,
                          increasing: np.ndarray, penalised: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Return (coef, intercept) of a weighted logistic fit whose `increasing` columns get slopes >= 0."""
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    n, d = X.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    w = w / w.mean() if n else w
    pen = np.asarray(penalised, dtype=float) * float(l2)
    rate = float(np.clip((w * y).sum() / w.sum(), RATE_CLIP, 1 - RATE_CLIP)) if n else 0.5

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = theta[0] + X @ theta[1:]
        value = -(w * (y * log_expit(z) + (1 - y) * log_expit(-z))).sum() + 0.5 * (pen * theta[1:] ** 2).sum()
        r = w * (expit(z) - y)
        return float(value), np.concatenate([[r.sum()], X.T @ r + pen * theta[1:]])

    bounds = [(None, None)] + [(0.0, None) if inc else (None, None) for inc in np.asarray(increasing, dtype=bool)]
    theta0 = np.concatenate([[logit(rate)], np.zeros(d)])
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": MAX_ITER})
    if not res.success:
        logger.debug("monotone logistic fit: %s (kept the last iterate)", res.message)
    return res.x[1:].copy(), float(res.x[0])


def guard_sigmoid_calibration(model: Any, y: np.ndarray, weights: np.ndarray | None) -> int:
    """Make every Platt calibrator of a fitted CalibratedClassifierCV non-decreasing; return how many were clipped."""
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    rate = float(np.clip((w * y).sum() / w.sum(), RATE_CLIP, 1 - RATE_CLIP))
    clipped = 0
    for calibrated in getattr(model, "calibrated_classifiers_", []):
        for calibrator in calibrated.calibrators:
            if hasattr(calibrator, "a_") and calibrator.a_ > 0:   # expit(-(a f + b)) falls as f rises
                calibrator.a_, calibrator.b_ = 0.0, float(-logit(rate))
                clipped += 1
    if clipped:
        logger.info("Platt calibration: %d fold(s) had an inverted slope; clipped to a constant %.4f", clipped, rate)
    return clipped
