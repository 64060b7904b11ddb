"""Gram-Gauss-Newton: Newton-type training in the n-dimensional dual.

For outputs ``f(X)`` (``N = n * k`` values for n points of k outputs) with
Jacobian ``J`` (N x p) and many more parameters than outputs, the
Gauss-Newton step is taken through the N x N Gram matrix ``K = J J^T``
(the empirical NTK):

* mean-squared error: ``params <- params - lr * J^T (K + damping I)^{-1} r``
  with ``r = f(X) - y`` (Cai et al. 2019);
* softmax cross-entropy (generalized Gauss-Newton): with per-point softmax
  Hessians ``H`` and logit gradients ``g`` of the summed loss,
  ``params <- params - lr * J^T (H K + damping I)^{-1} g``
  (= ``(J^T H J + damping I)^{-1} J^T g``). With ``H = A^T A``,
  ``A_i = diag(sqrt p_i) - sqrt p_i p_i^T``, it is solved through the
  symmetric system ``(A K A^T + damping I) z = A K g``, then
  ``alpha = (g - A^T z) / damping``.

Solvers (``solver=``):

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

K is formed from a materialised Jacobian when ``N * p`` floats fit
``jacobian_bytes`` (built one example at a time, ``per_example=True``), else
blockwise: ``K[:, block] = J (J^T E_block)`` over blocks of dual unit
vectors sized to the same budget. The sketch likewise multiplies the
materialised J by a Gaussian matrix generated in column blocks, or takes
``sketch_size`` JVPs when J does not fit.

For the two-layer shifted-ReLU network of :mod:`alpa_py.models.sparse_mlp`,
:meth:`GramGaussNewton.step_sparse` works on a firing index: only neurons that
fire on some point enter J, ``K = (X X^T) * (F^T diag(a^2) F)`` with the
firing masks F of the union, O(n^2 |U| + n^2 d).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import time
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from alpa_py.kernels import sparse_neuron as sn

_HIGHEST = jax.lax.Precision.HIGHEST


class Solver(enum.Enum):
  CHOLESKY = "cholesky"
  CG = "cg"
  SKETCHED_CG = "sketched_cg"


class Loss(enum.Enum):
  MSE = "mse"
  CROSS_ENTROPY = "cross_entropy"


class SingularGramError(ValueError):
  """The Gram system is singular and damping <= 0. The parameters were not
  changed; from ``step_sparse``, ``.index`` and ``.state`` hold the (donated
  and returned) unchanged index and the state."""

  index = None
  state = None


class GGNState(NamedTuple):
  """Step count and the key of the random sketches."""

  count: jax.Array
  key: jax.Array


class _Operator(NamedTuple):
  """The linearization of the model at the current parameters."""

  outputs: jax.Array  # [N]
  output_shape: tuple  # the model's output shape (N values)
  jt: Callable  # alpha [N] -> J^T alpha (parameter-shaped)
  matvec: Callable  # v [N] -> J J^T v
  gram: Callable  # () -> K [N, N]
  sketch: Callable  # (key, s) -> J S^T [N, s], S Gaussian / sqrt(s)
  num_params: int


def _dense_operator(apply_fn, params, inputs, jacobian_bytes,
                    per_example=True) -> _Operator:
  fn = lambda p: apply_fn(p, inputs)
  out, vjp_fn = jax.vjp(fn, params)
  shape = out.shape
  n_out = out.size
  leaves = jax.tree_util.tree_leaves(params)
  num_params = sum(x.size for x in leaves)
  fits = n_out * num_params * 4 <= jacobian_bytes

  def jt(alpha):
    return vjp_fn(alpha.reshape(shape).astype(out.dtype))[0]

  def jvp(t):
    return jax.jvp(fn, (params,), (t,))[1].reshape(-1)

  def matvec(v):
    return jvp(jt(v))

  def flat(tree, rows):
    return jnp.concatenate([x.reshape(rows, -1)
                            for x in jax.tree_util.tree_leaves(tree)], axis=1)

  def jacobian():  # [N, p]
    if per_example:  # one small backward pass per example: O(n p) in all
      def one(x):
        x1 = jax.tree_util.tree_map(lambda a: a[None], x)
        j = jax.jacrev(lambda p: apply_fn(p, x1))(params)
        return flat(j, n_out // shape[0])
      return jax.vmap(one)(inputs).reshape(n_out, num_params)
    eye = jnp.eye(n_out, dtype=out.dtype)
    return flat(jax.vmap(jt)(eye), n_out)  # N backward passes of the batch

  def gram():
    if fits:
      J = jacobian()
      return jnp.dot(J, J.T, precision=_HIGHEST)
    # blockwise: K[:, block] = J (J^T E_block), memory block * p
    block = max(1, min(n_out, jacobian_bytes // (4 * num_params)))
    n_blocks = -(-n_out // block)
    eye = jnp.eye(n_out, dtype=out.dtype)
    eye = jnp.pad(eye, ((0, n_blocks * block - n_out), (0, 0)))
    cols = jax.lax.map(lambda e: jax.vmap(matvec)(e),
                       eye.reshape(n_blocks, block, n_out))
    return cols.reshape(-1, n_out)[:n_out].T

  def sketch(key, s):
    if fits:  # Y = J G^T, G [s, p] Gaussian generated in column blocks
      J = jacobian()
      cb = max(1, min(num_params, (64 << 20) // (4 * s)))
      nb = -(-num_params // cb)
      J = jnp.pad(J, ((0, 0), (0, nb * cb - num_params)))

      def body(i, acc):
        Jb = jax.lax.dynamic_slice_in_dim(J, i * cb, cb, axis=1)
        G = jax.random.normal(jax.random.fold_in(key, i), (s, cb), J.dtype)
        return acc + jnp.dot(Jb, G.T, precision=_HIGHEST)

      Y = jax.lax.fori_loop(0, nb, body, jnp.zeros((n_out, s), J.dtype))
      return Y / math.sqrt(s)
    keys = jax.random.split(key, len(leaves))  # matrix-free: s JVPs
    treedef = jax.tree_util.tree_structure(params)
    tangents = treedef.unflatten([
        jax.random.normal(k, (s,) + x.shape, x.dtype) / math.sqrt(s)
        for k, x in zip(keys, leaves)])
    return jax.vmap(jvp)(tangents).T

  return _Operator(out.reshape(-1), shape, jt, matvec, gram, sketch,
                   num_params)


def sparse_operator(index: sn.FiringIndex, union: sn.Union, a, b) -> _Operator:
  """The operator of ``f(x_i) = sum_r a_r relu(<w_r, x_i> - b)`` in W,
  restricted to the firing union (the other rows of J are zero)."""
  ids = union.ids
  rows = jnp.take(index.corr, ids, axis=0)  # [K, n]
  fire = (rows > b).astype(jnp.float32)
  a_u = jnp.take(a, ids, mode="fill", fill_value=0).astype(jnp.float32)
  X = index.X
  outputs = sn.forward(index, ids, a, b)

  def jt(alpha):
    return sn.transpose_apply(index, ids, a, b, alpha)  # [K, d]

  def jvp(t):  # t [K, d] -> (J t)_i = sum_r a_r F_ri <t_r, x_i>
    return jnp.sum(a_u[:, None] * fire * jnp.dot(t, X.T, precision=_HIGHEST),
                   axis=0)

  def gram():
    shared = jnp.dot(fire.T * a_u ** 2, fire, precision=_HIGHEST)
    return jnp.dot(X, X.T, precision=_HIGHEST) * shared

  def sketch(key, s):
    t = jax.random.normal(key, (s,) + (ids.shape[0], X.shape[1])) / math.sqrt(s)
    return jax.vmap(jvp)(t).T

  return _Operator(outputs, outputs.shape, jt, lambda v: jvp(jt(v)), gram,
                   sketch,
                   ids.shape[0] * X.shape[1])


class _Whitening(NamedTuple):
  """``A`` of the loss Hessian ``H = A^T A`` (identity for MSE), applied to
  a vector ``[N]`` or to the columns of a matrix ``[N, c]``."""

  apply: Callable  # v -> A v
  apply_t: Callable  # v -> A^T v


def _softmax_whitening(logits) -> _Whitening:
  # Written on explicit column batches, not with vmap(in_axes=1): under jit,
  # jax 0.10.2's CPU backend miscomputes that vmap of this reshape-reduce
  # (columns past ~50 come out wrong).
  n, k = logits.shape
  p = jax.nn.softmax(logits, axis=-1)[:, :, None]
  q = jnp.sqrt(p)

  def cols(fn):
    def run(v):
      out = fn(v.reshape(n, k, -1))
      return out.reshape(v.shape)
    return run

  apply = cols(lambda v: q * v - q * jnp.sum(p * v, 1, keepdims=True))
  apply_t = cols(lambda v: q * v - p * jnp.sum(q * v, 1, keepdims=True))
  return _Whitening(apply, apply_t)


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


@dataclasses.dataclass(frozen=True)
class GramGaussNewton:
  """The optimizer (see the module doc). Use :func:`gram_gauss_newton`."""

  apply_fn: Callable | None
  damping: float
  learning_rate: float
  solver: Solver
  sketch_size: int | None
  cg_tol: float
  cg_max_iters: int
  loss: Loss
  jacobian_bytes: int
  per_example: bool
  seed: int

  def init(self, params) -> GGNState:
    del params
    return GGNState(jnp.zeros((), jnp.int32), jax.random.PRNGKey(self.seed))

  def gram(self, params, inputs):
    """The Gram matrix ``K = J J^T`` (N x N) of the outputs, as a step forms
    it (materialised Jacobian or blockwise, by ``jacobian_bytes``)."""
    return _dense_operator(self.apply_fn, params, inputs,
                           self.jacobian_bytes, self.per_example).gram()

  # -- one step: linearize, solve, apply ------------------------------------

  def _damping_for(self, n_out: int, num_params: int) -> float:
    damping = self.damping
    if n_out > num_params:
      fallback = damping if damping > 0 else 1e-3
      warnings.warn(
          f"{n_out} outputs but only {num_params} parameters: the Gram matrix "
          f"({n_out} x {n_out}) has rank <= {num_params} and is not invertible "
          f"without damping; using damping={fallback}", stacklevel=3)
      return fallback
    if self.loss is Loss.CROSS_ENTROPY and damping <= 0:
      raise ValueError(
          f"damping (={damping}) must be > 0 with the cross-entropy loss: the "
          "softmax Hessian is singular (its rows sum to zero), so H K has no "
          "inverse without damping")
    return damping

  def _system(self, op: _Operator, targets, damping):
    """``(matvec, rhs, finish, loss, residual_norm, whitening)`` of the
    dual system ``matvec(z) = rhs``; the step's dual vector is ``finish(z)``."""
    out = op.outputs
    if self.loss is Loss.MSE:
      r = out - targets.reshape(-1).astype(out.dtype)
      loss = 0.5 * jnp.sum(jnp.square(r)) / targets.shape[0]
      matvec = lambda v: op.matvec(v) + damping * v
      return matvec, r, lambda z: z, loss, jnp.linalg.norm(r), None
    k = targets.shape[-1]
    logits = out.reshape(-1, k)
    white = _softmax_whitening(logits)
    g = (jax.nn.softmax(logits, -1) - targets).reshape(-1)
    loss = jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits, -1), -1))
    matvec = lambda v: white.apply(op.matvec(white.apply_t(v))) + damping * v
    rhs = white.apply(op.matvec(g))
    finish = lambda z: (g - white.apply_t(z)) / damping
    return matvec, rhs, finish, loss, jnp.linalg.norm(g), white

  def _gram_system(self, op: _Operator, white):
    """The explicit system matrix without damping (cholesky only)."""
    if self.solver is not Solver.CHOLESKY:
      return None
    K = op.gram()
    if white is not None:
      K = white.apply(white.apply(K).T)  # A K A^T (K symmetric)
    return K

  def _solve(self, op: _Operator, K, matvec, rhs, damping, white, key):
    n = rhs.shape[0]
    if self.solver is Solver.CHOLESKY:
      M = K + damping * jnp.eye(n, dtype=K.dtype)
      L = jnp.linalg.cholesky(M)
      z = jax.scipy.linalg.cho_solve((L, True), rhs)
      return z, jnp.int32(0), ~jnp.all(jnp.isfinite(L))
    if self.solver is Solver.CG:
      z, iters, broke = _cg(matvec, rhs, lambda r: r, self.cg_tol,
                            self.cg_max_iters)
      return z, iters, broke
    s = self.sketch_size or 2 * n
    Y = op.sketch(key, s)  # [N, s]
    if white is not None:
      Y = white.apply(Y)
    P = jnp.dot(Y, Y.T, precision=_HIGHEST) + damping * jnp.eye(n, dtype=Y.dtype)
    L = jnp.linalg.cholesky(P)
    precond = lambda r: jax.scipy.linalg.cho_solve((L, True), r)
    z, iters, broke = _cg(matvec, rhs, precond, self.cg_tol, self.cg_max_iters)
    return z, iters, broke | ~jnp.all(jnp.isfinite(L))

  def _step_traced(self, op, targets, state, damping, timed=False):
    key, sub = jax.random.split(state.key)
    matvec, rhs, finish, loss, res_norm, white = self._system(op, targets,
                                                             damping)
    K = self._gram_system(op, white)  # formed before the solve's clock
    if timed:
      t0 = _clock((rhs, K))
      # everything of the solve (the sketch too) waits for the clock
      rhs, K, sub, t0 = jax.lax.optimization_barrier((rhs, K, sub, t0))
    z, iters, broke = self._solve(op, K, matvec, rhs, damping, white, sub)
    solve_time = jnp.float32(jnp.nan)
    if timed:
      z, t1 = jax.lax.optimization_barrier((z, _clock(z)))
      solve_time = (t1[0] - t0[0]).astype(jnp.float32) + 1e-6 * (
          t1[1] - t0[1]).astype(jnp.float32)
    solve_res = jnp.linalg.norm(matvec(z) - rhs) / jnp.maximum(
        jnp.linalg.norm(rhs), 1e-30)
    singular = broke | ~jnp.all(jnp.isfinite(z))
    if damping <= 0:  # an inconsistent singular system: CG cannot converge
      singular = singular | ~(solve_res <= max(100 * self.cg_tol, 1e-3))
    alpha = jnp.where(singular, 0.0, finish(z))  # no NaNs into the weights
    info = dict(loss=loss, damping=jnp.float32(damping),
                residual_norm=res_norm, solve_residual=solve_res,
                cg_iters=iters, singular=singular, solve_time_s=solve_time)
    return alpha, GGNState(state.count + 1, key), info

  def step(self, params, state: GGNState, inputs, targets):
    """One step: ``(params, state, info)``.

    ``info``: ``loss`` and ``residual_norm`` before the step (for cross
    entropy the norm of the logit gradient), ``damping`` (the one used),
    ``solve_residual`` (relative
    residual of the linear solve), ``cg_iters``, ``singular`` and
    ``solve_time_s``: the linear solve's wall time (after the Gram matrix
    is formed; for the CG solvers it includes their J products and the
    sketch), taken by ordered host callbacks around it when the step is
    called directly (one jitted
    program); NaN when the step is traced by the caller (``jax.jit``,
    ``alpa_py.parallelize``). XLA may schedule work the solve does not wait
    for outside that window, so read it as a lower bound. Called directly,
    a singular system raises.
    """
    if self.apply_fn is None:
      raise TypeError("this optimizer was made for the sparse path; call "
                      "step_sparse, or pass apply_fn")
    targets = self._targets(targets)
    if _traced(params, inputs, targets):
      return self._step_pure(params, state, inputs, targets)
    params, state, info = _step_jit(self, params, state, inputs, targets)
    self._check_singular(info)
    return params, state, info

  def _step_pure(self, params, state, inputs, targets, timed=False):
    # shape checks and the damping choice happen while tracing: once per
    # compilation, not on every step
    op = _dense_operator(self.apply_fn, params, inputs, self.jacobian_bytes,
                         self.per_example)
    if op.output_shape != targets.shape:
      raise ValueError(f"targets have shape {tuple(targets.shape)} but the "
                       f"model's outputs have shape {op.output_shape}; they "
                       "must match (one-hot [n, k] for cross entropy)")
    if self.loss is Loss.CROSS_ENTROPY and len(op.output_shape) != 2:
      raise ValueError(f"cross entropy needs logits [n, k]; the model "
                       f"returns shape {op.output_shape}")
    damping = self._damping_for(op.outputs.shape[0], op.num_params)
    alpha, state, info = self._step_traced(op, targets, state, damping, timed)
    delta = op.jt(alpha)
    params = jax.tree_util.tree_map(
        lambda p, d: p - self.learning_rate * d.astype(p.dtype), params, delta)
    return params, state, info

  def step_sparse(self, index: sn.FiringIndex, state: GGNState, a, targets,
                  threshold, *, capacity: int | None = None):
    """One step of ``f(x_i) = sum_r a_r relu(<w_r, x_i> - b)`` over the
    training set in ``index`` (donated), touching firing neurons only.

    Returns ``(index, state, info)``; ``info`` adds ``union`` (neurons in J).
    When more than ``capacity`` neurons fire, all neurons are used (same
    result, dense cost) with a warning.
    """
    if self.loss is not Loss.MSE:
      raise ValueError("step_sparse supports the mean-squared error only")
    sn.check_threshold(threshold)
    targets = self._targets(targets)
    if targets.shape != (index.num_points,):
      raise ValueError(f"targets have shape {tuple(targets.shape)}; expected "
                       f"({index.num_points},) for the indexed points")
    if capacity is None:
      capacity = sn.choose_capacity(
          int(jnp.sum(index.neuron_max > threshold)), index.num_neurons)
    union = index.firing_union(threshold, capacity)
    if bool(union.overflow):
      warnings.warn(f"{int(union.count)} neurons fire, more than capacity "
                    f"(={capacity}); using all {index.num_neurons}",
                    stacklevel=2)
      capacity = index.num_neurons
      union = index.firing_union(threshold, capacity)
    count = int(union.count)
    if count == 0:  # J = 0: nothing to step
      warnings.warn(f"no neuron fires on any point at threshold {threshold}: "
                    "the outputs and the Jacobian are zero, the step is "
                    "skipped; lower the threshold", stacklevel=2)
      loss = 0.5 * jnp.mean(jnp.square(targets))
      info = dict(loss=loss, damping=jnp.float32(self.damping),
                  residual_norm=jnp.linalg.norm(targets),
                  solve_residual=jnp.float32(0), cg_iters=jnp.int32(0),
                  singular=jnp.bool_(False), solve_time_s=jnp.float32(0),
                  union=0)
      return index, state, info
    damping = self._damping_for(index.num_points, count * index.X.shape[1])
    index, state, info = _sparse_step_jit(self, index, union, state, a,
                                          targets, threshold, damping)
    info = dict(info, union=count)
    try:
      self._check_singular(info)
    except SingularGramError as e:  # the index was donated: hand it back
      e.index, e.state = index, state
      raise
    return index, state, info

  def _targets(self, targets):
    targets = jnp.asarray(targets)
    if self.loss is Loss.CROSS_ENTROPY and jnp.issubdtype(targets.dtype,
                                                          jnp.integer):
      raise ValueError("cross-entropy targets must be one-hot (or soft) "
                       f"labels [n, k]; got integer labels of shape "
                       f"{tuple(targets.shape)}: use jax.nn.one_hot")
    return targets.astype(jnp.float32)

  @staticmethod
  def _check_singular(info):
    if bool(info["singular"]):
      raise SingularGramError(
          f"the Gram system is singular (damping={float(info['damping'])}): "
          "duplicate or linearly dependent points, or more outputs than "
          "parameters. The "
          "parameters were not changed; use damping > 0 (e.g. 1e-6)")


