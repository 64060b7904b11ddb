"""Active linear regression: which rows of a design to label, and the fit.

Labels (profiles) are what cost; the design (every candidate's features) is
free. The rules here follow the query-complexity results for active
regression: sample rows by their leverage in an orthonormal basis of the
design's column space and reweight them (O(d log d) labels for a
constant-factor approximation of the full least-squares fit), or sample
them by a BSS-style barrier process with reweighting (Batson-Spielman-
Srivastava; randomised as in Lee-Sun and Chen-Price, O(d) labels). The basis need not be orthogonal in
the features themselves: program features are strongly collinear (FLOPs,
bytes and launches grow together), and only an orthonormal basis of their
span, computed here, is needed.

Everything is numpy (and ``scipy.optimize.nnls``, which JAX depends on):
sampling and a least-squares fit, no solver.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import nnls

RULES = ("leverage", "bss", "uniform")


@dataclasses.dataclass(frozen=True)
class Selection:
  """Rows to label and the weight of each in the fit.

  Attributes:
    rule: the rule that chose them.
    indices: distinct row indices, ascending.
    weights: importance weight of each (same order).
  """

  rule: str
  indices: np.ndarray
  weights: np.ndarray


def orthonormal_basis(a: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
  """Q (n x r) with orthonormal columns spanning the columns of ``a``.

  Columns are scaled to unit norm first, so that features in FLOPs and in
  counts weigh alike; directions with singular value below ``rtol`` times
  the largest (exact collinearity) are dropped.
  """
  norms = np.linalg.norm(a, axis=0)
  scaled = a / np.where(norms > 0, norms, 1.0)
  u, s, _ = np.linalg.svd(scaled, full_matrices=False)
  if s.size == 0 or s[0] == 0:
    return u[:, :0]
  return u[:, s > rtol * s[0]]


def leverage_scores(a: np.ndarray) -> np.ndarray:
  """Statistical leverage of every row (they sum to the rank)."""
  q = orthonormal_basis(a)
  return np.einsum("ij,ij->i", q, q)


def inclusion_probabilities(scores: np.ndarray, m: int) -> np.ndarray:
  """p_i = min(1, c s_i) with sum p = m (rows of large score always in)."""
  s = np.maximum(np.asarray(scores, float), 0) + 1e-12
  n = s.size
  if m >= n:
    return np.ones(n)
  lo, hi = 0.0, m / s.min()
  for _ in range(200):
    c = 0.5 * (lo + hi)
    if np.minimum(1.0, c * s).sum() > m:
      hi = c
    else:
      lo = c
  p = np.minimum(1.0, lo * s)
  return p * (m / p.sum()) if p.sum() > 0 else np.full(n, m / n)


def systematic_sample(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Exactly round(sum p) distinct rows, row i with probability p_i
  (systematic sampling over a random order)."""
  order = rng.permutation(p.size)
  cum = np.cumsum(p[order])
  m = int(round(cum[-1]))
  points = rng.uniform() + np.arange(m)
  picked = order[np.minimum(np.searchsorted(cum, points, side="right"),
                            p.size - 1)]
  return np.unique(picked)


def select_uniform(n: int, m: int, rng: np.random.Generator) -> Selection:
  idx = np.sort(rng.choice(n, size=m, replace=False))
  return Selection("uniform", idx, np.full(m, n / m))


def select_leverage(a: np.ndarray, m: int, rng: np.random.Generator,
                    mix: float = 0.1) -> Selection:
  """Leverage-score sampling of ``m`` distinct rows, reweighted by the
  inverse of their inclusion probability. ``mix`` of uniform keeps every
  row's weight bounded."""
  n = a.shape[0]
  tau = leverage_scores(a)
  scores = (1 - mix) * tau / max(tau.sum(), 1e-12) + mix / n
  p = inclusion_probabilities(scores, m)
  idx = systematic_sample(p, rng)
  return Selection("leverage", idx, 1.0 / p[idx])


