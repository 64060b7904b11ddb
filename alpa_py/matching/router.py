"""The MoE router's online matching, in JAX: tokens (arrivals, in order)
to experts (items with one capacity each), up to two experts per token, by
the primal-dual rule of :mod:`alpa_py.matching.online` (weights: the gate
probabilities). ``alpa_py.models.MoELayer(router="online_matching")`` uses
it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def online_matching_top2(probs, capacity: int, decline: bool = False,
                         first_choices_first: bool = True):
  """Primal-dual online assignment of tokens (rows of ``probs [T, E]``, in
  order) to up to two experts of ``capacity`` slots each. A token goes to
  the expert of largest ``probability - price`` with room; with
  ``decline``, only when that is positive (the b-matching rule, which
  holds capacity back for later, more valuable arrivals); without (the
  router's default), whenever an expert has room, since a token no expert
  takes only rides the residual and unused capacity is lost.

  With ``first_choices_first`` (the default, GShard's priority), arrivals
  come in two rounds: every token's first expert, in token order, then
  every token's second expert with the capacity and prices the first round
  left; otherwise each token takes both of its experts before the next
  token arrives, and early tokens' second choices can fill experts that
  later tokens want first (at capacity factor 1 that kept 1.3% more gate
  mass but trained worse than GShard on MoE-small: benchmarks/README.md).

  Returns ``(experts [T, 2], slots [T, 2], gates [T, 2])``: expert ids (-1
  where the token got no second or first expert), the slot each took in
  its expert, and the gates (probabilities of the two picks normalised
  over them; differentiable in ``probs``)."""
  t, e = probs.shape
  c = float(capacity)
  growth = 1.0 + 1.0 / c
  step = 1.0 / ((growth ** c - 1.0) * c)  # Feldman et al.'s price update
  frozen = jax.lax.stop_gradient(probs).astype(jnp.float32)

  def pick(fill, beta, w, banned):
    gain = jnp.where((fill < capacity) & ~banned, w - beta, -jnp.inf)
    j = jnp.argmax(gain)
    ok = gain[j] > 0 if decline else gain[j] > -jnp.inf
    slot = fill[j]
    fill = fill.at[j].add(ok.astype(fill.dtype))
    beta = beta.at[j].set(jnp.where(ok, beta[j] * growth + w[j] * step,
                                    beta[j]))
    return fill, beta, jnp.where(ok, j, -1), slot, j

  init = (jnp.zeros((e,), jnp.int32), jnp.zeros((e,), jnp.float32))
  none = jnp.zeros((e,), bool)
  if first_choices_first:
    def first(carry, w):
      fill, beta, j, s, a = pick(*carry, w, none)
      return (fill, beta), (j, s, a)

    def second(carry, wa):
      w, a1 = wa
      fill, beta, j, s, a = pick(*carry, w, none.at[a1].set(True))
      return (fill, beta), (j, s, a)

    carry, (j1, s1, a1) = jax.lax.scan(first, init, frozen)
    _, (j2, s2, a2) = jax.lax.scan(second, carry, (frozen, a1))
    experts = jnp.stack([j1, j2], 1)
    slots = jnp.stack([s1, s2], 1)
    asked = jnp.stack([a1, a2], 1)
  else:
    def body(carry, w):
      fill, beta = carry
      fill, beta, j1, s1, a1 = pick(fill, beta, w, none)
      fill, beta, j2, s2, a2 = pick(fill, beta, w, none.at[a1].set(True))
      return (fill, beta), (jnp.stack([j1, j2]), jnp.stack([s1, s2]),
                            jnp.stack([a1, a2]))

    _, (experts, slots, asked) = jax.lax.scan(body, init, frozen)
  p = jnp.take_along_axis(probs, asked, axis=1)
  gates = p / p.sum(-1, keepdims=True)
  return experts, slots, gates
