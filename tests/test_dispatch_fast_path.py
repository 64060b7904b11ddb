"""The per-call fast path of ``parallelize`` (``driver.fast_dispatch`` and the
local runner): no per-leaf path work once a call's key was seen, a new
compile wherever the full signature (and ``jax.jit``) would make one, inputs
in another sharding moved without a recompile, and JAX's own error for a
donated buffer used again."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import alpa_py
from alpa_py import api
from models_for_tests import mlp_setup


def _close(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert jnp.result_type(x) == jnp.result_type(y)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-6)


@pytest.fixture
def counts(monkeypatch):
  """Counts the full path's ``tree_flatten_with_path`` calls and the
  compiles."""
  n = {"paths": 0, "compiles": 0}
  flatten, compile_step = (jax.tree_util.tree_flatten_with_path,
                           api.driver.compile_step)

  def counted_flatten(*a, **k):
    n["paths"] += 1
    return flatten(*a, **k)

  def counted_compile(*a, **k):
    n["compiles"] += 1
    return compile_step(*a, **k)

  monkeypatch.setattr(jax.tree_util, "tree_flatten_with_path", counted_flatten)
  monkeypatch.setattr(api.driver, "compile_step", counted_compile)
  return n


def _tree_step(tree, x):
  return jax.tree_util.tree_map(lambda w: jnp.tanh(w * x + 1.0), tree)


def _tree(n=40):
  return {f"w{i}": jnp.full((4,), 0.01 * i, jnp.float32) for i in range(n)}


def test_second_call_skips_the_signature(counts):
  par = alpa_py.parallelize(_tree_step)
  tree, x = _tree(), jnp.float32(0.5)
  out = par(tree, x)
  assert counts["compiles"] == 1
  counts["paths"] = 0
  for _ in range(3):
    out = par(out, x)
  assert counts["paths"] == 0 and counts["compiles"] == 1
  ref = tree
  for _ in range(4):
    ref = jax.jit(_tree_step)(ref, x)
  _close(out, ref)
  assert len(par._cache) == 1


def _mixed(x, y):
  return x + y  # its result dtype follows x's weak type


def test_new_dtype_shape_weak_type_and_static_value_compile(counts):
  par = alpa_py.parallelize(_mixed)
  y = jnp.ones((4,), jnp.bfloat16)
  calls = [
      (jnp.float32(2.0), y),  # strong float32 + bf16 -> float32
      (jnp.asarray(2.0), y),  # weak float32 + bf16 -> bf16
      (jnp.float32(2.0), jnp.ones((4,), jnp.float16)),  # new dtype
      (jnp.float32(2.0), jnp.ones((8,), jnp.bfloat16)),  # new shape
  ]
  assert jnp.asarray(2.0).weak_type and not jnp.float32(2.0).weak_type
  for k, args in enumerate(calls):
    _close(par(*args), jax.jit(_mixed)(*args))
    assert counts["compiles"] == len(par._cache) == k + 1
    counts["paths"] = 0  # the second call goes through the fast path
    _close(par(*args), jax.jit(_mixed)(*args))
    assert counts["paths"] == 0 and counts["compiles"] == k + 1
  assert par(jnp.asarray(2.0), y).dtype == jnp.bfloat16
  # a Python float is a strongly typed float32 to the signature (so that a
  # fed-back Python scalar does not recompile): the strong entry serves it
  out = par(2.0, y)
  assert out.dtype == jnp.float32 and counts["compiles"] == 4
  _close(out, jax.jit(_mixed)(jnp.float32(2.0), y))


def _scaled(x, mode, cfg):
  out = x * 2.0 if mode == "double" else x + 1.0
  return out * cfg["scale"] if cfg["on"] else out


def test_static_values_key_the_fast_path(counts):
  par = alpa_py.parallelize(_scaled, static_argnums=(1,))
  x = jnp.arange(8.0)
  seen = set()
  for mode in ("double", "inc", "double"):
    for on in (True, False, True):
      cfg = {"on": on, "scale": jnp.float32(3.0)}
      # (a bool leaf is static, as under equinox.filter_jit: compare with
      # the eager step)
      _close(par(x, mode, cfg), _scaled(x, mode, cfg))
      seen.add((mode, on))
      assert counts["compiles"] == len(par._cache) == len(seen)
      counts["paths"] = 0
      _close(par(x, mode, dict(cfg)), _scaled(x, mode, cfg))
      assert counts["paths"] == 0 and counts["compiles"] == len(seen)
  # a static argument that cannot be hashed still gets the full path's error
  with pytest.raises(ValueError, match="hashable"):
    par(x, ["double"], {"on": True, "scale": jnp.float32(3.0)})
  with pytest.raises(ValueError, match="positionally"):
    par(x, "double", cfg=None)


def test_another_sharding_is_moved_without_recompiling(counts):
  state, batch, step = mlp_setup(batch=32)
  par = alpa_py.parallelize(step, method=alpa_py.DataParallel())
  out, loss = par(state, batch)
  out, loss = par(out, batch)
  assert counts["compiles"] == 1
  ex = par.get_executable(out, batch)
  counts["paths"] = 0
  mesh = ex.mesh
  # the batch, planned split over the devices: replicated, on one device,
  # and committed to a single other device
  for moved in (jax.device_put(batch, NamedSharding(mesh, P())),
                jax.device_put(batch, jax.devices()[3])):
    got, got_loss = par(out, moved)
    ref, ref_loss = par(out, batch)
    _close((got, got_loss), (ref, ref_loss))
    assert jax.tree_util.tree_leaves(moved)[0].sharding != \
        ex.in_shardings[-1]
  # neither a compile nor the full signature: the typed key found it
  assert counts["compiles"] == 1 and len(par._cache) == 1
  assert counts["paths"] == 0


def test_a_donated_buffer_used_again_raises_jax_error():
  state, batch, step = mlp_setup()
  par = alpa_py.parallelize(step, method=alpa_py.DataParallel(),
                            donate_argnums=(0,))
  ex = par.get_executable(state, batch)
  n = len(jax.tree_util.tree_leaves(state))

  def placed(tree):
    leaves = [jax.device_put(x, s) for x, s in
              zip(jax.tree_util.tree_leaves(tree), ex.in_shardings[:n])]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree),
                                        leaves)

  s1 = placed(state)
  s2, _ = par(s1, batch)  # (the step counter leaf may be a Python int)
  s2 = placed(s2)
  s3, _ = par(s2, batch)  # fast path: its key was seen
  assert jax.tree_util.tree_leaves(s2.params)[0].is_deleted()
  for stale in (s2, s1):
    with pytest.raises(RuntimeError, match="deleted|donated"):
      par(stale, batch)
  jax.block_until_ready(par(s3, batch))


@pytest.mark.parametrize("method", [
    alpa_py.DataParallel(),
    alpa_py.ShardParallel(mesh_shape=(2, 4)),
])
def test_training_matches_jit_on_8_devices(method, counts):
  assert jax.device_count() == 8
  state, batch, step = mlp_setup(batch=32)
  par = alpa_py.parallelize(step, method=method)
  out, ref = state, state
  for _ in range(3):
    out, loss = par(out, batch)
    ref, ref_loss = jax.jit(step)(ref, batch)
  _close((out.params, loss), (ref.params, ref_loss))
  # the first call's step counter was a Python int, later ones are arrays
  # of the same signature: one compile
  assert counts["compiles"] == 1 and len(par._cache) == 1
  assert par.get_executable(out, batch).mesh.devices.size == 8