def select_bss(a: np.ndarray, m: int, rng: np.random.Generator,
               gamma: float | None = None) -> Selection:
  """Randomised BSS (Chen and Price 2019, after Batson-Spielman-Srivastava
  and Lee-Sun): a linear-size spectral sparsifier built one sampled row at
  a time, with importance weights that keep the fit unbiased.

  Rows are ``v_i = sqrt(n) q_i`` of an orthonormal basis, so that their mean
  outer product is I. The sum ``A`` of the weighted picks stays between a
  lower and an upper barrier ``l I < A < u I``; each step draws row i with
  probability proportional to its barrier leverage
  ``a_i = v_i^T (uI - A)^-1 v_i + v_i^T (A - lI)^-1 v_i``, adds it with
  weight ``gamma / a_i`` (the inverse of its probability, up to the shared
  potential), and moves the barriers by ``gamma / Phi / (1 -+ gamma)``.
  Rows that would sit close to what is already in ``A`` have small barrier
  leverage, so a step spends its label where the model is least
  determined. Picks repeat (a repeat costs no profile); steps continue until
  ``m`` distinct rows are chosen.
  """
  q = orthonormal_basis(a)
  n, d = q.shape
  v = np.sqrt(n) * q
  gamma = min(0.5, np.sqrt(2.0 * d / max(m, 1))) if gamma is None else gamma
  u, low = 2.0 * d / gamma, -2.0 * d / gamma
  mat = np.zeros((d, d))
  weights = np.zeros(n)
  for _ in range(50 * m):
    if np.count_nonzero(weights) >= m:
      break
    lam, vec = np.linalg.eigh(mat)
    proj = (v @ vec) ** 2
    scores = proj @ (1.0 / (u - lam)) + proj @ (1.0 / (lam - low))
    phi = np.sum(1.0 / (u - lam)) + np.sum(1.0 / (lam - low))
    i = int(rng.choice(n, p=scores / scores.sum()))
    s = gamma / scores[i]
    mat += s * np.outer(v[i], v[i])
    weights[i] += s
    u += gamma / (phi * (1 - gamma))
    low += gamma / (phi * (1 + gamma))
  idx = np.flatnonzero(weights)
  return Selection("bss", idx, weights[idx])


def select(rule: str, a: np.ndarray, m: int,
           rng: np.random.Generator) -> Selection:
  """``m`` distinct rows of ``a`` by ``rule`` (one of ``RULES``)."""
  if rule == "leverage":
    return select_leverage(a, m, rng)
  if rule == "bss":
    return select_bss(a, m, rng)
  if rule == "uniform":
    return select_uniform(a.shape[0], m, rng)
  raise ValueError(f"selection rule {rule!r} must be one of {RULES}")


def fit(a: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, *,
        loss: str = "l2", nonneg: bool = True, iters: int = 30) -> np.ndarray:
  """Coefficients x minimising sum_i w_i |a_i x - y_i|^p.

  Args:
    a: the labelled rows (k x d).
    y: their labels.
    weights: importance weights (None: all 1).
    loss: ``l2`` (weighted least squares) or ``l1`` (least absolute
      deviations by iteratively reweighted least squares; robust to
      outliers such as a profile slowed by another process).
    nonneg: constrain x >= 0 (times per unit of work cannot be negative).
    iters: IRLS iterations for ``l1``.
  """
  if loss not in ("l2", "l1"):
    raise ValueError(f"loss (={loss!r}) must be 'l2' or 'l1'")
  w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
  norms = np.linalg.norm(a, axis=0)
  scale = np.where(norms > 0, norms, 1.0)
  a_s = a / scale

  def solve(row_w):
    r = np.sqrt(row_w)
    if nonneg:
      return nnls(a_s * r[:, None], y * r, maxiter=50 * a.shape[1])[0]
    return np.linalg.lstsq(a_s * r[:, None], y * r, rcond=None)[0]

  x = solve(w)
  if loss == "l1":
    for _ in range(iters):
      res = np.abs(a_s @ x - y)
      floor = max(1e-6 * np.abs(y).max(), 1e-12)
      x_new = solve(w / np.maximum(res, floor))
      if np.allclose(x_new, x, rtol=1e-7, atol=0):
        x = x_new
        break
      x = x_new
  return x / scale
