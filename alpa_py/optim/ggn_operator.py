"""The Gram operator of Gram-Gauss-Newton: the model linearized in the dual.

For outputs ``f(X)`` (``N = n * k`` values) with Jacobian ``J`` (N x p), an
:class:`Operator` gives ``J^T alpha``, ``K v = J (J^T v)``, the Gram matrix
``K = J J^T``, its diagonal and chosen columns (for a Nystrom
approximation) and a Gaussian sketch ``J S^T``:

* :func:`dense_operator`, for any ``apply_fn(params, inputs)``: K is formed
  from a materialised Jacobian when ``N * p`` floats fit ``jacobian_bytes``
  (built one example at a time, ``per_example=True``), else blockwise:
  ``K[:, block] = J (J^T E_block)`` over blocks of dual unit vectors sized
  to the same budget. The sketch likewise multiplies the materialised J by a
  Gaussian matrix generated in column blocks, or takes ``sketch_size`` JVPs
  when J does not fit.
* :func:`sparse_operator`, for the two-layer shifted-ReLU network of
  :mod:`alpa_py.models.sparse_mlp` over a firing index: only neurons that
  fire on some point enter J, ``K = (X X^T) * (F^T diag(a^2) F)`` with the
  firing masks F of the union, O(n^2 |U| + n^2 d).

:func:`dual_system` turns an operator and the targets into the damped dual
system of the loss: ``(K + damping I) z = r`` for the mean-squared error;
for softmax cross-entropy the system is whitened by ``A`` of the softmax
Hessian ``H = A^T A`` (:func:`softmax_whitening`).
"""

from __future__ import annotations

import enum
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from alpa_py.kernels.firing_index import FiringIndex
from alpa_py.kernels.firing_index import Union
from alpa_py.kernels.sparse_kernels import forward
from alpa_py.kernels.sparse_kernels import transpose_apply

_HIGHEST = jax.lax.Precision.HIGHEST
# examples per block when the diagonal of K is taken one example at a time
_DIAG_EXAMPLES = 16


class Loss(enum.Enum):
  """The training loss; it shapes the dual system (:func:`dual_system`)."""

  MSE = "mse"
  CROSS_ENTROPY = "cross_entropy"


class Operator(NamedTuple):
  """The linearization of the model at the current parameters."""

  outputs: jax.Array  # [N]
  output_shape: tuple  # the model's output shape (N values)
  jt: Callable  # alpha [N] -> J^T alpha (parameter-shaped)
  matvec: Callable  # v [N] -> J J^T v
  gram: Callable  # () -> K [N, N]
  sketch: Callable  # (key, s) -> J S^T [N, s], S Gaussian / sqrt(s)
  num_params: int
  diag: Callable  # () -> diag(K) [N]
  columns: Callable  # idx [b] (int) -> K[:, idx] [N, b]


