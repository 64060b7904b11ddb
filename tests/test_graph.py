"""Jaxpr -> OpGraph: inlining, control flow, FLOPs, strategy rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler.graph import build_graph
from alpa_py.compiler.strategies.rules import reshape_groups


def test_calls_are_inlined():
  @jax.custom_vjp
  def twice(t):
    return 2 * t

  twice.defvjp(lambda t: (2 * t, None), lambda _, g: (2 * g,))

  def f(x, w):
    y = jax.jit(lambda a, b: a @ b)(x, w)
    y = jax.nn.relu(y)  # custom_jvp inside
    y = jax.checkpoint(jnp.sin)(y)
    return jnp.sum(twice(y))

  g = build_graph(jax.make_jaxpr(jax.grad(f))(jnp.ones((4, 8)), jnp.ones((8, 2))))
  names = {op.name for op in g.ops}
  assert not names & {"jit", "pjit", "custom_jvp_call", "custom_vjp_call",
                      "remat", "remat2", "checkpoint"}
  dots = [op for op in g.ops if op.name == "dot_general"]
  assert dots and dots[0].flops == 2 * 4 * 8 * 2


def test_control_flow_is_one_node_and_correct():
  def step(w, x):
    def body(c, xi):
      return jnp.tanh(c @ w + xi), None
    c, _ = jax.lax.scan(body, jnp.zeros((x.shape[1], w.shape[1])), x)
    return jnp.sum(c ** 2)

  w = jax.random.normal(jax.random.PRNGKey(0), (16, 16)) * 0.1
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 16, 16))
  g = build_graph(jax.make_jaxpr(jax.grad(step))(w, x))
  scans = [op for op in g.ops if op.name == "scan"]
  assert scans and scans[0].flops > 5 * 2 * 16 ** 3
  par = alpa_py.parallelize(jax.grad(step))
  np.testing.assert_allclose(par(w, x), jax.grad(step)(w, x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("src, dst, groups", [
    ((8, 6), (48,), [([0, 1], [0])]),
    ((4, 6, 8), (4, 48), [([0], [0]), ([1, 2], [1])]),
    ((2, 3, 4), (6, 4), [([0, 1], [0]), ([2], [1])]),
    ((8, 64), (8, 4, 16), [([0], [0]), ([1], [1, 2])]),
])
def test_reshape_groups(src, dst, groups):
  assert reshape_groups(src, dst) == groups


def test_gather_scatter_and_cumsum_run_sharded():
  def f(table, idx, x):
    emb = jnp.take(table, idx, axis=0)  # gather
    y = jnp.cumsum(emb * x[..., None], axis=1)
    return jnp.mean(y ** 2)

  table = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
  idx = jax.random.randint(jax.random.PRNGKey(1), (16, 8), 0, 64)
  x = jax.random.normal(jax.random.PRNGKey(2), (16, 8))
  g = jax.grad(f)  # backward has scatter-add
  for mesh in [(8,), (2, 4)]:
    par = alpa_py.parallelize(g, method=alpa_py.ShardParallel(mesh_shape=mesh),
                              batch_argnums=(1, 2))
    np.testing.assert_allclose(par(table, idx, x), g(table, idx, x),
                               rtol=1e-4, atol=1e-6)


def test_checkpointed_recompute_keeps_its_barriers():
  """``jax.checkpoint``'s recomputation reads its inputs through
  optimization barriers (JAX's lowering adds them so that XLA cannot merge
  the recomputation into the forward pass); inlined into the graph, the
  region keeps them, and the compiled step still equals jax.jit's."""
  import alpa_py
  from alpa_py.compiler.graph import build_graph

  def block(w, h):
    return jnp.tanh(jnp.tanh(h @ w) @ w)

  def step(w, x):
    loss = lambda w: jnp.mean(jax.checkpoint(block)(w, x) ** 2)
    l, g = jax.value_and_grad(loss)(w)
    return w - 0.1 * g, l

  w = jax.random.normal(jax.random.PRNGKey(0), (32, 32)) * 0.1
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 32))
  graph = build_graph(jax.make_jaxpr(step)(w, x))
  assert any(op.name == "optimization_barrier" for op in graph.ops)
  par = alpa_py.parallelize(step, method=alpa_py.DataParallel(
      devices=jax.devices()[:4]), batch_argnums=(1,))
  ex = par.get_executable(w, x)
  lowered = ex.task.jitted.lower(*ex.task.arg_specs).as_text()
  assert "optimization_barrier" in lowered
  out, ref = par(w, x), jax.jit(step)(w, x)
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-6)
