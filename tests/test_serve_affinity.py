"""Routing requests that name no adapter by embedding affinity under
per-adapter capacity (``serve.AdapterRouting``): the matching's capacity
holds while requests come and go, the Router serves a routed request with
its adapter (tokens equal the full model's with that adapter), and the
simulator routes unnamed requests the same way."""

import numpy as np
import pytest

from alpa_py import serve
from alpa_py.serve import scheduler, simulator, workloads
from serve_models import CFG, NUM_ADAPTERS, check_greedy, tiny_model


def _embeddings(n=NUM_ADAPTERS, d=16, seed=0):
  e = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.mark.parametrize("algorithm", ["greedy", "primal_dual"])
@pytest.mark.parametrize("weights", ["exact", "mips"])
def test_routing_respects_capacity_as_slots_come_and_go(algorithm, weights):
  emb = _embeddings(40, 8)
  routing = serve.AdapterRouting(emb, 2, algorithm=algorithm, weights=weights,
                                 probe=100)
  rng = np.random.default_rng(1)
  live = []
  for step in range(400):
    if live and rng.uniform() < 0.45:
      routing.release(live.pop(rng.integers(len(live))))
    else:
      a = routing.route(emb[rng.integers(40)] + 0.1 * rng.normal(size=8))
      if a >= 0:
        live.append(a)
    counts = np.bincount(live, minlength=40)
    assert np.all(counts <= 2)
    np.testing.assert_array_equal(counts, routing.load)
  # with room everywhere, greedy sends a request to its nearest adapter
  fresh = serve.AdapterRouting(emb, 1)
  assert fresh.route(emb[7]) == 7
  assert fresh.route(emb[7]) != 7  # full now: the next best
  fresh.release(7)
  assert fresh.route(emb[7]) == 7


def test_routing_bad_input():
  emb = _embeddings()
  with pytest.raises(ValueError, match=r"algorithm \(='best'\)"):
    serve.AdapterRouting(emb, 1, algorithm="best")
  with pytest.raises(ValueError, match=r"capacities must be positive"):
    serve.AdapterRouting(emb, 0)
  r = serve.AdapterRouting(emb, 1)
  with pytest.raises(ValueError, match=r"shape \(3,\); the adapters' "
                     r"embeddings have dimension 16"):
    r.route([1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="holds no routed request"):
    r.release(2)
  with pytest.raises(ValueError, match="Request.embedding must be"):
    serve.Request(prompt=[1], embedding=[float("nan")]).check(
        vocab_size=8, num_adapters=1, seq_len=32)


def test_router_serves_routed_requests_with_their_adapter():
  model, params = tiny_model()
  emb = _embeddings()
  routing = serve.AdapterRouting(emb, 2)
  router = serve.make_router(CFG, params, num_engines=2, max_batch=4,
                             page_size=4, adapter_routing=routing)
  rng = np.random.default_rng(0)
  want = [int(a) for a in rng.integers(0, NUM_ADAPTERS, 6)]
  reqs = [serve.Request(prompt=[int(t) for t in rng.integers(0, 64, 5)],
                        max_new_tokens=4, embedding=list(emb[a]))
          for a in want]
  named = serve.Request(prompt=[3, 4], adapter=5, max_new_tokens=3,
                        embedding=list(emb[0]))  # names one: not routed
  rids = [router.submit(r) for r in reqs + [named]]
  routed = [router.routed_adapter(rid) for rid in rids]
  assert routed[-1] is None
  out = {rid: [] for rid in rids}
  while router.has_work:
    for ev in router.step():
      out[ev.rid].append(ev.token)
  for rid, req, a in zip(rids, reqs, routed):
    assert a is not None and 0 <= a < NUM_ADAPTERS
    check_greedy(serve.Request(prompt=req.prompt, adapter=a,
                               max_new_tokens=4), out[rid])
  check_greedy(named, out[rids[-1]])
  # every slot was released as requests finished
  assert routing.load.sum() == 0
  # nearest adapter while it had room
  assert sum(a == w for a, w in zip(routed, want)) >= 4
  router.close()


def test_simulator_routes_unnamed_requests_under_capacity():
  reqs = workloads.make_workload("skewed", 150, 4.0, seed=5, unnamed=0.6,
                                 embed_dim=16)
  unnamed = [r for r in reqs if r.adapter < 0]
  assert 60 < len(unnamed) < 120 and all(r.intended >= 0 for r in unnamed)
  emb = workloads.adapter_embeddings(
      workloads.num_adapters_of("skewed", 150), 16, seed=5)
  model = simulator.StepTimeModel.roofline(params=1e9, layers=8,
                                           hidden=2048)
  for weights in ("exact", "mips"):
    routing = serve.AdapterRouting(emb, 3, weights=weights, probe=4)
    r = simulator.simulate(reqs, scheduler.get_policy("punica"), gpus=2,
                           model=model, adapter_routing=routing)
    assert r["requests"] == 150 and r["unnamed_requests"] == len(unnamed)
    assert r["peak_routed_per_adapter"] <= 3
    assert r["routed_requests"] + routing.unrouted == len(unnamed)
    # most reach the adapter their embedding came from
    assert r["routed_to_intended"] >= 0.8 * r["routed_requests"]
    assert routing.load.sum() == 0  # all released
