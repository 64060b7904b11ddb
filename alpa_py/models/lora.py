"""LoRA layers over the batched multi-LoRA operator."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpa_py.kernels import lora as lora_ops


class LoRADense(nn.Module):
  """A Dense layer plus one of ``num_adapters`` LoRA updates per token.

  Attributes:
    features: output width.
    num_adapters: adapters held side by side (``lora_A``: [N, H_in, r],
      ``lora_B``: [N, r, H_out], B starting at zero as in LoRA).
    rank: adapter rank.
    alpha: the update is scaled by ``alpha / rank``.
    backend: operator backend (see ``alpa_py.kernels.lora``).
  """

  features: int
  num_adapters: int
  rank: int = 8
  alpha: float = 16.0
  backend: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, adapter_ids: jax.Array) -> jax.Array:
    y = nn.Dense(self.features, dtype=self.dtype, name="base")(x)
    h_in = x.shape[-1]
    A = self.param("lora_A", nn.initializers.normal(1.0 / h_in ** 0.5),
                   (self.num_adapters, h_in, self.rank))
    B = self.param("lora_B", nn.initializers.zeros,
                   (self.num_adapters, self.rank, self.features))
    scale = jnp.full((self.num_adapters,), self.alpha / self.rank)
    flat = x.reshape(-1, h_in)
    ids = jnp.broadcast_to(adapter_ids, x.shape[:-1]).reshape(-1)
    upd = lora_ops.bgmv(flat, A.astype(x.dtype), B.astype(x.dtype), ids, scale,
                        backend=self.backend)
    return y + upd.reshape(y.shape)


def is_lora_param(path) -> bool:
  """For ``optax.multi_transform`` labels: whether a param path is LoRA's."""
  return any(getattr(k, "key", None) in ("lora_A", "lora_B") for k in path)
