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
tested against. The whole step is one program on the device (no host
read of the union size). When more than ``capacity`` neurons fire, the
step goes through the union in several runs of ``capacity`` (same result),
and :class:`SparseSGD`, reading each step's size one step behind, warns
and grows the capacity for the following steps.
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
from alpa_py.kernels.sparse_kernels import resolve_backend as _resolve
from alpa_py.kernels.sparse_kernels import step_sizes


@jax.jit
def dense_sgd_step(W, a, X, y, b, lr):
  """One plain gradient step on ``0.5 * mean((f(X) - y)^2)``: O(nmd)."""

  def loss_fn(W):
    return 0.5 * jnp.mean(jnp.square(dense_forward(W, a, X, b) - y))

  loss, g = jax.value_and_grad(loss_fn)(W)
  return W - lr * g, loss


class StepInfo(NamedTuple):
  """What a sparse step touched: ``union`` neurons fired on some point,
  ``pairs`` (point, neuron) firings in all, ``overflow`` the union exceeded
  the capacity, so the step went through it in ``ceil(union / capacity)``
  chunks of the capacity (the same result, more passes)."""

  union: jax.Array
  pairs: jax.Array
  overflow: jax.Array

  @property
  def dense(self):
    """The former name of ``overflow`` (the step used to run densely)."""
    return self.overflow


def _chunk(fires, rank, c, capacity: int, num_neurons: int):
  """Ids (padded with the padding row ``num_neurons``) and validity of the
  ``c``-th run of ``capacity`` firing neurons, ascending: O(m)."""
  slot = rank - c * capacity
  slot = jnp.where(fires & (slot >= 0) & (slot < capacity), slot, capacity)
  ids = jnp.full((capacity,), num_neurons, jnp.int32).at[slot].set(
      jnp.arange(fires.shape[0], dtype=jnp.int32), mode="drop")
  return ids, ids < num_neurons


@functools.partial(jax.jit, static_argnames=("capacity", "backend"),
                   donate_argnums=(0,))
def _device_step(index: FiringIndex, a, y, b, lr, capacity: int, backend: str):
  m = index.num_neurons
  fires = index.neuron_max[:m] > b  # the union, from the per-neuron maxima
  count = fires.sum(dtype=jnp.int32)
  rank = jnp.cumsum(fires, dtype=jnp.int32) - 1
  chunks = (count + capacity - 1) // capacity  # 1 unless the union overflows

  # the first run's ids serve both passes (one O(m) compaction); further
  # runs, only on overflow, compact again
  first = _chunk(fires, rank, 0, capacity, m)

  def add_outputs(c, f):
    ids, _ = _chunk(fires, rank, c, capacity, m)
    return f + forward(index, ids, a, b, backend=backend)

  f = jax.lax.fori_loop(1, chunks, add_outputs,
                        forward(index, first[0], a, b, backend=backend))
  err = f - y
  loss = 0.5 * jnp.mean(jnp.square(err))
  v = err / y.shape[0]

  def update_run(index, pairs, ids, valid):
    # distinct neurons per run: a run's update never changes the rows a
    # later run reads, and the union was fixed before any update
    grad = transpose_apply(index, ids, a, b, v, backend=backend)
    rows = jnp.take(index.W, ids, axis=0, mode="fill", fill_value=0)
    pairs = pairs + jnp.sum(jnp.take(index.corr, ids, axis=0) > b)
    return index.update_masked(ids, rows - lr * grad, valid), pairs

  def update(c, carry):
    return update_run(*carry, *_chunk(fires, rank, c, capacity, m))

  index, pairs = jax.lax.fori_loop(
      1, chunks, update, update_run(index, jnp.zeros((), jnp.int32), *first))
  return index, loss, StepInfo(count, pairs, count > capacity)


def sparse_sgd_step(index: FiringIndex, a, y, b, lr, *, capacity: int,
                    backend: str = "auto"):
  """One gradient step through the index (donated); see the module doc.

  One program, no host round trip: the union is found on the device from
  the per-neuron maxima (O(m)) and gone through in runs of ``capacity``
  neurons (one run unless it overflows; an overflowing union takes more
  runs of the same program, so the result is exact and nothing
  recompiles). ``capacity`` sizes the compiled buffers: read
  ``info.overflow`` (asynchronously, as :class:`SparseSGD` does one step
  behind) to grow it.

  Returns ``(index, loss, StepInfo)``; ``loss`` is the loss before the step.
  """
  if int(capacity) < 1:
    raise ValueError(f"capacity (={capacity}) must be >= 1")
  capacity = min(int(capacity), index.num_neurons)
  return _device_step(index, a, y, b, lr, capacity,
                      _resolve(backend, step_sizes(index, capacity)))


@dataclasses.dataclass
class SparseSGD:
  """Gradient descent on a :class:`~alpa_py.models.SparseMLP` over a
  training set in an index.

  Attributes:
    model: the layer (its ``threshold`` is ``b``).
    learning_rate: step size.
    capacity: union slots (default: :func:`choose_capacity` of the first
      union). Grown the same way after a step that overflowed.
    backend: operator backend (``auto``: the one recorded fastest on this
      device kind, else the jnp reference; ``pallas``: the Pallas kernels,
      interpreted off GPU; ``reference``).
  """

  # a SparseMLP, not imported: alpa_py.models imports this module
  model: Any
  learning_rate: float
  capacity: int | None = None
  backend: str = "auto"
  _warned: bool = dataclasses.field(default=False, repr=False)
  _previous: Any = dataclasses.field(default=None, repr=False)

  def init(self, variables, X, *, block: int = 128) -> FiringIndex:
    """Builds the index of the training set ``X`` (O(nmd), once)."""
    check_threshold(self.model.threshold)
    W = variables["params"]["kernel"]
    self._previous = None  # a new index: nothing pending
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
    donated: do not use it afterwards).

    The step is one program with no host round trip; it is dispatched
    before the previous step's ``info`` is read (one step behind, while
    this one runs), and when that union overflowed the capacity, it grows
    for the following steps (the overflowing steps themselves are exact).
    """
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
    previous, self._previous = self._previous, info
    if previous is not None:
      self._grow(previous, index.num_neurons)
    return index, loss, info

  def sync(self, num_neurons: int) -> None:
    """Reads the last step's ``info`` now (blocking) instead of at the next
    step, growing the capacity if that union overflowed."""
    previous, self._previous = self._previous, None
    if previous is not None:
      self._grow(previous, num_neurons)

  def _grow(self, info: StepInfo, num_neurons: int) -> None:
    if not bool(info.overflow):
      return
    union = int(info.union)
    if not self._warned:
      self._warned = True
      warnings.warn(
          f"{union} neurons fired, more than the union capacity "
          f"(={self.capacity}); the step went through them in "
          f"{-(-union // self.capacity)} runs of the capacity (same result). "
          "Capacity grows for the next steps; pass a larger `capacity` "
          "or a larger threshold to stay in one run", stacklevel=3)
    self.capacity = max(self.capacity, choose_capacity(union, num_neurons))

  @staticmethod
  def variables(variables, index):
    """``variables`` with (a copy of) the kernel trained in ``index``; a
    copy, since the next step donates the index's buffers."""
    params = dict(variables["params"], kernel=jnp.array(index.W, copy=True))
    return dict(variables, params=params)
