"""Firing-neuron operators: the index equals brute force (also after many
random updates, property-based), the gather-and-accumulate kernels equal
their references, and sparse training equals dense training."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from alpa_py.kernels import sparse_neuron as sn
from alpa_py.kernels.sparse_neuron import FiringIndex
from alpa_py.optim.sparse_sgd import sparse_sgd_step
from alpa_py.models.sparse_mlp import (SparseMLP, SparseSGD, dense_forward,
                                       dense_sgd_step)


def brute(W, X, b):
  C = X @ W.T
  return [set(np.nonzero(C[i] > b)[0].tolist()) for i in range(X.shape[0])]


def got_sets(ids, counts):
  ids, counts = np.asarray(ids), np.asarray(counts)
  return [set(ids[i, :counts[i]].tolist()) for i in range(ids.shape[0])]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 200), n=st.integers(1, 12),
       block=st.sampled_from([8, 32, 64]), b=st.floats(0.05, 3.0),
       max_blocks=st.one_of(st.none(), st.integers(1, 4)),
       updates=st.integers(0, 8))
def test_queries_equal_brute_force_after_updates(seed, m, n, block, b,
                                                 max_blocks, updates):
  rng = np.random.default_rng(seed)
  d = 6
  W = rng.normal(size=(m, d)).astype(np.float32)
  X = rng.normal(size=(n, d)).astype(np.float32)
  index = FiringIndex.build(W, X, block=block)
  for _ in range(updates):
    k = int(rng.integers(1, min(m, 5) + 1))
    ids = rng.choice(m, k, replace=False)
    rows = rng.normal(size=(k, d)).astype(np.float32)
    index = index.update(ids, rows)
    W[ids] = rows
  ids, counts = index.query(b, max_blocks=max_blocks)
  expect = brute(W, X, b)
  assert got_sets(ids, counts) == expect
  C = X @ W.T
  np.testing.assert_allclose(np.asarray(index.corr)[:m].T, C, rtol=1e-5,
                             atol=1e-5)
  # the tree levels: exact per-neuron maxima, valid block upper bounds
  np.testing.assert_allclose(np.asarray(index.neuron_max)[:m], C.max(0),
                             rtol=1e-5, atol=1e-5)
  corr = np.asarray(index.corr)
  true_blocks = corr.reshape(-1, block, n).max(1)
  assert np.all(np.asarray(index.block_bound) >= true_blocks - 1e-6)
  np.testing.assert_array_equal(np.asarray(index.refresh().block_bound),
                                true_blocks)
  union = index.firing_union(b, m)
  assert not bool(union.overflow)
  got_union = set(np.asarray(union.ids)[:int(union.count)].tolist())
  assert got_union == set().union(*expect)
  assert np.all(np.asarray(union.ids)[int(union.count):] == m)


def test_capacity_overflow_warns_and_falls_back_to_dense():
  rng = np.random.default_rng(0)
  W = rng.normal(size=(100, 4)).astype(np.float32)
  X = rng.normal(size=(3, 4)).astype(np.float32)
  index = FiringIndex.build(W, X, block=16)
  sets = index.query_padded(0.1, capacity=5)
  assert sets.ids.shape == (3, 5) and np.all(np.asarray(sets.overflow))
  with pytest.warns(UserWarning, match=r"capacity \(=5\) overflowed"):
    ids, counts = index.query(0.1, capacity=5)
  assert got_sets(ids, counts) == brute(W, X, 0.1)  # nothing truncated
  with pytest.raises(TypeError, match="query_padded"):
    jax.jit(lambda i: i.query(0.1, capacity=5))(index)
  union = index.firing_union(0.1, 4)
  assert bool(union.overflow) and int(union.count) > 4


def test_nonpositive_threshold_warns_once(monkeypatch):
  # the warn-once flag lives with check_threshold, in firing_index
  monkeypatch.setattr("alpa_py.kernels.firing_index._warned_threshold",
                      False)
  index = FiringIndex.build(np.ones((4, 3)), np.ones((2, 3)))
  with pytest.warns(UserWarning, match=r"b \(=0.0\) <= 0"):
    index.query(0.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    index.query(-1.0)  # once per process


def test_bad_shapes():
  with pytest.raises(ValueError, match="expected W"):
    FiringIndex.build(np.ones((4, 3)), np.ones((2, 5)))
  index = FiringIndex.build(np.ones((4, 3)), np.ones((2, 3)))
  with pytest.raises(ValueError, match="new_rows has shape"):
    index.update([0], np.ones((1, 5)))
  with pytest.raises(ValueError, match="backend"):
    sn.forward(index, jnp.array([0]), jnp.ones(4), 1.0, backend="cuda")
  with pytest.raises(ValueError, match=r"neuron_ids must lie in \[0, 4\); got "
                     "values from -1 to 4"):
    index.update([-1, 4], np.ones((2, 3)))
  with pytest.raises(ValueError, match="1-D"):
    index.update(0, np.ones((1, 3)))
  with pytest.raises(ValueError, match=r"capacity \(=0\) must be >= 1"):
    index.query(1.0, capacity=0)
  model = SparseMLP(width=4, threshold=1.0)
  with pytest.raises(ValueError, match="before init"):
    SparseSGD(model, 0.1).step(index, {"constants": {"a": jnp.ones(4)}},
                               jnp.zeros(2))


@pytest.mark.parametrize("n,k", [(5, 3), (32, 17), (130, 40)])
def test_pallas_kernels_equal_reference(n, k):
  rng = np.random.default_rng(n + k)
  m, d, b = 300, 7, 0.3
  W = rng.normal(size=(m, d)).astype(np.float32)
  X = rng.normal(size=(n, d)).astype(np.float32)
  index = FiringIndex.build(W, X, block=32)
  a = jnp.asarray(rng.normal(size=(m,)).astype(np.float32))
  ids = rng.choice(m, k, replace=False).astype(np.int32)
  ids[-2:] = m  # empty slots (the padding row)
  ids = jnp.asarray(ids)
  v = jnp.asarray(rng.normal(size=(n,)).astype(np.float32))
  small = sn.SparseBlockSizes(block_n=16, block_k=8)
  np.testing.assert_allclose(
      sn.forward_pallas(index.corr, ids, a, b, blocks=small, interpret=True),
      sn.forward_reference(index.corr, ids, a, b), rtol=1e-5, atol=1e-5)
  got = sn.transpose_apply_pallas(index.corr, index.X, ids, a, b, v,
                                  blocks=small, interpret=True)
  np.testing.assert_allclose(
      got, sn.transpose_apply_reference(index.corr, index.X, ids, a, b, v),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[-2:], 0.0)
  # the reference is the dense math restricted to ids
  sel = np.asarray(ids)[:-2]
  C = W[sel] @ X.T
  np.testing.assert_allclose(sn.forward_reference(index.corr, ids, a, b),
                             np.asarray(a)[sel] @ np.maximum(C - b, 0),
                             rtol=1e-4, atol=1e-5)


def _problem(n=48, d=12, m=3000, seed=0):
  rng = np.random.default_rng(seed)
  X = rng.normal(size=(n, d)).astype(np.float32)
  X /= np.linalg.norm(X, axis=1, keepdims=True)
  y = jnp.asarray(rng.normal(size=(n,)).astype(np.float32))
  return jnp.asarray(X), y


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_sparse_training_equals_dense(backend):
  X, y = _problem()
  b = 2.5
  model = SparseMLP(width=3000, threshold=b)
  variables = model.init(jax.random.PRNGKey(0), X)
  opt = SparseSGD(model, learning_rate=0.5, backend=backend)
  index = opt.init(variables, X)
  W, a = variables["params"]["kernel"], variables["constants"]["a"]
  np.testing.assert_allclose(sn.forward(index, jnp.arange(3000), a, b),
                             model.apply(variables, X), rtol=1e-5, atol=1e-6)
  steps = 20 if backend == "reference" else 4  # interpreted kernels are slow
  sparse_losses, dense_losses, unions = [], [], []
  for _ in range(steps):
    index, loss, info = opt.step(index, variables, y)
    W, dloss = dense_sgd_step(W, a, X, y, b, 0.5)
    sparse_losses.append(float(loss))
    dense_losses.append(float(dloss))
    unions.append(int(info.union))
    assert not bool(info.dense)
  # sparse in earnest: most neurons never fire, and the loss falls
  assert max(unions) < 0.5 * 3000 and min(unions) > 0
  assert sparse_losses[-1] < 0.5 * sparse_losses[0]
  np.testing.assert_allclose(sparse_losses, dense_losses, rtol=1e-5)
  np.testing.assert_allclose(index.W, W, rtol=1e-5, atol=1e-6)
  trained = SparseSGD.variables(variables, index)
  np.testing.assert_allclose(model.apply(trained, X),
                             dense_forward(W, a, X, b), rtol=1e-5, atol=1e-5)
  # the padding rows (the empty-slot id) were never written
  assert np.all(np.isneginf(np.asarray(index.corr)[3000:]))
  assert np.all(np.isneginf(np.asarray(index.neuron_max)[3000:]))
  # a further step donates the index, not the returned variables
  index, _, _ = opt.step(index, variables, y)
  assert np.all(np.isfinite(np.asarray(trained["params"]["kernel"])))
  # the caller's variables were not donated away
  assert variables["params"]["kernel"].shape == (3000, 12)
  np.asarray(variables["params"]["kernel"])


def test_union_overflow_runs_in_several_runs_with_warning():
  X, y = _problem(seed=1)
  b = 2.5
  model = SparseMLP(width=3000, threshold=b)
  variables = model.init(jax.random.PRNGKey(1), X)
  opt = SparseSGD(model, learning_rate=0.5, capacity=16)
  index = opt.init(variables, X)
  W, a = variables["params"]["kernel"], variables["constants"]["a"]
  # the step is exact although the union overflows the capacity: it goes
  # through the union in runs of 16
  index, loss, info = opt.step(index, variables, y)
  assert bool(info.overflow) and int(info.union) > 2 * 16
  W, dloss = dense_sgd_step(W, a, X, y, b, 0.5)
  np.testing.assert_allclose(float(loss), float(dloss), rtol=1e-6)
  np.testing.assert_allclose(index.W, W, rtol=1e-5, atol=1e-6)
  union = int(info.union)
  # its size is read one step behind: the next step warns and grows it
  with pytest.warns(UserWarning, match=r"more than the union capacity \(=16\)"):
    index, loss, info = opt.step(index, variables, y)
  assert opt.capacity >= union
  W, dloss = dense_sgd_step(W, a, X, y, b, 0.5)
  np.testing.assert_allclose(float(loss), float(dloss), rtol=1e-6)
  index, loss, info = opt.step(index, variables, y)
  assert not bool(info.overflow) and not bool(info.dense)
  W, dloss = dense_sgd_step(W, a, X, y, b, 0.5)
  np.testing.assert_allclose(index.W, W, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"y has shape \(3,\)"):
    opt.step(index, variables, y[:3])
  with pytest.raises(ValueError, match=r"capacity \(=0\) must be >= 1"):
    sparse_sgd_step(index, a, y, b, 0.5, capacity=0)


@pytest.mark.parametrize("capacity", [64, 8])
def test_sparse_step_makes_no_host_transfer(capacity):
  """The step is one device program: the union is found on the device,
  and an overflowing one (capacity 8) is gone through in runs, not read
  back to choose a program."""
  X, y = _problem(seed=2)
  b = 2.5
  model = SparseMLP(width=3000, threshold=b)
  variables = model.init(jax.random.PRNGKey(2), X)
  W, a = variables["params"]["kernel"], variables["constants"]["a"]
  index = FiringIndex.build(W, X)
  b_dev, lr = jnp.float32(b), jnp.float32(0.5)
  sparse_sgd_step(index, a, y, b_dev, lr, capacity=capacity)  # compiles
  index = FiringIndex.build(W, X)
  with jax.transfer_guard("disallow"):
    for _ in range(3):
      index, loss, info = sparse_sgd_step(index, a, y, b_dev, lr,
                                          capacity=capacity)
  for _ in range(3):
    W, _ = dense_sgd_step(W, a, X, y, b, 0.5)
  np.testing.assert_allclose(index.W, W, rtol=1e-5, atol=1e-6)
  assert bool(info.overflow) == (int(info.union) > capacity)


def _lowers_for_gpu(fn, *args):
  """Lowers ``fn`` for CUDA from this machine (the Pallas Triton lowering
  runs without a GPU): the power-of-two rule is checked here."""
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("n,d,k", [(48, 12, 17), (130, 7, 40), (1000, 64, 64)])
def test_pallas_kernels_lower_for_gpu_at_any_width(n, d, k):
  rng = np.random.default_rng(n)
  m = 300
  index = FiringIndex.build(rng.normal(size=(m, d)), rng.normal(size=(n, d)),
                            block=32)
  a = jnp.asarray(rng.normal(size=(m,)).astype(np.float32))
  ids = jnp.asarray(rng.choice(m, k, replace=False).astype(np.int32))
  v = jnp.asarray(rng.normal(size=(n,)).astype(np.float32))
  _lowers_for_gpu(lambda c, i: sn.forward_pallas(c, i, a, 0.3,
                                                 interpret=False),
                  index.corr, ids)
  _lowers_for_gpu(lambda c, i: sn.transpose_apply_pallas(
      c, index.X, i, a, 0.3, v, interpret=False), index.corr, ids)


def test_sparse_training_example_learns_and_matches_dense():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parent.parent / "examples" / "sparse_training.py"
  spec = importlib.util.spec_from_file_location("sparse_training", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  losses, unions, _, diff, trained = mod.run(steps=12, width=4096, n=64,
                                             verbose=False)
  assert losses[-1] < 0.5 * losses[0]
  assert 0 < max(unions) < 0.5
  assert diff < 1e-5
  assert trained["params"]["kernel"].shape == (4096, 32)


def test_auto_backend_follows_recorded_measurements(tmp_path, monkeypatch):
  from alpa_py.kernels import sparse_kernels, tuning
  monkeypatch.setenv("ALPA_PY_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(tuning, "PACKAGED", tmp_path / "none.json")
  tuning.records.cache_clear()
  try:
    rng = np.random.default_rng(0)
    index = FiringIndex.build(rng.normal(size=(300, 12)),
                              rng.normal(size=(48, 12)))
    sizes = sparse_kernels.step_sizes(index, 64)
    assert sparse_kernels.resolve_backend("auto", sizes) == "reference"
    rec = dict(op="sparse_step", dtype="float32", sizes=dict(sizes),
               best="pallas", us={})
    tuning.write(tuning.device_kind(), [rec])
    assert sparse_kernels.resolve_backend("auto", sizes) == "pallas"
    assert sparse_kernels.resolve_backend("reference", sizes) == "reference"
    # a record of another op leaves the LoRA default alone
    assert tuning.choose("lora_bgmv", jnp.float32, dict(tokens=1), "x") == "x"
  finally:
    tuning.records.cache_clear()
