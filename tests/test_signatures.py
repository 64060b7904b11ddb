"""Steps as users write them: the batch arguments inferred, non-array leaves
(functions, strings, an Equinox module's activation) held static."""

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alpa_py
from alpa_py.driver.batch_args import NoBatch, infer_batch_argnums
from alpa_py.driver.signature import StaticLeaf, make_signature

DEVICES = jax.devices()[:4]


def _sig(args, donate=()):
  return make_signature(args, static=(), donate=donate, batch=(),
                        devices=tuple(DEVICES))[0]


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


# -- optax-docs style: train_step(params, opt_state, batch) -------------------

OPTIMIZER = optax.adam(1e-2)


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - batch["y"]) ** 2)


def optax_step(params, opt_state, batch):
  loss, grads = jax.value_and_grad(_loss)(params, batch)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def _optax_setup(batch_size=16):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(k1, (16, 32)) * 0.3, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 4)) * 0.3, "b2": jnp.zeros(4)}
  batch = {"x": jax.random.normal(k3, (batch_size, 16)),
           "y": jax.random.normal(k4, (batch_size, 4))}
  return params, OPTIMIZER.init(params), batch


@pytest.mark.parametrize("method_cls", [alpa_py.ShardParallel,
                                        alpa_py.DataParallel])
def test_optax_step_needs_no_batch_argnums(method_cls):
  params, opt_state, batch = _optax_setup()
  par = alpa_py.parallelize(optax_step, method=method_cls(devices=DEVICES))
  ref, out = (params, opt_state), (params, opt_state)
  for _ in range(2):
    *ref, ref_loss = jax.jit(optax_step)(*ref, batch)
    *out, loss = par(*out, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  assert_trees_close(out, ref)
  ex = par.get_executable(params, opt_state, batch)
  # opt_state holds adam's scalar `count`: only the data is the batch
  assert ex.signature.batch == (2,)
  assert len(par._cache) == 1  # the outputs fed back reuse the executable


def _weights_step(w, x):
  return w - 0.1 * jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)


@pytest.mark.parametrize("fun, args, batch", [
    (optax_step, _optax_setup(), (2,)),
    # a train state with a step counter, and two batch arguments
    (lambda s, x, y: (s, jnp.mean(x) + jnp.mean(y)),
     ({"step": 0, "w": jnp.ones((4, 4))}, jnp.ones((8, 3)), jnp.ones((8,))),
     (1, 2)),
    # a weight matrix whose leading size is not the batch's, returned updated
    (_weights_step, (jnp.ones((16, 16)), jnp.ones((8, 16))), (1,)),
    # ... or the same as the batch's: the step returns it, so it is state
    (_weights_step, (jnp.ones((8, 4)), jnp.ones((8, 8))), (1,)),
    # gradients of the parameters are the parameters' next value too
    (jax.grad(lambda w, x: jnp.sum(x @ w)),
     (jnp.ones((8, 4)), jnp.ones((8, 8))), (1,)),
    # nothing tells two same-sized arguments apart: both are the batch
    (lambda x, y: jnp.sum(x) + jnp.sum(y),
     (jnp.ones((8, 2)), jnp.ones((8, 3))), (0, 1)),
], ids=["optax", "two-batch-args", "weights", "weights-of-batch-size",
        "grads", "both"])
def test_inferred_batch(fun, args, batch):
  assert infer_batch_argnums(fun, _sig(args)) == batch


def test_donated_arguments_are_not_the_batch():
  args = (jnp.ones((8, 4)), jnp.ones((16, 4)))
  assert infer_batch_argnums(lambda a, b: a, _sig(args, donate=(0,))) == (1,)


@pytest.mark.parametrize("f, args, match", [
    (lambda a, b: jnp.sum(jnp.tanh(a @ b)),
     (jnp.ones((16, 32)), jnp.ones((32, 8))),
     r"ambiguous: arg 0 \(leading size 16\), arg 1 \(leading size 32\)"),
    (lambda p, s: p["w"] * s, ({"w": jnp.ones((3, 4)), "b": jnp.ones(4)},
                               jnp.float32(2.0)),
     r"no argument .* \(arg 0: leading sizes \[3, 4\]; arg 1: leading sizes "
     r"\[scalar\]\)"),
], ids=["ambiguous", "no-candidate"])
def test_undetermined_batch_is_an_error_where_it_is_split(f, args, match):
  result = infer_batch_argnums(f, _sig(args))
  assert isinstance(result, NoBatch)
  for method in (alpa_py.DataParallel(devices=DEVICES),
                 alpa_py.ShardParallel(devices=DEVICES, num_micro_batches=2)):
    with pytest.raises(ValueError, match=match + r".*batch_argnums="):
      alpa_py.parallelize(f, method=method)(*args)


def test_undetermined_batch_is_fine_where_it_is_not_split():
  x, y = jnp.ones((16, 32)), jnp.ones((32, 8)) * 0.1
  par = alpa_py.parallelize(lambda a, b: jnp.tanh(a @ b),
                            method=alpa_py.ShardParallel(devices=DEVICES))
  np.testing.assert_allclose(par(x, y), jnp.tanh(x @ y), rtol=1e-5)
  assert par.get_executable(x, y).signature.batch == ()


