"""Linear solvers of the Gram-Gauss-Newton dual system.

The system is ``(K + damping I) z = rhs`` (whitened for cross entropy, see
:mod:`alpa_py.optim.ggn_operator`), N x N for N outputs and p parameters:

* ``cholesky``: forms K and factors the system, O(N^2 p + N^3).
* ``cg``: conjugate gradient with matrix-free products
  ``K v = J (J^T v)`` (one VJP and one JVP per iteration); K is never formed.
* ``sketched_cg``: a Gaussian sketch ``S`` (``sketch_size`` x p) of J^T
  gives ``Y = J S^T`` (``sketch_size`` JVPs); the Cholesky factor of
  ``Y Y^T + damping I`` (~ K + damping I) preconditions CG (van den Brand,
  Peng, Song, Weinstein, ITCS '21), which then needs few iterations. A
  dense Gaussian sketch costs N p s flops (more than forming K when
  s >= N); it pays where CG iterations are expensive, not in general (a
  fast Hadamard sketch, N p log p, is not implemented).
* ``nystrom_cg``: a Nystrom approximation ``K ~ F F^T`` of rank
  ``sketch_size`` preconditions CG (Frangella, Tropp, Udell, "Randomized
  Nystrom preconditioning", 2023). Its landmarks (the columns of K it is
  built from) are chosen by block randomly pivoted Cholesky (Chen, Epperly,
  Tropp, Webber, 2022): pivots drawn in proportion to the diagonal of the
  residual ``K - F F^T``, which is D^2 sampling, the k-means++ rule, in the
  feature space of the Gram kernel (the rows of J); each block of pivots
  is drawn without replacement (Gumbel top-k) and its columns come in one
  batch (``Operator.columns``: a J J^T product per pivot, J never formed;
  the diagonal from J's row norms). It costs about ``sketch_size`` such
  products plus O(N s^2), against N p s for the Gaussian sketch.

A solve runs through :func:`untimed` or :func:`timed`; the latter brackets
it with ordered host callbacks to measure its wall time, which only a step
that owns its jitted program (not one traced by the caller) can do.
"""

from __future__ import annotations

import enum
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from alpa_py.optim.ggn_operator import Operator

_HIGHEST = jax.lax.Precision.HIGHEST


class Solver(enum.Enum):
  CHOLESKY = "cholesky"
  CG = "cg"
  SKETCHED_CG = "sketched_cg"
  NYSTROM_CG = "nystrom_cg"


# pivots per block of randomly pivoted Cholesky
NYSTROM_BLOCK = 32


class SingularGramError(ValueError):
  """The Gram system is singular and damping <= 0. The parameters were not
  changed; from ``step_sparse``, ``.index`` and ``.state`` hold the (donated
  and returned) unchanged index and the state."""

  index = None
  state = None


def check_singular(info) -> None:
  """Raises :class:`SingularGramError` when a step's ``info`` flags it."""
  if bool(info["singular"]):
    raise SingularGramError(
        f"the Gram system is singular (damping={float(info['damping'])}): "
        "duplicate or linearly dependent points, or more outputs than "
        "parameters. The "
        "parameters were not changed; use damping > 0 (e.g. 1e-6)")


def system_matrix(solver: Solver, op: Operator, white):
  """The explicit system matrix without damping (cholesky only)."""
  if solver is not Solver.CHOLESKY:
    return None
  K = op.gram()
  if white is not None:
    K = white.apply(white.apply(K).T)  # A K A^T (K symmetric)
  return K


def nystrom_rank(sketch_size, n: int) -> int:
  """The Nystrom factor's rank: ``sketch_size``, default min(N, 256)."""
  return min(sketch_size or 256, n)


