"""A multi-layer perceptron."""

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
  """Dense layers with ReLU between them.

  Attributes:
    features: output width of each layer (the last one has no activation).
  """

  features: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if i + 1 < len(self.features):
        x = nn.relu(x)
    return x
