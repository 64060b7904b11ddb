"""A mixture-of-experts layer (top-2 gating) and a small MoE transformer.

Experts are one batched weight ``[num_experts, ...]`` so that expert
parallelism is a sharding of that leading dim, which the ILP can find.
Dispatch follows GShard: each expert takes at most ``capacity`` tokens; tokens
over capacity skip the expert (their residual path carries them).

Routers (``MoELayer(router=...)``):

* ``"gshard_top2"``: each token's two most probable experts, in token
  order, dropped where the expert is full (a greedy online matching);
* ``"online_matching"``: the primal-dual online b-matching of
  :mod:`alpa_py.matching` over the same capacities: each expert keeps a
  price that rises as it fills, and a token goes to the expert of largest
  ``probability - price`` with room, so early tokens leave room for later
  tokens that want the expert more. Arrivals come in GShard's priority:
  every token's first expert in token order, then every token's second
  with what is left; a choice whose expert is full moves to the next best
  expert with room instead of being dropped. Gates are the chosen experts'
  probabilities normalised over the two, as GShard's; gradients flow
  through them (the choice itself is discrete, as in GShard).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpa_py.compiler.markers import mark_pipeline_boundary
from alpa_py.matching.router import online_matching_top2
from alpa_py.models.gpt import causal_attention

ROUTERS = ("gshard_top2", "online_matching")


class MoELayer(nn.Module):
  """Top-2 gated experts, each a two-layer MLP."""

  num_experts: int
  hidden: int
  ffn: int
  capacity_factor: float = 2.0
  group_size: int | None = None  # tokens per dispatch group (GShard)
  dtype: jnp.dtype = jnp.float32  # compute dtype (weights stay float32)
  router: str = "gshard_top2"  # or "online_matching" (see the module doc)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.router not in ROUTERS:
      raise ValueError(f"router (={self.router!r}) must be one of {ROUTERS}")
    x = x.astype(self.dtype)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # [T, H]
    g = self.group_size
    if g and x.shape[0] > g and x.shape[0] % g == 0:
      # dispatch within groups of tokens: capacity and the dispatch einsums
      # scale with the group, not with the whole batch
      y = jax.vmap(self._dispatch, in_axes=(0, None, None, None))(
          x.reshape(-1, g, shape[-1]), *self._weights())
      return y.reshape(shape)
    return self._dispatch(x, *self._weights()).reshape(shape)

  def _weights(self):
    e = self.num_experts
    gate = self.param("gate", nn.initializers.lecun_normal(), (self.hidden, e))
    w1 = self.param("w1", nn.initializers.lecun_normal(batch_axis=(0,)),
                    (e, self.hidden, self.ffn))
    w2 = self.param("w2", nn.initializers.lecun_normal(batch_axis=(0,)),
                    (e, self.ffn, self.hidden))
    return gate, w1, w2

  def _dispatch(self, x, gate_w, w1, w2):
    gate_w, w1, w2 = (w.astype(x.dtype) for w in (gate_w, w1, w2))
    t, e = x.shape[0], self.num_experts
    cap = max(1, int(self.capacity_factor * 2 * t / e))
    probs = jax.nn.softmax(x @ gate_w, axis=-1)
    if self.router == "online_matching":
      experts, slots, gates = online_matching_top2(probs, cap)
      keep1 = jax.nn.one_hot(experts[:, 0], e, dtype=x.dtype)  # -1: zeros
      keep2 = jax.nn.one_hot(experts[:, 1], e, dtype=x.dtype)
      slot1 = jax.nn.one_hot(slots[:, 0], cap, dtype=x.dtype)
      slot2 = jax.nn.one_hot(slots[:, 1], cap, dtype=x.dtype)
      top_p = gates.astype(x.dtype)
    else:
      keep1, keep2, slot1, slot2, top_p = self._gshard(probs, cap, x.dtype)
    # combine[t, e, c]: weight of token t in slot c of expert e
    combine = (top_p[:, 0, None, None] * keep1[:, :, None] * slot1[:, None, :] +
               top_p[:, 1, None, None] * keep2[:, :, None] * slot2[:, None, :])
    dispatch = (combine > 0).astype(x.dtype)
    xe = jnp.einsum("tec,th->ech", dispatch, x)
    he = jax.nn.relu(jnp.einsum("ech,ehf->ecf", xe, w1))
    ye = jnp.einsum("ecf,efh->ech", he, w2)
    return jnp.einsum("tec,ech->th", combine, ye)

  def _gshard(self, probs, cap, dtype):
    """GShard's top-2 in token order: keep masks [T, E], slots [T, cap]
    and the two gates [T, 2]."""
    e = self.num_experts
    top_p, top_i = jax.lax.top_k(probs, 2)
    top_p = top_p / top_p.sum(-1, keepdims=True)
    mask1 = jax.nn.one_hot(top_i[:, 0], e, dtype=dtype)
    mask2 = jax.nn.one_hot(top_i[:, 1], e, dtype=dtype)
    pos1 = jnp.cumsum(mask1, axis=0) - mask1
    pos2 = jnp.cumsum(mask2, axis=0) - mask2 + mask1.sum(0, keepdims=True)
    keep1 = mask1 * (pos1 < cap)
    keep2 = mask2 * (pos2 < cap)
    slot1 = jax.nn.one_hot((pos1 * keep1).sum(-1).astype(jnp.int32), cap,
                           dtype=dtype)
    slot2 = jax.nn.one_hot((pos2 * keep2).sum(-1).astype(jnp.int32), cap,
                           dtype=dtype)
    return keep1, keep2, slot1, slot2, top_p


class MoEModel(nn.Module):
  """A GShard-style MoE transformer: embedding -> blocks of [causal
  self-attention, MoE feed-forward] (every ``moe_every``-th block's
  feed-forward is MoE, the others dense) -> tied logits.

  With ``num_heads=0`` the blocks have no attention (the small test model).
  """

  vocab_size: int = 128
  hidden: int = 64
  num_experts: int = 8
  num_layers: int = 2
  num_heads: int = 0
  moe_every: int = 1
  seq_len: int = 1024
  group_size: int | None = None
  # compute dtype; parameters stay float32 (master weights)
  dtype: jnp.dtype = jnp.float32
  router: str = "gshard_top2"  # MoELayer's router
  capacity_factor: float = 2.0  # MoELayer's
  # call ``alpa_py.mark_pipeline_boundary()`` before every ``moe_every``-th
  # block (for ``ManualLayerOption``; no effect on the math)
  pipeline_boundaries: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    dt = self.dtype
    embed = nn.Embed(self.vocab_size, self.hidden, dtype=dt, name="wte")
    x = embed(tokens)
    b, s, h = x.shape
    if self.num_heads:
      pos = self.param("wpe", nn.initializers.normal(0.02), (self.seq_len, h))
      x = x + pos[None, :s].astype(dt)
    for i in range(self.num_layers):
      if self.pipeline_boundaries and i > 0 and i % self.moe_every == 0:
        mark_pipeline_boundary()
      if self.num_heads:
        x = x + _attention(nn.LayerNorm(dtype=dt)(x), self.num_heads,
                           f"attn_{i}", dt)
      y = nn.LayerNorm(dtype=dt)(x)
      if (i + 1) % self.moe_every == 0:
        x = x + MoELayer(self.num_experts, self.hidden, 4 * self.hidden,
                         capacity_factor=self.capacity_factor,
                         group_size=self.group_size, dtype=dt,
                         router=self.router, name=f"moe_{i}")(y)
      elif self.num_heads:
        y = nn.Dense(4 * h, dtype=dt, name=f"fc1_{i}")(y)
        x = x + nn.Dense(h, dtype=dt, name=f"fc2_{i}")(nn.gelu(y))
      else:
        x = x + nn.Dense(self.hidden, dtype=dt, name=f"dense_{i}")(nn.gelu(y))
    return embed.attend(nn.LayerNorm(dtype=dt)(x))


def _attention(x, num_heads, name, dtype=jnp.float32):
  b, s, h = x.shape
  qkv = nn.Dense(3 * h, dtype=dtype, name=f"{name}_qkv")(x)
  q, k, v = jnp.split(qkv.reshape(b, s, 3, num_heads, h // num_heads), 3, axis=2)
  q, k, v = (t.squeeze(2) for t in (q, k, v))
  ctx = causal_attention(q, k, v)
  return nn.Dense(h, dtype=dtype, name=f"{name}_proj")(ctx.reshape(b, s, h))
