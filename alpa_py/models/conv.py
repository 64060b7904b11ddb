"""A small convolutional network (the shape of a Wide-ResNet stem)."""

import flax.linen as nn
import jax


class ConvNet(nn.Module):
  """conv -> relu -> conv (+ residual) -> relu -> global pool -> dense."""

  channels: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [N, H, W, C]
    x = nn.relu(nn.Conv(self.channels, (3, 3), name="conv0")(x))
    y = nn.Conv(self.channels, (3, 3), name="conv1")(x)
    x = nn.relu(x + y)
    x = nn.Conv(2 * self.channels, (3, 3), strides=(2, 2), name="conv2")(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)