def solve(solver: Solver, op: Operator, K, matvec, rhs, damping, white, key, *,
          sketch_size, cg_tol, cg_max_iters, factor=None, reuse=None):
  """Solves ``matvec(z) = rhs`` (``K`` from :func:`system_matrix`):
  ``(z, cg_iterations, breakdown, nystrom factor or None)``.

  ``factor`` (nystrom_cg): an earlier step's Nystrom factor of K, used
  instead of a new one where the traced ``reuse`` is true. Any factor
  gives a symmetric positive definite preconditioner, so a stale one
  leaves the solution exact; it only converges more slowly as K drifts.
  """
  n = rhs.shape[0]
  if solver is Solver.CHOLESKY:
    M = K + damping * jnp.eye(n, dtype=K.dtype)
    L = jnp.linalg.cholesky(M)
    z = jax.scipy.linalg.cho_solve((L, True), rhs)
    return z, jnp.int32(0), ~jnp.all(jnp.isfinite(L)), None
  if solver is Solver.CG:
    z, iters, broke = _cg(matvec, rhs, lambda r: r, cg_tol, cg_max_iters)
    return z, iters, broke, None
  if solver is Solver.NYSTROM_CG:
    s = nystrom_rank(sketch_size, n)
    if factor is None:
      F = nystrom_factor(op, key, s)
    else:
      F = jax.lax.cond(reuse, lambda: factor,
                       lambda: nystrom_factor(op, key, s))
    Fw = F if white is None else white.apply(F)  # A K A^T ~ (A F) (A F)^T
    precond, ok = nystrom_preconditioner(Fw, damping)
    z, iters, broke = _cg(matvec, rhs, precond, cg_tol, cg_max_iters)
    return z, iters, broke | ~ok, F
  s = sketch_size or 2 * n
  Y = op.sketch(key, s)  # [N, s]
  if white is not None:
    Y = white.apply(Y)
  P = jnp.dot(Y, Y.T, precision=_HIGHEST) + damping * jnp.eye(n, dtype=Y.dtype)
  L = jnp.linalg.cholesky(P)
  precond = lambda r: jax.scipy.linalg.cho_solve((L, True), r)
  z, iters, broke = _cg(matvec, rhs, precond, cg_tol, cg_max_iters)
  return z, iters, broke | ~jnp.all(jnp.isfinite(L)), None


def nystrom_factor(op: Operator, key, s: int, block: int = NYSTROM_BLOCK):
  """``F`` [N, s] with ``K ~ F F^T`` by block randomly pivoted Cholesky
  (see the module doc). Pivots whose residual is numerically zero add zero
  columns (K of rank below ``s``)."""
  d = op.diag()
  n = d.shape[0]
  F = jnp.zeros((n, 0), d.dtype)
  tiny = jnp.finfo(d.dtype).tiny
  done = 0
  while done < s:
    b = min(block, s - done)
    key, sub = jax.random.split(key)
    # b pivots without replacement, each drawn in proportion to d
    logits = jnp.where(d > 0, jnp.log(jnp.maximum(d, tiny)), -jnp.inf)
    idx = jax.lax.top_k(logits + jax.random.gumbel(sub, (n,), d.dtype), b)[1]
    G = op.columns(idx) - jnp.dot(F, jnp.take(F, idx, axis=0).T,
                                  precision=_HIGHEST)
    H = jnp.take(G, idx, axis=0)
    lam, Q = jnp.linalg.eigh(0.5 * (H + H.T))
    keep = lam > 1e-6 * jnp.maximum(lam[-1], tiny)
    scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
    Fb = jnp.dot(G, Q * scale, precision=_HIGHEST)
    F = jnp.concatenate([F, Fb], axis=1)
    d = jnp.maximum(d - jnp.sum(Fb * Fb, axis=1), 0.0)
    done += b
  return F


