"""L2-regularised logistic regression, fitted by Newton's method (numpy, float64).

The objective is scikit-learn's ``LogisticRegression(C=C)`` (penalty l2, intercept fitted and not
penalised): ``1/2 ||w||^2 + C sum_i log(1 + exp(-y_i (x_i . w + b)))``, ``y_i`` in {-1, +1}. It
is strictly convex, so Newton steps with a backtracking line search reach its minimum to
``tol`` in a few iterations; the result agrees with sklearn's solvers at their tolerance.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def _objective(x, y, w, b, c):
  margin = y * (x @ w + b)
  return 0.5 * w @ w + c * np.sum(np.logaddexp(0.0, -margin))


def fit_logistic_regression(x, labels, *, c: float = 1.0, tol: float = 1e-10,
                            max_iter: int = 100) -> Tuple[np.ndarray, float]:
  """``(w [F], b)`` minimising the objective above for features ``x [N, F]`` and boolean or 0/1
  ``labels [N]`` (1 = the positive class, whose decision ``x . w + b`` is high)."""
  x = np.asarray(x, np.float64)
  labels = np.asarray(labels)
  if x.ndim != 2 or labels.shape != (x.shape[0],):
    raise ValueError(f"x must be [N, F] and labels [N], got {x.shape} and {labels.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("logistic regression features contain NaN or inf")
  if not set(np.unique(labels).tolist()) <= {0, 1}:
    raise ValueError("labels must be 0/1 or boolean")
  if labels.all() or not labels.any():
    raise ValueError("logistic regression needs examples of both classes")
  if c <= 0:
    raise ValueError(f"c must be positive, got {c}")
  y = np.where(labels.astype(bool), 1.0, -1.0)
  n, f = x.shape
  xb = np.concatenate([x, np.ones((n, 1))], axis=1)
  theta = np.zeros(f + 1)
  penalty = np.r_[np.ones(f), 0.0]                  # the intercept is not penalised
  for _ in range(max_iter):
    margin = y * (xb @ theta)
    p_wrong = 0.5 * (1.0 - np.tanh(0.5 * margin))    # sigmoid(-margin), stable
    grad = penalty * theta - c * xb.T @ (y * p_wrong)
    if np.max(np.abs(grad)) <= tol * max(1.0, c * n):
      break
    hessian = np.diag(penalty) + c * (xb * (p_wrong * (1.0 - p_wrong))[:, None]).T @ xb
    step = np.linalg.solve(hessian + 1e-12 * np.eye(f + 1), grad)
    current = _objective(x, y, theta[:f], theta[f], c)
    t = 1.0
    while t > 1e-10:
      candidate = theta - t * step
      if _objective(x, y, candidate[:f], candidate[f], c) <= current - 1e-4 * t * grad @ step:
        break
      t *= 0.5
    theta = candidate
  return theta[:f], float(theta[f])
