"""The public API: decorator forms, cache, plan, executable, micro-batches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from models_for_tests import _lm, gpt_setup, mlp_setup


def test_bare_decorator_and_init_shutdown():
  alpa_py.init(cluster="local")
  try:
    @alpa_py.parallelize
    def f(x, y):
      return jnp.tanh(x @ y)

    x = jnp.ones((16, 32))
    y = jnp.ones((32, 8)) * 0.1
    np.testing.assert_allclose(f(x, y), jnp.tanh(x @ y), rtol=1e-5)
  finally:
    alpa_py.shutdown()


def test_cache_key_shapes_and_options():
  state, batch, step = mlp_setup(batch=32)
  par = alpa_py.parallelize(step)
  ex1 = par.get_executable(state, batch)
  assert par.get_executable(state, batch) is ex1
  # feeding the new state back (its step counter was a Python int) reuses it
  new_state, _ = par(state, batch)
  assert par.get_executable(new_state, batch) is ex1
  _, batch64, _ = mlp_setup(batch=64)
  assert par.get_executable(state, batch64) is not ex1
  opt = alpa_py.AutoShardingOption(allow_all_to_all=False)
  par2 = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      auto_sharding_option=opt))
  assert par2.get_executable(state, batch) is not ex1
  # options are frozen values: equal options, equal methods
  assert alpa_py.ShardParallel(auto_sharding_option=opt) == \
      alpa_py.ShardParallel(auto_sharding_option=alpa_py.AutoShardingOption(
          allow_all_to_all=False))
  with pytest.raises(dataclasses.FrozenInstanceError):
    opt.cost_profile = "x"


def test_executable_surface():
  state, batch, step = mlp_setup(hidden=512, batch=16)
  ex = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      mesh_shape=(2, 4))).get_executable(state, batch)
  text = str(ex.plan)
  assert "mesh (2, 4)" in text and "dot_general" in text
  assert hash(ex.plan) == hash(ex.plan)  # frozen and hashable
  assert len(ex.plan.inputs) == len(jax.tree_util.tree_leaves((state, batch)))
  assert len(ex.plan.ops) == 8  # 3 forward + 5 backward matmuls
  hlo = ex.hlo_text()
  assert "HloModule" in hlo
  assert any(c in hlo for c in ("all-reduce", "reduce-scatter", "all-gather"))
  assert ex.memory_per_device() > 0
  s = ex.solve_stats
  assert s.status == "OPTIMAL" and s.num_variables > 0 and s.solve_seconds >= 0
  assert ex.mesh.devices.shape == (2, 4)


def test_donation_consumes_the_input():
  state, batch, step = mlp_setup()
  par = alpa_py.parallelize(step, donate_argnums=(0,))
  state = jax.tree_util.tree_map(jnp.array, state)  # our own copies
  ex = par.get_executable(state, batch)
  placed = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s),
                                  jax.tree_util.tree_leaves(state),
                                  list(ex.in_shardings[:len(jax.tree_util.tree_leaves(state))]))
  kernel = placed[2]
  new_state, _ = par(jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(state), placed), batch)
  assert kernel.is_deleted()
  jax.block_until_ready(new_state)


def _marked_step(state, batch):
  loss, grads = alpa_py.value_and_grad(_lm)(state.params, state.apply_fn, batch)
  return state.apply_gradients(grads=grads), loss


@pytest.mark.parametrize("method", [
    alpa_py.ShardParallel(num_micro_batches=4, mesh_shape=(2, 4)),
    alpa_py.DataParallel(num_micro_batches=2),
    alpa_py.Zero3Parallel(num_micro_batches=2),
])
def test_micro_batches_equal_full_batch(method):
  state, batch, _ = gpt_setup(batch=16)
  ref = state
  for _ in range(3):
    ref, ref_loss = jax.jit(_marked_step)(ref, batch)
  par = alpa_py.parallelize(_marked_step, method=method)
  out = state
  for _ in range(3):
    out, loss = par(out, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(out.params),
                  jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert par.get_executable(state, batch).plan.num_micro_batches == \
      method.num_micro_batches


def test_alpa_grad_matches_jax_grad():
  f = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
  w, x = jnp.ones((4, 3)) * 0.3, jnp.arange(8.0).reshape(2, 4)
  np.testing.assert_allclose(alpa_py.grad(f)(w, x), jax.grad(f)(w, x))
  v, g = alpa_py.value_and_grad(f)(w, x)
  np.testing.assert_allclose(v, f(w, x))
  # the marker composes with jit, vmap and a second differentiation
  np.testing.assert_allclose(jax.jit(alpa_py.grad(f))(w, x), jax.grad(f)(w, x))
  hess = jax.jacfwd(alpa_py.grad(f))(w, x)
  np.testing.assert_allclose(hess, jax.jacfwd(jax.grad(f))(w, x), rtol=1e-5)


def test_init_twice_and_a_call_after_shutdown_are_clear_errors():
  from alpa_py.runtime.distributed_array import (ClusterGoneError,
                                                 DistributedArray)

  def f(x, y):
    return jnp.tanh(x @ y)

  x, y = jnp.ones((16, 32)), jnp.ones((32, 8)) * 0.1
  alpa_py.init(cluster="local")
  try:
    with pytest.raises(RuntimeError, match="init was already called .*"
                       "shutdown\\(\\) first"):
      alpa_py.init(cluster="local")
    par = alpa_py.parallelize(f)
    ex = par.get_executable(x, y)
    backend = alpa_py.runtime.cluster.current_cluster()
  finally:
    alpa_py.shutdown()
  # an executable compiled for the released backend refuses to run ...
  with pytest.raises(ClusterGoneError, match="shutdown\\(\\) released"):
    ex.call_flat([x, y])
  # ... while the parallelized function compiles again for the current one
  np.testing.assert_allclose(par(x, y), f(x, y), rtol=1e-5)
  assert par.get_executable(x, y) is not ex
  # an array held by a backend that is gone says so when read
  gone = DistributedArray(backend, handle=1, shape=(2,), dtype="float32")
  with pytest.raises(ClusterGoneError, match="shut down"):
    np.asarray(gone)
  assert isinstance(gone, DistributedArray)
