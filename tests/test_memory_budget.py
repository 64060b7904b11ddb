"""The per-device memory budget: met when possible, a clear error when not."""

import jax
import numpy as np
import pytest

import alpa_py
from models_for_tests import mlp_setup


def _budgeted(budget):
  return alpa_py.ShardParallel(
      mesh_shape=(8,),
      auto_sharding_option=alpa_py.AutoShardingOption(
          memory_budget_per_device=budget))


def test_budget_data_parallel_cannot_meet_is_met():
  state, batch, step = mlp_setup(hidden=1024, batch=4096)
  dp = alpa_py.parallelize(step, method=alpa_py.DataParallel()).get_executable(
      state, batch)
  budget = 0.8 * dp.memory_per_device()
  assert dp.memory_per_device() > budget
  par = alpa_py.parallelize(step, method=_budgeted(budget))
  ex = par.get_executable(state, batch)
  assert ex.memory_per_device() <= budget
  ref_state, ref_loss = jax.jit(step)(state, batch)
  new_state, loss = par(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(new_state.params),
                  jax.tree_util.tree_leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_impossible_budget_says_bytes_needed():
  state, batch, step = mlp_setup(hidden=1024, batch=4096)
  par = alpa_py.parallelize(step, method=_budgeted(10_000))
  with pytest.raises(alpa_py.InfeasiblePlanError) as e:
    par.get_executable(state, batch)
  msg = str(e.value)
  assert "memory_budget_per_device=10000" in msg
  assert "bytes per device are needed" in msg
  needed = int(msg.split("at least ")[1].split(" bytes")[0])
  assert needed > 10_000


def test_invalid_budget_rejected():
  with pytest.raises(ValueError, match="memory_budget_per_device"):
    alpa_py.AutoShardingOption(memory_budget_per_device=-5)


def test_a_solve_out_of_time_without_a_budget_names_the_time_limit(
    monkeypatch):
  from alpa_py.compiler import auto_sharding, ilp
  monkeypatch.setattr(auto_sharding.ilp, "solve", lambda problem, sym=None:
                      ilp.Infeasible("NOT_SOLVED (time limit)", 0.0, None,
                                     "", 1234, 56, 7.0))
  state, batch, step = mlp_setup(hidden=64, batch=64)
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      mesh_shape=(8,), auto_sharding_option=alpa_py.AutoShardingOption(
          solver_time_limit_s=7)))
  with pytest.raises(alpa_py.InfeasiblePlanError,
                     match=r"no sharding on mesh \(8,\) within "
                     r"solver_time_limit_s=7 .*NOT_SOLVED"):
    par.get_executable(state, batch)
