"""Every method's result after 3 steps equals the undecorated step's."""

import jax
import numpy as np
import pytest

import alpa_py
from models_for_tests import SETUPS

METHODS = {
    "shard": alpa_py.ShardParallel,
    "data": alpa_py.DataParallel,
    "zero2": alpa_py.Zero2Parallel,
    "zero3": alpa_py.Zero3Parallel,
}
MESHES = [(8,), (1, 8), (2, 4)]


def run_steps(step, state, batch, n=3):
  for _ in range(n):
    state, loss = step(state, batch)
    jax.block_until_ready(loss)
  return state, loss


def assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def references():
  cache = {}

  def get(model):
    if model not in cache:
      state, batch, step = SETUPS[model]()
      cache[model] = run_steps(jax.jit(step), state, batch)
    return cache[model]

  return get


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", list(SETUPS))
def test_matches_single_device(model, method, mesh, references):
  state, batch, step = SETUPS[model]()
  ref_state, ref_loss = references(model)
  par = alpa_py.parallelize(step, method=METHODS[method](mesh_shape=mesh))
  out_state, loss = run_steps(par, state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  assert_trees_close(out_state.params, ref_state.params)
  assert_trees_close(out_state.opt_state, ref_state.opt_state)
  ex = par.get_executable(state, batch)
  assert ex.plan.mesh_shape == mesh
