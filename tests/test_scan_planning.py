"""Scans are planned through their bodies (``graph.Region``).

The decoder of ``scan_models`` written the MaxText way
(``nn.scan(nn.remat(Block), variable_axes={'params': 0}, ...)``) against the
same decoder unrolled: the scan plan lists the body's dot ops, keeps the
stacked (layer) dim of every stacked parameter whole, uses no more memory
than the unrolled plan, compiles without XLA's involuntary full
rematerialization, and trains like ``jax.jit``. The end-to-end runs happen
in a subprocess, so that XLA's C++ log (stderr) can be read.
"""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler.auto_sharding import run_auto_sharding
from alpa_py.compiler.cluster_env import LogicalMesh, get_profile
from alpa_py.compiler.graph import build_graph
from alpa_py.compiler.graph_eval import evaluate
from alpa_py.compiler.options import AutoShardingOption
from scan_models import DecoderConfig, decoder_setup

PROFILE = "a100_8x_nvlink_100gbps"
MESH = (1, 4)

_PROBE = r'''
import json, os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
import jax, numpy as np
import alpa_py
from scan_models import DecoderConfig, decoder_setup

# the default decoder (data parallel wins) and a wide one on a small batch
# (Megatron-style wins: its kernels are split on their hidden dims)
WIDE = DecoderConfig(hidden=1024, mlp=4096, heads=8, batch=2, layers=2)
out = {}
for name, scanned, cfg in (("scan", True, DecoderConfig()),
                           ("unrolled", False, DecoderConfig()),
                           ("scan_wide", True, WIDE),
                           ("unrolled_wide", False, WIDE)):
  state, tokens, step = decoder_setup(cfg, scanned=scanned)
  f = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      devices=jax.devices()[:4], mesh_shape=%(mesh)r,
      auto_sharding_option=alpa_py.AutoShardingOption(cost_profile=%(prof)r)))
  ex = f.get_executable(state, tokens)
  ours, ref = state, state
  for _ in range(3):
    ours, loss = f(ours, tokens)
    ref, ref_loss = jax.jit(step)(ref, tokens)
  err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) /
                         (np.abs(np.asarray(b)) + 1e-3)))
            for a, b in zip(jax.tree_util.tree_leaves(ours.params),
                            jax.tree_util.tree_leaves(ref.params)))
  out[name] = dict(
      ops=len(ex.plan.ops), trips=[o.trips for o in ex.plan.ops],
      specs={t.name: [None if e is None else str(e) for e in t.spec]
             for t in ex.plan.inputs if len(t.shape) >= 2},
      memory=int(ex.memory_per_device()), rel_err=err,
      loss=[float(loss), float(ref_loss)])
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def runs():
  """Both decoders compiled and run in a subprocess: (results, stderr)."""
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", ALPA_PY_QUIET="1",
             TESTS_DIR=os.path.dirname(__file__),
             # every C++ log line of XLA reaches stderr (INFO included), so
             # that reading it proves the log is seen at all
             TF_CPP_MIN_LOG_LEVEL="0")
  proc = subprocess.run(
      [sys.executable, "-c", _PROBE % {"mesh": MESH, "prof": PROFILE}],
      env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):]), proc.stderr


def test_scan_plan_lists_body_dots(runs):
  res, _ = runs
  # 3 dot ops outside the layers; 6 per layer forward, 17 per layer backward
  # (the remat-ed forward recomputed, and the weight / input gradients)
  assert res["scan"]["ops"] == 26 and res["unrolled"]["ops"] == 95
  assert sorted(set(res["scan"]["trips"])) == [1, 4]
  assert res["scan"]["ops"] - res["scan"]["trips"].count(1) == 23


def test_stacked_dim_never_sharded(runs):
  res, _ = runs
  stacked = {k: v for k, v in res["scan"]["specs"].items() if "layers" in k}
  assert len(stacked) == 12  # 4 kernels and 2 norm scales, params, momentum
  for name, spec in stacked.items():
    assert not spec or spec[0] is None, (name, spec)
  # the momentum of the stacked kernels is sharded, on a hidden dim
  assert any(len(spec) > 1 and any(spec[1:]) for name, spec in stacked.items()
             if "trace" in name), stacked


def test_wide_scan_kernels_sharded_on_hidden_dims(runs):
  """Where Megatron-style wins, the stacked kernels are split on a hidden
  dim, as the unrolled layers' kernels are, never on the layer axis."""
  res, _ = runs
  for key, stacked in (("scan_wide", True), ("unrolled_wide", False)):
    kernels = {k: v for k, v in res[key]["specs"].items()
               if "kernel" in k and "trace" not in k and
               ("layers" in k) == stacked and "layer" in k}
    assert kernels, res[key]["specs"]
    for name, spec in kernels.items():
      if stacked:
        assert not spec or spec[0] is None, (name, spec)
    sharded = [k for k, v in kernels.items() if any(v)]
    assert any("up" in k for k in sharded) and any("down" in k
                                                   for k in sharded), kernels


@pytest.mark.parametrize("size", ["", "_wide"])
def test_scan_memory_within_unrolled(runs, size):
  res, _ = runs
  scan, unrolled = res["scan" + size], res["unrolled" + size]
  ratio = scan["memory"] / unrolled["memory"]
  assert ratio <= 1.1, (scan["memory"], unrolled["memory"])


def test_no_involuntary_rematerialization(runs):
  _, stderr = runs
  assert "pjrt_client.cc" in stderr  # XLA's C++ log is read here
  assert "Involuntary full rematerialization" not in stderr


@pytest.mark.parametrize("name", ["scan", "unrolled", "scan_wide",
                                  "unrolled_wide"])
def test_matches_jit_after_three_steps(runs, name):
  res, _ = runs
  assert res[name]["rel_err"] < 1e-4, res[name]
  np.testing.assert_allclose(*res[name]["loss"], rtol=1e-5)


# -- unit tests ----------------------------------------------------------------

def test_graph_regions_of_scanned_decoder():
  state, tokens, step = decoder_setup(DecoderConfig(layers=2, hidden=32,
                                                    heads=2, mlp=64, seq=8,
                                                    vocab=64))
  g = build_graph(jax.make_jaxpr(step)(state, tokens))
  assert [r.length for r in g.regions.values()] == [2, 2]  # forward, backward
  for r in g.regions.values():
    scan = g.ops[r.op]
    assert scan.name == "scan"
    assert all(op.region == r.op and op.trips == 2 for op in r.ops)
    assert len(r.invars) == len(scan.inputs)
    assert len(r.outvars) == len(scan.outputs)
    for t, ref in zip(r.xs_in, scan.inputs[len(r.invars) - len(r.xs_in):]):
      assert g.tensor(ref).shape[1:] == g.tensor(t).shape
  dots = [op for op in g.all_ops() if op.name == "dot_general"]
  assert len([op for op in g.ops if op.name == "dot_general"]) == 3
  assert len(dots) > 3
  flat = jax.tree_util.tree_leaves((state, tokens))
  got = jax.jit(lambda *a: evaluate(g, a))(*flat)
  want = jax.tree_util.tree_leaves(jax.jit(step)(state, tokens))
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                               atol=1e-6)


def _rnn(ws, h):
  def body(h, w):
    return jnp.tanh(h @ w), jnp.sum(h, axis=1)
  h, ys = jax.lax.scan(body, h, ws)
  return jnp.sum(h ** 2) + jnp.sum(ys)


def test_carry_layout_tied_and_stacked_dim_whole():
  ws = jax.random.normal(jax.random.PRNGKey(0), (3, 128, 128)) / 12
  h = jax.random.normal(jax.random.PRNGKey(1), (64, 128))
  g = build_graph(jax.make_jaxpr(jax.grad(_rnn, argnums=(0, 1)))(ws, h))
  assert len(g.regions) == 2
  mesh = LogicalMesh((4,), get_profile(PROFILE))
  sol = run_auto_sharding(g, mesh, AutoShardingOption(cost_profile=PROFILE))
  spec = sol.spec_of
  for r in g.regions.values():
    for t_in, t_out in zip(r.carry_in, r.carry_out):
      if isinstance(t_out, int) and g.tensor(t_in).shape:
        assert spec[t_in] == spec[t_out], (t_in, t_out)
    scan = g.ops[r.op]
    stacked = scan.inputs[len(r.invars) - len(r.xs_in):]
    for ref in list(stacked) + list(scan.outputs[len(r.carry_in):]):
      if isinstance(ref, int):
        assert spec.get(ref, ((),))[0] == (), (ref, spec.get(ref))
  # one strategy per body op, each run 3 times
  body_ops = [op.index for r in g.regions.values() for op in r.ops]
  assert set(body_ops) <= set(sol.strategy_of)


def test_scan_step_matches_jit():
  ws = jax.random.normal(jax.random.PRNGKey(0), (3, 128, 128)) / 12
  h = jax.random.normal(jax.random.PRNGKey(1), (64, 128))

  def step(ws, h):
    g = jax.grad(_rnn)(ws, h)
    return ws - 0.1 * g

  f = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      mesh_shape=(4,), devices=jax.devices()[:4],
      auto_sharding_option=alpa_py.AutoShardingOption(cost_profile=PROFILE)))
  ex = f.get_executable(ws, h)
  assert all(o.trips == 3 for o in ex.plan.ops)
  assert ex.plan.inputs[0].spec[:1] in ((), (None,))
  np.testing.assert_allclose(np.asarray(f(ws, h)),
                             np.asarray(jax.jit(step)(ws, h)), rtol=1e-5,
                             atol=1e-6)


def test_while_with_unknown_trip_count_warns_once():
  def step(w, x):
    def cond(c):
      return jnp.sum(c[1]) < 100.0
    def body(c):
      i, y = c
      return i + 1, y @ w + 1.0
    _, y = jax.lax.while_loop(cond, body, (0, x))
    return w - 0.01 * jnp.mean(y), y

  w = jnp.eye(32) * 0.5
  x = jnp.ones((16, 32))
  f = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      mesh_shape=(4,), devices=jax.devices()[:4]))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = f(w, x)
  ours = [w for w in caught
          if issubclass(w.category, alpa_py.ReplicatedControlFlowWarning)]
  assert len(ours) == 1, [str(w.message) for w in caught]
  assert "`while`" in str(ours[0].message)
  assert "of the step's FLOPs" in str(ours[0].message)
  ref = jax.jit(step)(w, x)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
