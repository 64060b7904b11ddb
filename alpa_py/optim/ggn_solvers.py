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


def solve(solver: Solver, op: Operator, K, matvec, rhs, damping, white, key, *,
          sketch_size, cg_tol, cg_max_iters):
  """Solves ``matvec(z) = rhs`` (``K`` from :func:`system_matrix`):
  ``(z, cg_iterations, breakdown)``."""
  n = rhs.shape[0]
  if solver is Solver.CHOLESKY:
    M = K + damping * jnp.eye(n, dtype=K.dtype)
    L = jnp.linalg.cholesky(M)
    z = jax.scipy.linalg.cho_solve((L, True), rhs)
    return z, jnp.int32(0), ~jnp.all(jnp.isfinite(L))
  if solver is Solver.CG:
    z, iters, broke = _cg(matvec, rhs, lambda r: r, cg_tol, cg_max_iters)
    return z, iters, broke
  s = sketch_size or 2 * n
  Y = op.sketch(key, s)  # [N, s]
  if white is not None:
    Y = white.apply(Y)
  P = jnp.dot(Y, Y.T, precision=_HIGHEST) + damping * jnp.eye(n, dtype=Y.dtype)
  L = jnp.linalg.cholesky(P)
  precond = lambda r: jax.scipy.linalg.cho_solve((L, True), r)
  z, iters, broke = _cg(matvec, rhs, precond, cg_tol, cg_max_iters)
  return z, iters, broke | ~jnp.all(jnp.isfinite(L))


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
  """``run(rhs, K, key)`` (a solve) with a NaN wall time: a step traced by
  its caller (``jax.jit``, ``alpa_py.parallelize``) cannot time itself."""
  z, iters, broke = run(rhs, K, key)
  return z, iters, broke, jnp.float32(jnp.nan)


def timed(run, rhs, K, key):
  """``run(rhs, K, key)`` (a solve) and its wall time in seconds, taken by
  ordered host callbacks once ``rhs`` and ``K`` exist and once the solution
  does (single-device eager steps only)."""
  t0 = _clock((rhs, K))
  # everything of the solve (the sketch too) waits for the clock
  rhs, K, key, t0 = jax.lax.optimization_barrier((rhs, K, key, t0))
  z, iters, broke = run(rhs, K, key)
  z, t1 = jax.lax.optimization_barrier((z, _clock(z)))
  seconds = (t1[0] - t0[0]).astype(jnp.float32) + 1e-6 * (
      t1[1] - t0[1]).astype(jnp.float32)
  return z, iters, broke, seconds


def _now():
  t = time.time_ns() // 1000
  return np.array([t // 1_000_000 - _EPOCH_S, t % 1_000_000], np.int32)


_EPOCH_S = time.time_ns() // 1_000_000_000


def _clock(after):
  """Host time (seconds since import, microseconds) once ``after`` exists;
  ordered host callback, used only in single-device eager steps."""
  return io_callback(lambda _: _now(), jax.ShapeDtypeStruct((2,), jnp.int32),
                     after, ordered=True)
