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

A step linearizes the model (:mod:`alpa_py.optim.ggn_operator`: the Gram
operator, how K and its sketch are formed), solves the dual system
(:mod:`alpa_py.optim.ggn_solvers`: ``solver="cholesky"``, ``"cg"``,
``"sketched_cg"`` or ``"nystrom_cg"``) and applies ``J^T alpha``. Two
optimizer types share the settings and that step:

* :class:`GramGaussNewton`, for a model ``apply_fn(params, inputs)``:
  :meth:`~GramGaussNewton.step`;
* :class:`SparseGramGaussNewton`, with no model, for the two-layer
  shifted-ReLU network of :mod:`alpa_py.models.sparse_mlp` only.

Both take :meth:`~SparseGramGaussNewton.step_sparse` on that network: it
works on a firing index, and only neurons that fire on some point enter J.
:func:`gram_gauss_newton` makes either (``apply_fn=None``: the sparse one).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from alpa_py.kernels.firing_index import check_threshold
from alpa_py.kernels.firing_index import choose_capacity
from alpa_py.kernels.firing_index import FiringIndex
from alpa_py.optim import ggn_solvers
from alpa_py.optim.ggn_operator import dense_operator
from alpa_py.optim.ggn_operator import dual_system
from alpa_py.optim.ggn_operator import Loss
from alpa_py.optim.ggn_operator import Operator
from alpa_py.optim.ggn_operator import sparse_operator
from alpa_py.optim.ggn_solvers import check_singular
from alpa_py.optim.ggn_solvers import SingularGramError
from alpa_py.optim.ggn_solvers import Solver


class GGNState(NamedTuple):
  """Step count, the key of the random sketches and (``nystrom_cg`` with
  ``nystrom_refresh > 1``) the last Nystrom factor of the Gram matrix."""

  count: jax.Array
  key: jax.Array
  factor: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _DualStep:
  """The settings and the step both optimizer types share (see the module
  doc): linearize, solve the dual system, apply; and the sparse step."""

  damping: float
  learning_rate: float
  solver: Solver
  sketch_size: int | None
  cg_tol: float
  cg_max_iters: int
  loss: Loss
  seed: int
  nystrom_refresh: int

  def init(self, params) -> GGNState:
    del params
    return GGNState(jnp.zeros((), jnp.int32), jax.random.PRNGKey(self.seed))

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

  def _step_traced(self, op: Operator, targets, state, damping, run_solve):
    """The dual vector ``alpha`` of a step, the next state and ``info``.

    ``run_solve`` runs the solve: :func:`ggn_solvers.timed` when the step
    owns its jitted program, else :func:`ggn_solvers.untimed`.
    """
    key, sub = jax.random.split(state.key)
    matvec, rhs, finish, loss, res_norm, white = dual_system(op, targets,
                                                             damping, self.loss)
    # formed outside run_solve: a timed step's clock leaves it out
    K = ggn_solvers.system_matrix(self.solver, op, white)
    factor = reuse = None
    if (self.solver is Solver.NYSTROM_CG and self.nystrom_refresh > 1 and
        state.factor is not None and state.factor.shape ==
        (rhs.shape[0], ggn_solvers.nystrom_rank(self.sketch_size,
                                                rhs.shape[0]))):
      factor = state.factor  # rebuilt every nystrom_refresh steps
      reuse = state.count % self.nystrom_refresh != 0
    z, iters, broke, solve_time, factor = run_solve(
        lambda rhs, K, key: ggn_solvers.solve(
            self.solver, op, K, matvec, rhs, damping, white, key,
            sketch_size=self.sketch_size, cg_tol=self.cg_tol,
            cg_max_iters=self.cg_max_iters, factor=factor, reuse=reuse),
        rhs, K, sub)
    if self.nystrom_refresh <= 1:
      factor = None  # not kept: the state stays as small as before
    solve_res = jnp.linalg.norm(matvec(z) - rhs) / jnp.maximum(
        jnp.linalg.norm(rhs), 1e-30)
    singular = broke | ~jnp.all(jnp.isfinite(z))
    if damping <= 0:  # an inconsistent singular system: CG cannot converge
      singular = singular | ~(solve_res <= max(100 * self.cg_tol, 1e-3))
    alpha = jnp.where(singular, 0.0, finish(z))  # no NaNs into the weights
    info = dict(loss=loss, damping=jnp.float32(damping),
                residual_norm=res_norm, solve_residual=solve_res,
                cg_iters=iters, singular=singular, solve_time_s=solve_time)
    return alpha, GGNState(state.count + 1, key, factor), info

  def step_sparse(self, index: FiringIndex, state: GGNState, a, targets,
                  threshold, *, capacity: int | None = None):
    """One step of ``f(x_i) = sum_r a_r relu(<w_r, x_i> - b)`` over the
    training set in ``index`` (donated), touching firing neurons only.

    Returns ``(index, state, info)``; ``info`` adds ``union`` (neurons in J).
    When more than ``capacity`` neurons fire, all neurons are used (same
    result, dense cost) with a warning.
    """
    if self.loss is not Loss.MSE:
      raise ValueError("step_sparse supports the mean-squared error only")
    check_threshold(threshold)
    targets = self._targets(targets)
    if targets.shape != (index.num_points,):
      raise ValueError(f"targets have shape {tuple(targets.shape)}; expected "
                       f"({index.num_points},) for the indexed points")
    if capacity is None:
      capacity = choose_capacity(
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
      check_singular(info)
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


@dataclasses.dataclass(frozen=True)
class SparseGramGaussNewton(_DualStep):
  """The optimizer without a model: :meth:`step_sparse` only (see the module
  doc). Use :func:`gram_gauss_newton` with ``apply_fn=None``."""

  def step(self, params, state, inputs, targets):
    """Not available without a model: raises a ``TypeError`` that says so
    (rather than an ``AttributeError`` that does not say why)."""
    del params, state, inputs, targets
    raise TypeError("this optimizer was made for the sparse path; call "
                    "step_sparse, or pass apply_fn")


@dataclasses.dataclass(frozen=True)
class GramGaussNewton(_DualStep):
  """The optimizer (see the module doc). Use :func:`gram_gauss_newton`."""

  apply_fn: Callable
  jacobian_bytes: int
  per_example: bool

  def gram(self, params, inputs):
    """The Gram matrix ``K = J J^T`` (N x N) of the outputs, as a step forms
    it (materialised Jacobian or blockwise, by ``jacobian_bytes``)."""
    return dense_operator(self.apply_fn, params, inputs,
                          self.jacobian_bytes, self.per_example).gram()

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
    targets = self._targets(targets)
    if _traced(params, inputs, targets):
      return self._step_pure(params, state, inputs, targets)
    params, state, info = _step_jit(self, params, state, inputs, targets)
    check_singular(info)
    return params, state, info

  def _step_pure(self, params, state, inputs, targets,
                 run_solve=ggn_solvers.untimed):
    # shape checks and the damping choice happen while tracing: once per
    # compilation, not on every step
    op = dense_operator(self.apply_fn, params, inputs, self.jacobian_bytes,
                        self.per_example)
    if op.output_shape != targets.shape:
      raise ValueError(f"targets have shape {tuple(targets.shape)} but the "
                       f"model's outputs have shape {op.output_shape}; they "
                       "must match (one-hot [n, k] for cross entropy)")
    if self.loss is Loss.CROSS_ENTROPY and len(op.output_shape) != 2:
      raise ValueError(f"cross entropy needs logits [n, k]; the model "
                       f"returns shape {op.output_shape}")
    damping = self._damping_for(op.outputs.shape[0], op.num_params)
    alpha, state, info = self._step_traced(op, targets, state, damping,
                                           run_solve)
    delta = op.jt(alpha)
    params = jax.tree_util.tree_map(
        lambda p, d: p - self.learning_rate * d.astype(p.dtype), params, delta)
    return params, state, info


def _traced(*trees) -> bool:
  return any(isinstance(x, jax.core.Tracer)
             for x in jax.tree_util.tree_leaves(trees))


@functools.partial(jax.jit, static_argnums=(0,))
def _step_jit(opt, params, state, inputs, targets):
  return opt._step_pure(params, state, inputs, targets, ggn_solvers.timed)


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(1,))
def _sparse_step_jit(opt, index, union, state, a, targets, threshold, damping):
  op = sparse_operator(index, union, a, threshold)
  alpha, state, info = opt._step_traced(op, targets, state, damping,
                                        ggn_solvers.timed)
  delta = op.jt(alpha)
  rows = jnp.take(index.W, union.ids, axis=0, mode="fill", fill_value=0)
  index = index.update_masked(union.ids, rows - opt.learning_rate * delta,
                              union.valid)
  return index, state, info


