"""``cond`` is planned through its branches (``graph.Branch``).

Each branch's ops join the ILP; the branches return every result in one
layout, the cond result's (a branch that prefers another layout is
resharded at its output); the cond is no longer kept replicated with a
warning, and the step trains like ``jax.jit`` whichever branch runs.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler.auto_sharding import run_auto_sharding
from alpa_py.compiler.cluster_env import LogicalMesh, get_profile
from alpa_py.compiler.control_flow import ReplicatedControlFlowWarning
from alpa_py.compiler.graph import build_graph
from alpa_py.compiler.graph_eval import evaluate
from alpa_py.compiler.options import AutoShardingOption

PROFILE = "a100_8x_nvlink_100gbps"


def _loss(ws, x, flag):
  h = jnp.tanh(x @ ws[0])
  # one branch is an extra layer, the other a cheap scaling: they prefer
  # different layouts of h
  h = jax.lax.cond(flag, lambda h: jnp.tanh(h @ ws[1]), lambda h: h * 2.0, h)
  return jnp.mean((h @ ws[2]) ** 2)


def _step(ws, x, flag):
  return ws - 0.1 * jax.grad(_loss)(ws, x, flag)


def _inputs(width=256, batch=64):
  ws = jax.random.normal(jax.random.PRNGKey(0), (3, width, width)) / 16
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, width))
  return ws, x


def _switch_loss(w, x, k):
  # three branches whose own preferred layouts differ: a column split, a
  # row split through a transpose, and a reduction over the batch
  fns = [lambda h: h @ w, lambda h: (w @ h.T).T,
         lambda h: jnp.broadcast_to(jnp.mean(h, 0, keepdims=True), h.shape)]
  return jnp.sum(jax.lax.switch(k, fns, x) ** 2)


def test_graph_branches_and_evaluate():
  ws, x = _inputs(64, 16)
  g = build_graph(jax.make_jaxpr(_step)(ws, x, True))
  assert len(g.branches) == 2  # the forward cond and its transpose
  for idx, branches in g.branches.items():
    cond = g.ops[idx]
    assert cond.name == "cond" and len(branches) == 2
    for b in branches:
      assert len(b.invars) == len(cond.inputs) - 1
      assert len(b.outvars) == len(cond.outputs)
      assert [op.name for op in b.ops[-len(b.outvars):]] == \
          ["copy"] * len(b.outvars)
      assert all(op.region == idx for op in b.ops)
  names = [op.name for op in g.all_ops()]
  assert names.count("dot_general") > len(
      [op for op in g.ops if op.name == "dot_general"])
  for flag in (True, False):
    flat = jax.tree_util.tree_leaves((ws, x, flag))
    got = jax.jit(lambda *a: evaluate(g, a))(*flat)[0]
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(jax.jit(_step)(ws, x, flag)),
                               rtol=1e-6, atol=1e-6)


def test_branches_return_one_layout():
  w = jax.random.normal(jax.random.PRNGKey(0), (256, 256)) / 16
  x = jax.random.normal(jax.random.PRNGKey(1), (128, 256))
  g = build_graph(jax.make_jaxpr(jax.grad(_switch_loss, argnums=(0, 1)))(
      w, x, 1))
  assert g.branches
  mesh = LogicalMesh((4,), get_profile(PROFILE))
  sol = run_auto_sharding(g, mesh, AutoShardingOption(cost_profile=PROFILE))
  spec = sol.spec_of
  for idx, branches in g.branches.items():
    for j, out in enumerate(g.ops[idx].outputs):
      got = {spec[b.outvars[j]] for b in branches}
      assert got == {spec[out]}, (idx, j, got, spec[out])
  # every branch op has a strategy of its own
  body = [op.index for bs in g.branches.values() for b in bs for op in b.ops]
  assert set(body) <= set(sol.strategy_of)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_switch_step_matches_jit(k):
  w = jax.random.normal(jax.random.PRNGKey(0), (256, 256)) / 16
  x = jax.random.normal(jax.random.PRNGKey(1), (128, 256))

  def step(w, x, k):
    return w - 0.01 * jax.grad(_switch_loss)(w, x, k)

  f = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      devices=jax.devices()[:4], mesh_shape=(4,),
      auto_sharding_option=AutoShardingOption(cost_profile=PROFILE)),
      batch_argnums=(1,))
  np.testing.assert_allclose(np.asarray(f(w, x, k)),
                             np.asarray(jax.jit(step)(w, x, k)), rtol=1e-5,
                             atol=1e-6)


def test_cond_step_planned_not_replicated_and_matches_jit():
  ws, x = _inputs()
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      devices=jax.devices()[:4], mesh_shape=(4,),
      auto_sharding_option=AutoShardingOption(cost_profile=PROFILE)),
      batch_argnums=(1,))
  with warnings.catch_warnings():
    warnings.simplefilter("error", ReplicatedControlFlowWarning)
    ex = f.get_executable(ws, x, True)
  # the plan lists every dot, those inside the branches too: forward 3 (one
  # in a branch), backward 5 (two in a branch)
  g = build_graph(jax.make_jaxpr(_step)(ws, x, True))
  in_branches = {op.index for bs in g.branches.values() for b in bs
                 for op in b.ops}
  assert len(ex.plan.ops) == 8
  assert len([o for o in ex.plan.ops if o.index in in_branches]) == 3
  ours, ref = ws, ws
  for flag in (True, False, True):
    ours = f(ours, x, flag)
    ref = jax.jit(_step)(ref, x, flag)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5,
                               atol=1e-6)


def test_while_under_pipeshard_warns_and_matches_jit():
  """A ``while`` stays replicated under PipeshardParallel too, with the same
  warning naming it."""
  def loss(p, x):
    # the batch is scaled down until it is small: a data-dependent trip
    # count (over the whole batch: one micro-batch)
    x = jax.lax.while_loop(lambda v: jnp.max(jnp.abs(v)) > 1.0,
                           lambda v: v * 0.5, x)
    h = jnp.tanh(x @ p["w1"])
    return jnp.mean((h @ p["w2"]) ** 2)

  def step(p, x):
    l, g = alpa_py.value_and_grad(loss)(p, x)
    return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), l

  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  p = {"w1": jax.random.normal(k1, (32, 64)) / 6,
       "w2": jax.random.normal(k2, (64, 32)) / 8}
  x = 5.0 * jax.random.normal(k3, (16, 32))
  f = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      devices=jax.devices()[:4], num_micro_batches=1,
      layer_option=alpa_py.AutoLayerOption(2),
      stage_option=alpa_py.UniformStageOption(num_stages=2)))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out, l = f(p, x)
  ours = [w for w in caught
          if issubclass(w.category, ReplicatedControlFlowWarning)]
  assert len(ours) == 1 and "`while`" in str(ours[0].message), [
      str(w.message) for w in caught]
  ref, ref_l = jax.jit(step)(p, x)
  np.testing.assert_allclose(float(l), float(ref_l), rtol=1e-5)
  for k in p:
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]),
                               rtol=1e-5, atol=1e-6)