def nystrom_preconditioner(F, damping):
  """``(apply P^{-1}, finite)`` for ``K ~ F F^T = U diag(lam) U^T``:
  ``P^{-1} = (lam_min + mu) U (diag(lam) + mu)^{-1} U^T + (I - U U^T)``
  with ``mu = damping`` and ``lam_min`` the least kept eigenvalue, which
  maps the approximated spectrum near ``lam_min + mu`` (Frangella et al.)."""
  U, sv, _ = jnp.linalg.svd(F, full_matrices=False)
  lam = sv * sv
  keep = lam > 1e-6 * jnp.maximum(lam[0], jnp.finfo(lam.dtype).tiny)
  lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
  lam_min = jnp.where(jnp.isfinite(lam_min), lam_min, 0.0)
  mu = jnp.maximum(damping, jnp.finfo(lam.dtype).eps * lam[0])
  factor = jnp.where(keep, (lam_min + mu) / (lam + mu) - 1.0, 0.0)

  def apply(r):
    return r + jnp.dot(U, factor * jnp.dot(U.T, r, precision=_HIGHEST),
                       precision=_HIGHEST)

  return apply, jnp.all(jnp.isfinite(U)) & jnp.all(jnp.isfinite(sv))


def _cg(matvec, rhs, precond, tol, max_iters):
  """Preconditioned CG; stops at ``||r|| <= tol * ||rhs||``. Returns
  ``(x, iterations, breakdown)`` (breakdown: ``p^T A p <= 0``)."""
  x = jnp.zeros_like(rhs)
  r = rhs
  z = precond(r)
  p = z
  rz = jnp.dot(r, z)
  stop = tol * jnp.linalg.norm(rhs)

  def cond(c):
    x, r, z, p, rz, i, broke = c
    return (i < max_iters) & (jnp.linalg.norm(r) > stop) & ~broke

  def body(c):
    x, r, z, p, rz, i, broke = c
    ap = matvec(p)
    pap = jnp.dot(p, ap)
    broke = ~(pap > 0)
    step = jnp.where(broke, 0.0, rz / jnp.where(broke, 1.0, pap))
    x = x + step * p
    r = r - step * ap
    z_old, z = z, precond(r)
    rz_new = jnp.dot(r, z)
    # Polak-Ribiere ("flexible") beta: robust to a preconditioner that is
    # applied inexactly in float32
    beta = jnp.dot(r, z - z_old) / jnp.where(rz == 0, 1.0, rz)
    p = z + jnp.where(broke, 0.0, jnp.maximum(beta, 0.0)) * p
    return x, r, z, p, rz_new, i + 1, broke

  x, r, z, p, rz, iters, broke = jax.lax.while_loop(
      cond, body, (x, r, z, p, rz, jnp.int32(0), jnp.bool_(False)))
  return x, iters, broke


def untimed(run, rhs, K, key):
  """``run(rhs, K, key)`` (a solve: ``(z, iters, broke, extra)``) with a
  NaN wall time before ``extra``: a step traced by its caller
  (``jax.jit``, ``alpa_py.parallelize``) cannot time itself."""
  z, iters, broke, extra = run(rhs, K, key)
  return z, iters, broke, jnp.float32(jnp.nan), extra


def timed(run, rhs, K, key):
  """``run(rhs, K, key)`` (a solve) and its wall time in seconds, taken by
  ordered host callbacks once ``rhs`` and ``K`` exist and once the solution
  does (single-device eager steps only)."""
  t0 = _clock((rhs, K))
  # everything of the solve (the sketch too) waits for the clock
  rhs, K, key, t0 = jax.lax.optimization_barrier((rhs, K, key, t0))
  z, iters, broke, extra = run(rhs, K, key)
  (z, extra), t1 = jax.lax.optimization_barrier(((z, extra), _clock(z)))
  seconds = (t1[0] - t0[0]).astype(jnp.float32) + 1e-6 * (
      t1[1] - t0[1]).astype(jnp.float32)
  return z, iters, broke, seconds, extra


def _now():
  t = time.time_ns() // 1000
  return np.array([t // 1_000_000 - _EPOCH_S, t % 1_000_000], np.int32)


_EPOCH_S = time.time_ns() // 1_000_000_000


def _clock(after):
  """Host time (seconds since import, microseconds) once ``after`` exists;
  ordered host callback, used only in single-device eager steps."""
  return io_callback(lambda _: _now(), jax.ShapeDtypeStruct((2,), jnp.int32),
                     after, ordered=True)
