"""The firing-neuron index equals brute-force thresholding, also after many
random updates (property-based)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from alpa_py.kernels.sparse_neuron import FiringIndex


def brute(W, X, b):
  C = X @ W.T
  return [set(np.nonzero(C[i] > b)[0].tolist()) for i in range(X.shape[0])]


def got_sets(ids, counts):
  ids, counts = np.asarray(ids), np.asarray(counts)
  return [set(ids[i, :counts[i]].tolist()) for i in range(ids.shape[0])]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 200), n=st.integers(1, 12),
       block=st.sampled_from([8, 32, 64]), b=st.floats(-1.0, 3.0),
       max_blocks=st.one_of(st.none(), st.integers(1, 4)),
       updates=st.integers(0, 6))
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
  ids, counts, overflow = index.query(b, max_blocks=max_blocks)
  assert got_sets(ids, counts) == brute(W, X, b)
  np.testing.assert_allclose(np.asarray(index.corr)[:, :m], X @ W.T,
                             rtol=1e-5, atol=1e-5)


def test_capacity_overflow_is_flagged():
  rng = np.random.default_rng(0)
  W = rng.normal(size=(100, 4)).astype(np.float32)
  X = rng.normal(size=(3, 4)).astype(np.float32)
  index = FiringIndex.build(W, X, block=16)
  ids, counts, overflow = index.query(-10.0, capacity=5)  # all fire
  assert ids.shape == (3, 5)
  assert np.all(np.asarray(counts) == 5) and np.all(np.asarray(overflow))


def test_bad_shapes():
  with pytest.raises(ValueError, match="expected W"):
    FiringIndex.build(np.ones((4, 3)), np.ones((2, 5)))
  index = FiringIndex.build(np.ones((4, 3)), np.ones((2, 3)))
  with pytest.raises(ValueError, match="new_rows has shape"):
    index.update([0], np.ones((1, 5)))
