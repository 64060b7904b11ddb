"""Wide-ResNet (bottleneck blocks), as in Alpa's benchmark suite.

GroupNorm stands in for BatchNorm so that the training step is a pure
function of (params, batch) (no running statistics to thread through).
"""


import flax.linen as nn
import jax
import jax.numpy as jnp

from alpa_py.compiler.markers import mark_pipeline_boundary

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 26: (2, 2, 2, 2),
          8: (1, 1, 1, 1)}


class Bottleneck(nn.Module):
  channels: int
  width: int
  stride: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    mid = self.channels * self.width
    out_ch = self.channels * 4
    norm = lambda name: nn.GroupNorm(num_groups=min(32, mid // 4) or 1,
                                     dtype=self.dtype, name=name)
    y = nn.Conv(mid, (1, 1), use_bias=False, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm("norm1")(y))
    y = nn.Conv(mid, (3, 3), strides=(self.stride, self.stride), use_bias=False,
                dtype=self.dtype, name="conv2")(y)
    y = nn.relu(norm("norm2")(y))
    y = nn.Conv(out_ch, (1, 1), use_bias=False, dtype=self.dtype, name="conv3")(y)
    if x.shape[-1] != out_ch or self.stride != 1:
      x = nn.Conv(out_ch, (1, 1), strides=(self.stride, self.stride),
                  use_bias=False, dtype=self.dtype, name="proj")(x)
    return nn.relu(x + y)


class WideResNet(nn.Module):
  """Stem conv, four stages of bottlenecks, global pool, classifier.

  Attributes:
    depth: 50 or 101 (ResNet layouts), or 26 / 8 for small variants.
    base_channels: channels of the first stage (doubling per stage).
    width_factor: bottleneck widening.
    num_classes: classifier outputs.
    pipeline_boundaries: call ``alpa_py.mark_pipeline_boundary()`` before
      every bottleneck block but the first (the stem goes with the first
      block, the pool and classifier with the last).
  """

  depth: int = 50
  base_channels: int = 64
  width_factor: int = 2
  num_classes: int = 1000
  dtype: jnp.dtype = jnp.float32
  pipeline_boundaries: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [N, H, W, 3]
    if self.depth not in DEPTHS:
      raise ValueError(f"depth (={self.depth}) must be one of {sorted(DEPTHS)}")
    c = self.base_channels
    x = nn.Conv(c, (7, 7), strides=(2, 2), use_bias=False, dtype=self.dtype,
                name="stem")(x)
    x = nn.relu(x)
    for stage, blocks in enumerate(DEPTHS[self.depth]):
      for b in range(blocks):
        stride = 2 if (b == 0 and stage > 0) else 1
        if self.pipeline_boundaries and (stage, b) != (0, 0):
          mark_pipeline_boundary()
        x = Bottleneck(c * 2 ** stage, self.width_factor, stride, self.dtype,
                       name=f"stage{stage}_block{b}")(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
