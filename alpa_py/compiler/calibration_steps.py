"""Whole training steps as calibration candidates (``calibration_pool``'s
``step`` family).

A single op or layer leaves out what a training step adds around it: the
optimizer update over every parameter (a long elementwise chain), the
gradient synchronisation of a whole model, the many small kernels and
collectives of several layers in one program. These candidates are the
step of a small pre-norm transformer (attention + MLP blocks, Adam) under
the baseline plans the compiler makes: data parallel (state replicated),
ZeRO-style (optimizer state and parameters split over the devices),
Megatron-style (attention heads and the MLP's hidden dim split over the
mesh's second axis, the batch over its first) and replicated.

Arguments are flat (``x``, then per parameter: value, Adam m, Adam v) so
that the pool handles them like any other candidate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# parameter name -> (shape given d and mlp width f, Megatron spec)
_PARAMS = (("ln1", lambda d, f: (d,), P()),
           ("wqkv", lambda d, f: (d, 3 * d), P(None, "y")),
           ("wo", lambda d, f: (d, d), P("y", None)),
           ("ln2", lambda d, f: (d,), P()),
           ("w1", lambda d, f: (d, f), P(None, "y")),
           ("w2", lambda d, f: (f, d), P("y", None)))


def _block(x, p, heads):
  b, s, d = x.shape
  h = x * p["ln1"] * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  q, k, v = jnp.split(h @ p["wqkv"], 3, axis=-1)
  q, k, v = (t.reshape(b, s, heads, d // heads) for t in (q, k, v))
  a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // heads) ** 0.5)
  x = x + jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, s, d) @ p["wo"]
  h = x * p["ln2"] * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
  return x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]


def make_step(layers: int, heads: int):
  """The flat step function of ``layers`` blocks with ``heads`` heads."""
  names = [f"{n}{i}" for i in range(layers) for n, _, _ in _PARAMS]

  def step(x, *flat):
    params = dict(zip(names, flat[0::3]))
    m = dict(zip(names, flat[1::3]))
    v = dict(zip(names, flat[2::3]))

    def loss(params):
      h = x
      for i in range(layers):
        h = _block(h, {n: params[f"{n}{i}"] for n, _, _ in _PARAMS}, heads)
      return jnp.mean(h * h)

    g = jax.grad(loss)(params)
    out = []
    for n in names:
      m_new = 0.9 * m[n] + 0.1 * g[n]
      v_new = 0.999 * v[n] + 0.001 * g[n] * g[n]
      out += [params[n] - 1e-3 * m_new / (jnp.sqrt(v_new) + 1e-8), m_new,
              v_new]
    return tuple(out)

  return step


def _zero_spec(shape, both) -> P:
  return P(both) if len(shape) > 1 else P()


def step_candidates(n: int, meshes, candidate_cls) -> list:
  """Step candidates on every 2-D mesh of ``meshes`` (as ``Candidate``)."""
  out = []
  for shape in meshes:
    if 1 in shape and shape != (1, n):
      continue
    both = ("x", "y") if shape[0] > 1 else "y"
    for layers, batch, seq, d, f in ((1, 8, 64, 128, 512),
                                     (2, 8, 64, 128, 256),
                                     (2, 16, 32, 64, 256),
                                     (1, 16, 64, 256, 1024)):
      heads = 4
      pshapes = [fn(d, f) for _ in range(layers) for _, fn, _ in _PARAMS]
      megatron = [spec for _ in range(layers) for _, _, spec in _PARAMS]
      plans = {"data": (P(both), [P()] * len(pshapes)),
               "zero": (P(both), [_zero_spec(s, both) for s in pshapes]),
               "replicated": (P(), [P()] * len(pshapes))}
      if shape[0] > 1:
        plans["megatron"] = (P("x"), megatron)
      for plan, (xs, ps) in plans.items():
        shapes = ((batch, seq, d),) + tuple(s for s in pshapes
                                            for _ in range(3))
        specs = (xs,) + tuple(s for s in ps for _ in range(3))
        out.append(candidate_cls(
            f"step:{layers}x{batch}x{seq}x{d}x{f}:{shape}:{plan}", "step",
            shape, make_step(layers, heads), shapes, specs, specs[1:]))
  return out
