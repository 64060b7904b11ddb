"""A two-layer shifted-ReLU network trained through the firing-neuron index.

``f(x) = sum_r a_r * relu(<w_r, x> - b)`` with trainable ``W[m, d]`` and
fixed output signs ``a[m]`` (as in the over-parameterization analyses this
follows). Its dense forward is :func:`dense_forward`; training on a fixed
set through a :class:`~alpa_py.kernels.firing_index.FiringIndex`, touching
only the neurons that fire, is :class:`SparseSGD` in
:mod:`alpa_py.optim.sparse_sgd` (re-exported here with its step functions).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpa_py.kernels.sparse_kernels import dense_forward as dense_forward
from alpa_py.optim.sparse_sgd import dense_sgd_step as dense_sgd_step
from alpa_py.optim.sparse_sgd import sparse_sgd_step as sparse_sgd_step
from alpa_py.optim.sparse_sgd import SparseSGD as SparseSGD
from alpa_py.optim.sparse_sgd import StepInfo as StepInfo


class SparseMLP(nn.Module):
  """Shifted-ReLU layer of ``width`` neurons with output signs ``a``.

  Variables: ``params/kernel`` ``[width, d]`` (N(0, 1) entries) and
  ``constants/a`` ``[width]`` (random signs times ``output_scale``, not
  trained). ``__call__`` is the dense forward for any inputs; training on a
  fixed set goes through :class:`SparseSGD`.
  """

  width: int
  threshold: float
  output_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    W = self.param("kernel", nn.initializers.normal(1.0),
                   (self.width, x.shape[-1]))
    a = self.variable(
        "constants", "a", lambda: self.output_scale * jax.random.rademacher(
            self.make_rng("params"), (self.width,), jnp.float32)).value
    return dense_forward(W, a, x, self.threshold)