def _traced(*trees) -> bool:
  return any(isinstance(x, jax.core.Tracer)
             for x in jax.tree_util.tree_leaves(trees))


def _now():
  t = time.time_ns() // 1000
  return np.array([t // 1_000_000 - _EPOCH_S, t % 1_000_000], np.int32)


_EPOCH_S = time.time_ns() // 1_000_000_000


def _clock(after):
  """Host time (seconds since import, microseconds) once ``after`` exists;
  ordered host callback, used only in single-device eager steps."""
  return io_callback(lambda _: _now(), jax.ShapeDtypeStruct((2,), jnp.int32),
                     after, ordered=True)


@functools.partial(jax.jit, static_argnums=(0,))
def _step_jit(opt, params, state, inputs, targets):
  return opt._step_pure(params, state, inputs, targets, timed=True)


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(1,))
def _sparse_step_jit(opt, index, union, state, a, targets, threshold, damping):
  op = sparse_operator(index, union, a, threshold)
  alpha, state, info = opt._step_traced(op, targets, state, damping,
                                        timed=True)
  delta = op.jt(alpha)
  rows = jnp.take(index.W, union.ids, axis=0, mode="fill", fill_value=0)
  index = index.update_masked(union.ids, rows - opt.learning_rate * delta,
                              union.valid)
  return index, state, info


def gram_gauss_newton(apply_fn: Callable | None = None, *, damping=1e-3,
                      learning_rate=1.0, solver="cholesky", sketch_size=None,
                      cg_tol=1e-6, cg_max_iters=100, loss="mse",
                      jacobian_bytes=1 << 30, per_example=True,
                      seed=0) -> GramGaussNewton:
  """The Gram-Gauss-Newton optimizer for ``apply_fn(params, inputs)``.

  Args:
    apply_fn: the model, returning ``[n]`` or ``[n, k]`` outputs (logits for
      cross entropy). ``None`` for the sparse shifted-ReLU path only.
    damping: added to the Gram matrix's diagonal (> 0 for cross entropy).
    learning_rate: step scale (1.0: the full Gauss-Newton step).
    solver: ``"cholesky"``, ``"cg"`` or ``"sketched_cg"``.
    sketch_size: rows of the Gaussian sketch (default 2N).
    cg_tol: CG stops at a relative residual of ``cg_tol``.
    cg_max_iters: CG iteration cap.
    loss: ``"mse"`` (targets like the outputs) or ``"cross_entropy"``
      (one-hot targets ``[n, k]``).
    jacobian_bytes: memory for a materialised Jacobian (else blockwise).
    per_example: the model treats examples independently (no batch
      statistics), so J is formed one example at a time (``vmap`` of
      ``jacrev`` on single examples: O(n p) work); ``False``: one VJP of
      the whole batch per output (O(N n p)).
    seed: key of the sketches.
  """
  try:
    solver_e = Solver(solver)
  except ValueError:
    raise ValueError(f"solver (={solver!r}) must be one of "
                     f"{[s.value for s in Solver]}") from None
  try:
    loss_e = Loss(loss)
  except ValueError:
    raise ValueError(f"loss (={loss!r}) must be one of "
                     f"{[s.value for s in Loss]}") from None
  if not learning_rate > 0:
    raise ValueError(f"learning_rate (={learning_rate}) must be > 0")
  if sketch_size is not None and sketch_size < 1:
    raise ValueError(f"sketch_size (={sketch_size}) must be positive")
  if cg_max_iters < 1 or not cg_tol > 0:
    raise ValueError(f"cg_max_iters (={cg_max_iters}) must be >= 1 and "
                     f"cg_tol (={cg_tol}) > 0")
  return GramGaussNewton(apply_fn, float(damping), float(learning_rate),
                         solver_e, sketch_size, float(cg_tol),
                         int(cg_max_iters), loss_e, int(jacobian_bytes),
                         bool(per_example), int(seed))