def gram_gauss_newton(apply_fn: Callable | None = None, *, damping=1e-3,
                      learning_rate=1.0, solver="cholesky", sketch_size=None,
                      cg_tol=1e-6, cg_max_iters=100, loss="mse",
                      jacobian_bytes=1 << 30, per_example=True,
                      seed=0, nystrom_refresh=1
                      ) -> GramGaussNewton | SparseGramGaussNewton:
  """The Gram-Gauss-Newton optimizer for ``apply_fn(params, inputs)``.

  Args:
    apply_fn: the model, returning ``[n]`` or ``[n, k]`` outputs (logits for
      cross entropy). ``None`` for the sparse shifted-ReLU path only (a
      :class:`SparseGramGaussNewton`).
    damping: added to the Gram matrix's diagonal (> 0 for cross entropy).
    learning_rate: step scale (1.0: the full Gauss-Newton step).
    solver: ``"cholesky"``, ``"cg"``, ``"sketched_cg"`` or
      ``"nystrom_cg"``.
    sketch_size: rows of the Gaussian sketch (default 2N), or the rank of
      the Nystrom preconditioner (default min(N, 256)).
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
    nystrom_refresh: ``nystrom_cg`` builds its factor every this many steps
      and preconditions the steps between with the last one (kept in the
      state). A stale factor still gives a positive definite
      preconditioner, so the steps are as exact; it pays off when the
      examples stay the same from step to step (full batch), where the
      Gram matrix drifts slowly.
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
  if int(nystrom_refresh) < 1:
    raise ValueError(f"nystrom_refresh (={nystrom_refresh}) must be >= 1")
  if cg_max_iters < 1 or not cg_tol > 0:
    raise ValueError(f"cg_max_iters (={cg_max_iters}) must be >= 1 and "
                     f"cg_tol (={cg_tol}) > 0")
  settings = dict(damping=float(damping), learning_rate=float(learning_rate),
                  solver=solver_e, sketch_size=sketch_size,
                  cg_tol=float(cg_tol), cg_max_iters=int(cg_max_iters),
                  loss=loss_e, seed=int(seed),
                  nystrom_refresh=int(nystrom_refresh))
  if apply_fn is None:
    return SparseGramGaussNewton(**settings)
  return GramGaussNewton(**settings, apply_fn=apply_fn,
                         jacobian_bytes=int(jacobian_bytes),
                         per_example=bool(per_example))
