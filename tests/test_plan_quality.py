"""The ILP picks the plans a person would: sharded weights, data parallel,
and each constrained method's layouts."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import alpa_py
from models_for_tests import mlp_setup


def state_bytes(state):
  return sum(x.nbytes for x in jax.tree_util.tree_leaves((state.params,
                                                          state.opt_state)))


def kernel_specs(plan, prefix="arg0.params"):
  return {t.name: t.spec for t in plan.inputs
          if t.name.startswith(prefix) and t.name.endswith("['kernel']")}


def test_wide_mlp_small_batch_shards_weights():
  state, batch, step = mlp_setup(hidden=2048, batch=8)
  ex = alpa_py.parallelize(step).get_executable(state, batch)
  # well below one replicated copy of parameters + optimizer state
  assert ex.memory_per_device() < 0.5 * state_bytes(state)
  hidden_kernel = kernel_specs(ex.plan)["arg0.params['params']['Dense_1']['kernel']"]
  assert hidden_kernel != P()
  # and it still computes the same step
  ref_state, ref_loss = jax.jit(step)(state, batch)
  new_state, loss = alpa_py.parallelize(step)(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)


def test_narrow_mlp_large_batch_is_data_parallel():
  state, batch, step = mlp_setup(hidden=64, batch=65536)
  ex = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      mesh_shape=(8,))).get_executable(state, batch)
  assert ex.plan.input_spec("arg1['x']") == P("x")
  assert ex.plan.input_spec("arg1['y']") == P("x")
  assert set(kernel_specs(ex.plan).values()) == {P()}
  for op in ex.plan.ops:  # every matmul splits the batch: forward dots on
    # their rows (i0), weight-gradient dots on the contraction (k0)
    assert op.strategy.split("+")[0] in ("i0:S0", "k0:S0"), op


@pytest.mark.parametrize("mesh", [(8,), (2, 4)])
def test_data_parallel_replicates_parameters(mesh):
  state, batch, step = mlp_setup(hidden=256, batch=64)
  ex = alpa_py.parallelize(step, method=alpa_py.DataParallel(
      mesh_shape=mesh)).get_executable(state, batch)
  all_axes = ("x",) if mesh == (8,) else (("x", "y"),)
  for t in ex.plan.inputs:
    if t.name.startswith("arg1"):
      assert tuple(t.spec) == all_axes, t
    else:
      assert t.spec == P(), t
  for t in ex.plan.outputs:  # the new state keeps the input layout
    assert t.spec == P(), t


def test_zero3_shards_parameters_and_zero2_only_optimizer_state():
  state, batch, step = mlp_setup(hidden=256, batch=64)
  z3 = alpa_py.parallelize(step, method=alpa_py.Zero3Parallel()).get_executable(
      state, batch)
  z2 = alpa_py.parallelize(step, method=alpa_py.Zero2Parallel()).get_executable(
      state, batch)
  dp = alpa_py.parallelize(step, method=alpa_py.DataParallel()).get_executable(
      state, batch)
  for name, spec in kernel_specs(z3.plan).items():
    assert spec != P(), name
  assert set(kernel_specs(z2.plan).values()) == {P()}
  for name, spec in kernel_specs(z2.plan, "arg0.opt_state").items():
    assert spec != P(), name
  # each stage of ZeRO saves memory
  assert z3.memory_per_device() < z2.memory_per_device() < dp.memory_per_device()


def test_mesh_search_tries_every_factorization():
  state, batch, step = mlp_setup(hidden=512, batch=16)
  ex = alpa_py.parallelize(step).get_executable(state, batch)
  shapes = [s for s, _ in ex.solve_stats.mesh_candidates]
  assert shapes == [(1, 8), (2, 4), (4, 2), (8, 1)]
  best = min(ex.solve_stats.mesh_candidates, key=lambda c: c[1])
  assert ex.plan.mesh_shape == best[0]
  assert ex.solve_stats.optimal


def test_gpu_profile_plans_without_a_gpu():
  state, batch, step = mlp_setup(hidden=1024, batch=64)
  opt = alpa_py.AutoShardingOption(cost_profile="a100_8x_nvlink_100gbps")
  ex = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      mesh_shape=(2, 4), auto_sharding_option=opt)).get_executable(state, batch)
  assert ex.plan.cost_profile == "a100_8x_nvlink_100gbps"
  assert ex.plan.predicted_step_seconds < 1e-2  # GPU-scale, not CPU-scale
