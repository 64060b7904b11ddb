"""Gradient descent on a shifted-ReLU layer through the firing-neuron index.

For ``f(x) = sum_r a_r * relu(<w_r, x> - b)`` with trainable ``W[m, d]`` and
fixed output signs ``a[m]`` (:class:`alpa_py.models.SparseMLP`) and a
training set held in a :class:`FiringIndex`, a gradient step on the
mean-squared error touches only the neurons that fire on some point:

1. the union U of firing neurons from the per-neuron maxima, O(m);
2. outputs from the stored correlations of U, O(n|U|);
3. gradients of U only, ``J_U^T e / n``, O(n|U|d);
4. the new rows of U written back and their correlations recomputed, O(n|U|d).

That is the dense gradient step exactly (the other neurons have zero
gradient): :func:`dense_sgd_step` is the plain ``jax.jit`` version it is
tested against. When more than ``capacity`` neurons fire, the step runs
densely instead (same result) and :class:`SparseSGD` warns and grows the
capacity for the following steps.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from alpa_py.kernels.firing_index import check_threshold
from alpa_py.kernels.firing_index import choose_capacity
from alpa_py.kernels.firing_index import FiringIndex
from alpa_py.kernels.sparse_kernels import dense_forward
from alpa_py.kernels.sparse_kernels import forward
from alpa_py.kernels.sparse_kernels import transpose_apply


@jax.jit
def dense_sgd_step(W, a, X, y, b, lr):
  """One plain gradient step on ``0.5 * mean((f(X) - y)^2)``: O(nmd)."""

  def loss_fn(W):
    return 0.5 * jnp.mean(jnp.square(dense_forward(W, a, X, b) - y))

  loss, g = jax.value_and_grad(loss_fn)(W)
  return W - lr * g, loss


class StepInfo(NamedTuple):
  """What a sparse step touched: ``union`` neurons fired on some point,
  ``pairs`` (point, neuron) firings in all, ``dense`` the step ran densely
  because ``union`` exceeded the capacity."""

  union: jax.Array
  pairs: jax.Array
  dense: jax.Array


@functools.partial(jax.jit, static_argnames=("backend",), donate_argnums=(0,))
def _step_on(index: FiringIndex, ids, valid, a, y, b, lr, backend):
  f = forward(index, ids, a, b, backend=backend)
  err = f - y
  loss = 0.5 * jnp.mean(jnp.square(err))
  grad = transpose_apply(index, ids, a, b, err / y.shape[0],
                            backend=backend)
  rows = jnp.take(index.W, ids, axis=0, mode="fill", fill_value=0)
  pairs = jnp.sum(jnp.take(index.corr, ids, axis=0) > b)
  return index.update_masked(ids, rows - lr * grad, valid), loss, pairs


def sparse_sgd_step(index: FiringIndex, a, y, b, lr, *, capacity: int,
                    backend: str = "auto"):
  """One gradient step through the index (donated); see the module doc.

  The union is found first (a small jitted program, O(m)); its size is read
  on the host to choose the sparse program or, when it exceeds ``capacity``,
  the dense one (``lax.cond`` would make XLA copy the index every step).

  Returns ``(index, loss, StepInfo)``; ``loss`` is the loss before the step.
  """
  union = index.firing_union(b, capacity)
  dense = bool(union.overflow)
  if dense:
    ids = jnp.arange(index.num_neurons, dtype=jnp.int32)
    index, loss, pairs = _step_on(index, ids, jnp.ones(ids.shape, bool), a, y,
                                  b, lr, "reference")
  else:
    index, loss, pairs = _step_on(index, union.ids, union.valid, a, y, b, lr,
                                  backend)
  return index, loss, StepInfo(union.count, pairs, dense)


@dataclasses.dataclass
class SparseSGD:
  """Gradient descent on a :class:`~alpa_py.models.SparseMLP` over a
  training set in an index.

  Attributes:
    model: the layer (its ``threshold`` is ``b``).
    learning_rate: step size.
    capacity: union slots (default: :func:`choose_capacity` of the first
      union). Grown the same way after a step that overflowed.
    backend: operator backend (``auto``: the jnp reference; ``pallas``: the
      Pallas kernels, interpreted off GPU).
  """

  # a SparseMLP, not imported: alpa_py.models imports this module
  model: Any
  learning_rate: float
  capacity: int | None = None
  backend: str = "auto"
  _warned: bool = dataclasses.field(default=False, repr=False)

  def init(self, variables, X, *, block: int = 128) -> FiringIndex:
    """Builds the index of the training set ``X`` (O(nmd), once)."""
    check_threshold(self.model.threshold)
    W = variables["params"]["kernel"]
    if X.ndim != 2 or X.shape[1] != W.shape[1]:
      raise ValueError(f"X has shape {tuple(X.shape)}; expected (n, "
                       f"{W.shape[1]}) for a kernel of shape {tuple(W.shape)}")
    index = FiringIndex.build(W, X, block=block)
    if self.capacity is None:
      count = int(jnp.sum(index.neuron_max > self.model.threshold))
      self.capacity = choose_capacity(count, index.num_neurons)
    return index

  def step(self, index, variables, y):
    """One step; returns ``(index, loss, StepInfo)`` (the old index is
    donated: do not use it afterwards). Blocks on the result."""
    if self.capacity is None:
      raise ValueError("SparseSGD.step before init: call "
                       "index = opt.init(variables, X) first (it picks the "
                       "union capacity), or pass capacity=")
    if y.shape != (index.num_points,):
      raise ValueError(f"y has shape {tuple(y.shape)}; expected "
                       f"({index.num_points},), one target per indexed point")
    a = variables["constants"]["a"]
    index, loss, info = sparse_sgd_step(
        index, a, y, jnp.float32(self.model.threshold),
        jnp.float32(self.learning_rate), capacity=self.capacity,
        backend=self.backend)
    if bool(info.dense):
      union = int(info.union)
      if not self._warned:
        self._warned = True
        warnings.warn(
            f"{union} neurons fired, more than the union capacity "
            f"(={self.capacity}); the step ran densely (same result). "
            "Capacity grows for the next steps; pass a larger `capacity` "
            "or a larger threshold to stay sparse", stacklevel=2)
      self.capacity = choose_capacity(union, index.num_neurons)
    return index, loss, info

  @staticmethod
  def variables(variables, index):
    """``variables`` with (a copy of) the kernel trained in ``index``; a
    copy, since the next step donates the index's buffers."""
    params = dict(variables["params"], kernel=jnp.array(index.W, copy=True))
    return dict(variables, params=params)