def test_explicit_batch_argnums_are_kept():
  x, y = jnp.ones((16, 32)), jnp.ones((32, 8)) * 0.1
  par = alpa_py.parallelize(lambda a, b: jnp.tanh(a @ b), batch_argnums=(1,),
                            method=alpa_py.ShardParallel(devices=DEVICES))
  assert par.get_executable(x, y).signature.batch == (1,)


# -- non-array leaves are static ----------------------------------------------

def test_static_leaf_equality():
  assert StaticLeaf("a") == StaticLeaf("a") and \
      hash(StaticLeaf("a")) == hash(StaticLeaf("a"))
  assert StaticLeaf(1) != StaticLeaf(True)  # same value, another type
  ns = types.SimpleNamespace(k=1)  # unhashable: compared by identity
  assert StaticLeaf(ns) == StaticLeaf(ns)
  assert StaticLeaf(ns) != StaticLeaf(types.SimpleNamespace(k=1))


def test_non_array_leaves_are_static_inputs_and_outputs():
  def f(batch):
    return {"y": batch["fn"](batch["x"]), "name": batch["name"]}

  x = jnp.arange(16.0).reshape(8, 2)
  par = alpa_py.parallelize(f, method=alpa_py.ShardParallel(devices=DEVICES))
  out = par({"x": x, "name": "run-a", "fn": jnp.tanh})
  assert out["name"] == "run-a"
  np.testing.assert_allclose(out["y"], jnp.tanh(x), rtol=1e-6)
  ex = par.get_executable({"x": x, "name": "run-a", "fn": jnp.tanh})
  assert [p for p, _ in ex.signature.static_leaves] == ["arg0['fn']",
                                                       "arg0['name']"]
  assert ex.signature.batch == (0,)
  # an equal string is the same signature; another one compiles again
  assert len(par._cache) == 1
  out = par({"x": x, "name": "run-b", "fn": jnp.tanh})
  assert out["name"] == "run-b" and len(par._cache) == 2
  with pytest.raises(TypeError, match=r"static value at arg0\['name'\] is "
                     "'run-c', compiled for 'run-a'"):
    ex({"x": x, "name": "run-c", "fn": jnp.tanh})


def test_a_bool_flag_is_static_and_can_be_branched_on():
  """A Python bool leaf (a ``train`` switch, Equinox's
  ``Dropout.inference``) is static, as under ``equinox.filter_jit``; ints
  and floats stay arrays, as under ``jax.jit``."""
  def f(x, cfg):
    y = x * cfg["scale"]
    return jnp.tanh(y) if cfg["train"] else y

  x = jnp.arange(16.0).reshape(8, 2)
  par = alpa_py.parallelize(f, method=alpa_py.ShardParallel(devices=DEVICES))
  for train in (True, False):
    np.testing.assert_allclose(par(x, {"train": train, "scale": 0.5}),
                               f(x, {"train": train, "scale": 0.5}),
                               rtol=1e-6)
  ex = par.get_executable(x, {"train": True, "scale": 0.5})
  assert [p for p, _ in ex.signature.static_leaves] == ["arg1['train']"]
  assert "arg1['scale']" in ex.signature.paths
  par(x, {"train": True, "scale": 0.25})  # a new float: no recompile
  assert len(par._cache) == 2


def test_a_static_leaf_that_changes_each_call_warns():
  def f(x, cfg):
    return cfg["act"](x)

  x = jnp.ones((8, 2))
  par = alpa_py.parallelize(f, method=alpa_py.ShardParallel(devices=DEVICES))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for k in range(alpa_py.api.RECOMPILES_BEFORE_WARNING + 1):
      # a new function each call: a new static value, a new compile
      par(x, {"act": lambda v, k=k: v * k})
      ours = [w for w in caught if issubclass(w.category,
                                              alpa_py.RecompileWarning)]
      assert len(ours) == (k + 1 >= alpa_py.api.RECOMPILES_BEFORE_WARNING)
  assert "arg1['act']" in str(ours[0].message)
  assert "5 different values" in str(ours[0].message)


def test_equinox_module_passed_whole():
  eqx = pytest.importorskip("equinox")

  def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

  def step(model, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))
    return model, loss

  kx, ky, km = jax.random.split(jax.random.PRNGKey(0), 3)
  model = eqx.nn.MLP(8, 2, width_size=16, depth=2, key=km)
  x = jax.random.normal(kx, (32, 8))
  y = jax.random.normal(ky, (32, 2))
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(devices=DEVICES))
  ref, out = model, model
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    for _ in range(2):
      ref, ref_loss = eqx.filter_jit(step)(ref, x, y)
      out, loss = par(out, x, y)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  ref_arrays, ref_static = eqx.partition(ref, eqx.is_array)
  out_arrays, out_static = eqx.partition(out, eqx.is_array)
  assert_trees_close(out_arrays, ref_arrays)
  assert jax.tree_util.tree_structure(out_static) == \
      jax.tree_util.tree_structure(ref_static)
  assert out.activation is model.activation  # static leaves come back as is
  assert len(par._cache) == 1
  assert par.get_executable(model, x, y).signature.batch == (1, 2)
