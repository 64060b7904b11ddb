"""Pipelines over models that scan their layers (``compiler/unroll.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler import unroll
from model_zoo import scanned_decoder


def test_layer_scans_unroll_and_time_scans_stay():
  def f(w, x):
    def layer(h, wi):
      return jnp.tanh(h @ wi), h.sum()

    def time_step(c, xt):
      c = 0.5 * c + xt
      return c, c

    h, sums = jax.lax.scan(layer, x, w)
    _, hs = jax.lax.scan(time_step, h[0], h)
    return hs, sums

  w = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  closed = jax.make_jaxpr(f)(w, x)
  run = unroll.unrolled(closed)
  flat = jax.make_jaxpr(run)(w, x)
  names = [e.primitive.name for e in flat.jaxpr.eqns]
  assert names.count("scan") == 1  # the time scan (no dot) stays
  assert names.count("dot_general") == 3  # one per layer
  for a, b in zip(run(w, x), f(w, x)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert unroll.unrolled(jax.make_jaxpr(lambda a: a * 2)(x)) is None


def test_pipeline_cuts_a_scanned_decoder_between_its_iterations():
  """4 scanned blocks, 4 layers, 2 stages: each stage holds two of the
  scan's iterations, and 3 steps equal the single-device ones."""
  (state, batch), step = scanned_decoder(layers=4)
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      devices=jax.devices()[:4], num_micro_batches=2,
      layer_option=alpa_py.AutoLayerOption(layer_num=4),
      stage_option=alpa_py.UniformStageOption(num_stages=2)))
  ex = par.get_executable(state, batch)
  assert ex.plan.num_layers == 4
  assert [s.layers for s in ex.plan.stages] == [(0, 2), (2, 4)]
  flops = ex.plan.layer_flops
  assert max(flops) < 2.0 * min(flops), flops  # a block per layer
  ref, out = state, state
  for _ in range(3):
    ref, ref_loss = jax.jit(step)(ref, batch)
    out, loss = par(out, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(out.params),
                  jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_the_default_layer_option_cuts_at_every_iteration():
  (state, batch), step = scanned_decoder(layers=4)
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      devices=jax.devices()[:4], num_micro_batches=2,
      stage_option=alpa_py.UniformStageOption(num_stages=4)))
  ex = par.get_executable(state, batch)
  assert ex.plan.num_layers == 4
  out, loss = par(state, batch)
  _, ref_loss = jax.jit(step)(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)


def test_stack_and_unstack_have_sharding_rules():
  """Unrolled scans stack their iterations' results (``jnp.stack``, a
  primitive of its own): planned, not replicated with a warning."""
  import warnings

  def f(a, b):
    s = jnp.stack([a @ b, a @ b * 2], axis=1)
    u = jnp.unstack(s, axis=1)
    return (u[0] + u[1]).sum(), s

  a = np.random.rand(64, 32).astype(np.float32)
  b = np.random.rand(32, 16).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error", alpa_py.UnsupportedPrimitiveWarning)
    out = alpa_py.parallelize(f, method=alpa_py.ShardParallel(
        devices=jax.devices()[:4]), batch_argnums=(0,))(a, b)
  for x, y in zip(out, f(a, b)):
    np.testing.assert_allclose(x, y, rtol=1e-5)
