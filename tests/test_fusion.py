"""Fusion-aware bytes (``compiler.fusion``): an elementwise chain moves its
ends only, and a decoder's non-matmul bytes come near what XLA's fused HLO
moves (the per-op count is several times too high)."""

import sys
import os

import jax
import jax.numpy as jnp

import alpa_py
from alpa_py.compiler.graph import build_graph
from alpa_py.compiler.hlo_kernels import kernel_stats
from alpa_py.compiler.strategies.registry import is_heavy

sys.path.insert(0, os.path.dirname(__file__))
from scan_models import DecoderConfig, decoder_setup  # noqa: E402


def test_elementwise_chain_moves_its_ends_only():
  def f(w, x):
    y = x @ w
    return jnp.tanh(y * 2.0 + 1.0) @ w

  w = jnp.ones((64, 64))
  x = jnp.ones((32, 64))
  g = build_graph(jax.make_jaxpr(f)(w, x))
  chain = [op for op in g.ops if not is_heavy(op.name)]
  assert [op.name for op in chain] == ["mul", "add", "tanh"]
  nbytes = 32 * 64 * 4
  # the chain reads the first dot's result and writes the second's operand
  assert sum(g.fused_bytes[op.index] for op in chain) == 2 * nbytes
  assert sum(op.bytes_accessed for op in chain) >= 6 * nbytes
  for op in g.ops:
    if is_heavy(op.name):
      assert g.fused_bytes[op.index] == op.bytes_accessed


def test_a_producer_read_by_two_kernels_is_computed_in_both():
  def f(q, k, v):
    s = q @ k.T
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    return (e / jnp.sum(e, axis=-1, keepdims=True)) @ v

  n = 64
  x = jnp.ones((n, n))
  g = build_graph(jax.make_jaxpr(f)(x, x, x))
  dots = [i for i, op in enumerate(g.ops) if op.name == "dot_general"]
  light = g.ops[dots[0] + 1:dots[1]]  # the softmax between the two dots
  total = sum(g.fused_bytes[op.index] for op in light)
  big, row = n * n * 4, n * 4
  # three kernels read the scores (max, sum of exponentials, normalise)
  # and one writes the probabilities; the row statistics are small
  assert 4 * big <= total <= 4 * big + 8 * row, (total, big, row)
  roots = [op.name for op in light if g.fused_bytes[op.index] > 0]
  assert roots == ["reduce_max", "reduce_sum", "div"], roots


def test_decoder_bytes_near_xla_fused_bytes():
  state, tokens, step = decoder_setup(DecoderConfig(layers=2), scanned=False)
  g = build_graph(jax.make_jaxpr(step)(state, tokens))
  light = [op for op in g.all_ops() if not is_heavy(op.name)]
  per_op = sum(op.bytes_accessed for op in light)
  fused = sum(g.fused_bytes[op.index] for op in light)
  xla = kernel_stats(jax.jit(step).lower(state, tokens).compile().as_text()
                     ).nonmatmul_bytes
  assert abs(fused / xla - 1) < 0.3, (fused, xla)
  assert per_op / xla > 2


def test_option_switches_pricing():
  opt = alpa_py.AutoShardingOption(fusion_aware_bytes=True)
  assert opt.fusion_aware_bytes
  assert not alpa_py.AutoShardingOption().fusion_aware_bytes
