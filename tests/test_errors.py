"""Bad input gets a clear error (or, for an unknown primitive, one warning)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler.strategies import registry
from models_for_tests import gpt_setup, mlp_setup


def test_unsupported_primitive_is_replicated_with_one_warning():
  registry._warned.discard("fft")

  def step(w, x):
    spec = jnp.fft.fft(w @ x, axis=0)
    return jnp.sum(jnp.abs(spec) ** 2)

  w = jax.random.normal(jax.random.PRNGKey(0), (16, 16))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out1 = alpa_py.parallelize(step)(w, x)
    out2 = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
        mesh_shape=(2, 4)))(w, x)
  ours = [w for w in caught if issubclass(w.category,
                                          alpa_py.UnsupportedPrimitiveWarning)]
  assert len(ours) == 1
  assert "fft" in str(ours[0].message)
  np.testing.assert_allclose(out1, step(w, x), rtol=1e-4)
  np.testing.assert_allclose(out2, step(w, x), rtol=1e-4)


def test_static_argnums_out_of_range():
  state, batch, step = mlp_setup()
  par = alpa_py.parallelize(step, static_argnums=(5,))
  with pytest.raises(ValueError, match=r"static_argnums \(=\(5,\)\) refers to "
                     r"argument 5.*2 positional"):
    par(state, batch)


def test_static_argnums_unhashable():
  def f(x, cfg):
    return x * cfg["scale"]

  with pytest.raises(ValueError, match="static argument 1.*hashable"):
    alpa_py.parallelize(f, static_argnums=1, batch_argnums=())(
        jnp.ones(8), {"scale": 2.0})


def test_static_argnums_works():
  def f(x, scale):
    return x * scale

  par = alpa_py.parallelize(f, static_argnums=1, batch_argnums=())
  np.testing.assert_allclose(par(jnp.ones(8), 3.0), 3.0 * np.ones(8))
  np.testing.assert_allclose(par(jnp.ones(8), 4.0), 4.0 * np.ones(8))


def _marked_step(state, batch):
  from models_for_tests import _lm
  loss, grads = alpa_py.value_and_grad(_lm)(state.params, state.apply_fn, batch)
  return state.apply_gradients(grads=grads), loss


def test_batch_not_divisible_by_micro_batches():
  state, batch, _ = gpt_setup(batch=6)
  par = alpa_py.parallelize(_marked_step,
                            method=alpa_py.ShardParallel(num_micro_batches=4))
  with pytest.raises(ValueError, match=r"num_micro_batches \(=4\) must divide "
                     r"the batch size.*\(6, 16\)"):
    par(state, batch)


def test_micro_batches_need_marked_gradients():
  state, batch, step = gpt_setup()
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(num_micro_batches=2))
  with pytest.raises(ValueError, match="alpa_py.grad or alpa_py.value_and_grad"):
    par(state, batch)


def test_micro_batches_reject_unmarked_batch_values():
  from models_for_tests import _lm

  def step(state, batch):
    grads = alpa_py.grad(_lm)(state.params, state.apply_fn, batch)
    extra = batch["tokens"].sum()  # batch-dependent, not marked
    return state.apply_gradients(grads=grads), extra

  state, batch, _ = gpt_setup()
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(num_micro_batches=2))
  with pytest.raises(ValueError, match=r"output out\[1\] depends on the batch"):
    par(state, batch)


@pytest.mark.parametrize("kwargs, match", [
    ({"mesh_shape": (3, 0)}, "mesh_shape"),
    ({"mesh_shape": (2, 2, 2)}, "mesh_shape"),
    ({"num_micro_batches": 0}, "num_micro_batches"),
    ({"auto_sharding_option": "fast"}, "AutoShardingOption"),
])
def test_bad_method_options(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    alpa_py.ShardParallel(**kwargs)


def test_mesh_shape_must_match_device_count():
  state, batch, step = mlp_setup()
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(mesh_shape=(2, 2)))
  with pytest.raises(ValueError, match=r"mesh_shape \(=\(2, 2\)\) has 4 devices "
                     "but 8"):
    par(state, batch)


@pytest.mark.parametrize("kwargs, match", [
    ({"cost_profile": "tpu"}, "cost_profile"),
    ({"solver_time_limit_s": 0}, "solver_time_limit_s"),
    ({"allow_all_gather": "yes"}, "allow_all_gather"),
])
def test_bad_auto_sharding_options(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    alpa_py.AutoShardingOption(**kwargs)


def test_data_parallel_batch_must_divide_devices():
  state, batch, step = mlp_setup(batch=12)
  with pytest.raises(ValueError, match=r"batch dim 0 \(=12\) must be divisible "
                     r"by the number of devices \(=8\)"):
    alpa_py.parallelize(step, method=alpa_py.DataParallel())(state, batch)


def test_unknown_cluster():
  with pytest.raises(ValueError, match="cluster.*'slurm'"):
    alpa_py.init(cluster="slurm")
