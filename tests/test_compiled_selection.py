"""Choosing among compiled programs by the profile's price of each
(``AutoShardingOption.select_by_compiled_cost``)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler.cluster_env import CostProfile
from alpa_py.compiler.cost_features import FEATURES, INDEX
from alpa_py.compiler.cost_model import DeviceKey, LinearCostModel
from alpa_py.compiler.program_cost import price_program


def _profile(collective_scale=1.0):
  coef = np.zeros(len(FEATURES))
  coef[INDEX["fixed"]] = 1e-4
  coef[INDEX["matmul_flops"]] = 1e-10
  coef[INDEX["nonmatmul_bytes"]] = 1e-9
  coef[INDEX["kernel_launches"]] = 1e-5
  for j, name in enumerate(FEATURES):
    if name.endswith(":bytes"):
      coef[j] = 1e-9 * collective_scale
    elif name.endswith(":count"):
      coef[j] = 5e-5 * collective_scale
  model = LinearCostModel(key=DeviceKey.of(jax.devices()),
                          coefficients=tuple(coef))
  return CostProfile.from_model(model, "test:calibrated")


def _step(params, x, y):
  def loss(p):
    h = jnp.tanh(x @ p["w1"])
    return jnp.mean((h @ p["w2"] - y) ** 2)
  g = jax.grad(loss)(params)
  return jax.tree.map(lambda p, d: p - 0.1 * d, params, g), loss(params)


def _args():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(k[0], (64, 256)) * 0.1,
            "w2": jax.random.normal(k[1], (256, 32)) * 0.1}
  return (params, jax.random.normal(k[2], (64, 64)),
          jax.random.normal(k[3], (64, 32)))


def _compile(**option):
  opt = alpa_py.AutoShardingOption(**option)
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      auto_sharding_option=opt))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    ex = f.get_executable(*_args())
  return f, ex


@pytest.mark.parametrize("collective_scale", [1.0, 1e3])
def test_the_cheapest_compiled_program_is_kept_and_equals_jit(collective_scale):
  profile = _profile(collective_scale)
  f, ex = _compile(cost_profile=profile)
  plan = ex.plan
  names = [n for n, _ in plan.alternatives]
  assert names[0].startswith("ilp (") and \
      names[1].startswith("ilp batch-split (") and names[2:] == [
          "data-parallel", "zero2", "zero3"]
  prices = dict(plan.alternatives)
  assert plan.compiled_step_seconds == min(prices.values())
  assert price_program(ex.hlo_text(), profile).seconds == pytest.approx(
      plan.compiled_step_seconds)
  assert "chosen by compiled price" in str(plan)
  args = _args()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    out = f(*args)
  ref = jax.jit(_step)(*args)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_off_by_default_for_a_rate_profile_and_when_asked():
  _, ex = _compile()  # the "cpu" profile: no fitted model
  assert ex.plan.alternatives == () and ex.plan.compiled_step_seconds is None
  _, ex = _compile(cost_profile=_profile(), select_by_compiled_cost=False)
  assert ex.plan.alternatives == ()


def test_a_named_mesh_is_not_second_guessed():
  opt = alpa_py.AutoShardingOption(cost_profile=_profile())
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      mesh_shape=(2, 4), auto_sharding_option=opt))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    ex = f.get_executable(*_args())
  assert ex.plan.alternatives == () and tuple(ex.plan.mesh_shape) == (2, 4)


def test_a_bad_value_is_refused():
  with pytest.raises(TypeError, match="select_by_compiled_cost"):
    alpa_py.AutoShardingOption(select_by_compiled_cost="yes")


def test_candidates_that_cannot_split_the_batch_are_skipped():
  # a batch of 4 rows: no 8-way data-parallel candidate applies; the ILP's
  # own plan stands, alone
  params, x, y = _args()
  x, y = x[:4], y[:4]
  opt = alpa_py.AutoShardingOption(cost_profile=_profile())
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      auto_sharding_option=opt), batch_argnums=(1, 2))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    ex = f.get_executable(params, x, y)
    out = f(params, x, y)
  names = [n for n, _ in ex.plan.alternatives]
  assert names and names[0].startswith("ilp (")
  assert not {"data-parallel", "zero2", "zero3"} & set(names)
  ref = jax.jit(_step)(params, x, y)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