def dense_operator(apply_fn, params, inputs, jacobian_bytes,
                   per_example=True) -> Operator:
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

  def sq_norms(tree, lead):  # squared norm of each of the leading rows
    return sum(jnp.sum(jnp.square(x.reshape(lead + (-1,))), axis=-1)
               for x in jax.tree_util.tree_leaves(tree))

  def diag():
    # K_ii = |J^T e_i|^2: the squared norms of J's rows, J never stored
    if per_example:  # one example's rows at a time, in blocks of examples
      n = shape[0]
      block = max(1, min(_DIAG_EXAMPLES, n))
      n_blocks = -(-n // block)
      padded = jax.tree_util.tree_map(
          lambda a: jnp.pad(a, [(0, n_blocks * block - n)]
                            + [(0, 0)] * (a.ndim - 1)), inputs)

      def one(x):
        x1 = jax.tree_util.tree_map(lambda a: a[None], x)
        j = jax.jacrev(lambda p: apply_fn(p, x1))(params)
        return sq_norms(j, (n_out // n,))

      blocks = jax.tree_util.tree_map(
          lambda a: a.reshape((n_blocks, block) + a.shape[1:]), padded)
      d = jax.lax.map(jax.vmap(one), blocks)
      return d.reshape(-1)[:n_out]
    # one VJP of the batch per output, in blocks sized to jacobian_bytes
    block = max(1, min(n_out, jacobian_bytes // (4 * num_params)))
    n_blocks = -(-n_out // block)
    eye = jnp.pad(jnp.eye(n_out, dtype=out.dtype),
                  ((0, n_blocks * block - n_out), (0, 0)))
    d = jax.lax.map(lambda e: sq_norms(jax.vmap(jt)(e), (block,)),
                    eye.reshape(n_blocks, block, n_out))
    return d.reshape(-1)[:n_out]

  def columns(idx):  # K[:, idx] = J (J^T e_idx): a VJP and a JVP each
    return jax.vmap(matvec)(jax.nn.one_hot(idx, n_out, dtype=out.dtype)).T

  return Operator(out.reshape(-1), shape, jt, matvec, gram, sketch,
                  num_params, diag, columns)


def sparse_operator(index: FiringIndex, union: Union, a, b) -> Operator:
  """The operator of ``f(x_i) = sum_r a_r relu(<w_r, x_i> - b)`` in W,
  restricted to the firing union (the other rows of J are zero)."""
  ids = union.ids
  rows = jnp.take(index.corr, ids, axis=0)  # [K, n]
  fire = (rows > b).astype(jnp.float32)
  a_u = jnp.take(a, ids, mode="fill", fill_value=0).astype(jnp.float32)
  X = index.X
  outputs = forward(index, ids, a, b)

  def jt(alpha):
    return transpose_apply(index, ids, a, b, alpha)  # [K, d]

  def jvp(t):  # t [K, d] -> (J t)_i = sum_r a_r F_ri <t_r, x_i>
    return jnp.sum(a_u[:, None] * fire * jnp.dot(t, X.T, precision=_HIGHEST),
                   axis=0)

  def gram():
    shared = jnp.dot(fire.T * a_u ** 2, fire, precision=_HIGHEST)
    return jnp.dot(X, X.T, precision=_HIGHEST) * shared

  def sketch(key, s):
    t = jax.random.normal(key, (s,) + (ids.shape[0], X.shape[1])) / math.sqrt(s)
    return jax.vmap(jvp)(t).T

  weight = fire * a_u[:, None] ** 2  # [K, n]

  def diag():
    return jnp.sum(X * X, axis=1) * jnp.sum(weight, axis=0)

  def columns(idx):
    Xs = jnp.take(X, idx, axis=0)
    shared = jnp.dot(weight.T, jnp.take(fire, idx, axis=1), precision=_HIGHEST)
    return jnp.dot(X, Xs.T, precision=_HIGHEST) * shared

  return Operator(outputs, outputs.shape, jt, lambda v: jvp(jt(v)), gram,
                  sketch, ids.shape[0] * X.shape[1], diag, columns)


class Whitening(NamedTuple):
  """``A`` of the loss Hessian ``H = A^T A`` (identity for MSE), applied to
  a vector ``[N]`` or to the columns of a matrix ``[N, c]``."""

  apply: Callable  # v -> A v
  apply_t: Callable  # v -> A^T v


def softmax_whitening(logits) -> Whitening:
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
  return Whitening(apply, apply_t)


def dual_system(op: Operator, targets, damping, loss_kind: Loss):
  """``(matvec, rhs, finish, loss, residual_norm, whitening)`` of the
  dual system ``matvec(z) = rhs``; the step's dual vector is ``finish(z)``."""
  out = op.outputs
  if loss_kind is Loss.MSE:
    r = out - targets.reshape(-1).astype(out.dtype)
    loss = 0.5 * jnp.sum(jnp.square(r)) / targets.shape[0]
    matvec = lambda v: op.matvec(v) + damping * v
    return matvec, r, lambda z: z, loss, jnp.linalg.norm(r), None
  k = targets.shape[-1]
  logits = out.reshape(-1, k)
  white = softmax_whitening(logits)
  g = (jax.nn.softmax(logits, -1) - targets).reshape(-1)
  loss = jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits, -1), -1))
  matvec = lambda v: white.apply(op.matvec(white.apply_t(v))) + damping * v
  rhs = white.apply(op.matvec(g))
  finish = lambda z: (g - white.apply_t(z)) / damping
  return matvec, rhs, finish, loss, jnp.linalg.norm(g), white

