"""The multi-LoRA decode engine (``alpa_py.serve``): its greedy tokens are
the full model's, request by request, whatever batch a request runs in;
pages are recycled, requests are preempted and recomputed, adapters are
swapped through a bounded device cache, and bad input is refused."""

import pytest
from serve_models import check_greedy, tiny_model, workload

from alpa_py import serve
from alpa_py.models.gpt import GPT, GPTConfig
from alpa_py.serve import decoder


@pytest.mark.parametrize("kind", ["distinct", "uniform", "skewed",
                                  "identical"])
def test_tokens_equal_the_full_model_request_by_request(kind):
  model, params = tiny_model()
  reqs = workload(kind, 12)
  # 4 rows for 12 requests: requests join as others leave; a small pool
  # recycles pages (and preempts when it runs short)
  engine = serve.Engine(model, params, max_batch=4, page_size=4, num_pages=14)
  outs = engine.generate(reqs)
  for req, out in zip(reqs, outs):
    check_greedy(req, out)
  st = engine.stats
  assert st.generated_tokens == sum(len(o) for o in outs)
  assert 1 < st.mean_batch_size <= 4
  assert engine.pool.free == engine.pool.num_pages  # every page returned
  assert not engine.has_work


def test_preempted_requests_are_recomputed_and_still_exact():
  model, params = tiny_model()
  reqs = [serve.Request(prompt=[i + 1, 2 * i + 3], adapter=i,
                        max_new_tokens=20) for i in range(4)]
  # 4 requests of up to 22 tokens = 24 pages of 4 at the end; 12 pages
  engine = serve.Engine(model, params, max_batch=4, page_size=4, num_pages=12)
  outs = engine.generate(reqs)
  assert engine.stats.preemptions > 0
  for req, out in zip(reqs, outs):
    check_greedy(req, out)


def test_stop_tokens_end_a_request():
  model, params = tiny_model()
  engine = serve.Engine(model, params, max_batch=2)
  req = serve.Request(prompt=[5, 6, 7], adapter=2, max_new_tokens=10)
  full = engine.generate([req])[0]
  stop = full[3]
  first = full.index(stop)
  got = engine.generate([serve.Request(prompt=[5, 6, 7], adapter=2,
                                       max_new_tokens=10, stop=(stop,))])[0]
  assert got == full[:first + 1]


def test_sampling_depends_on_the_seed_not_the_batch():
  model, params = tiny_model()
  req = serve.Request(prompt=[9, 8, 7], adapter=1, max_new_tokens=8,
                      temperature=1.0, seed=11)
  alone = serve.Engine(model, params, max_batch=4).generate([req])[0]
  others = workload("distinct", 5, seed=3)
  mixed = serve.Engine(model, params, max_batch=4).generate(
      others[:2] + [req] + others[2:])[2]
  assert alone == mixed
  other_seed = serve.Engine(model, params, max_batch=4).generate(
      [serve.Request(prompt=[9, 8, 7], adapter=1, max_new_tokens=8,
                     temperature=1.0, seed=12)])[0]
  assert other_seed != alone  # 8 draws over 64 tokens


def test_bounded_adapter_cache_loads_evicts_and_never_overfills():
  model, params = tiny_model()
  reqs = workload("distinct", 10)
  engine = serve.Engine(model, params, max_batch=4, adapter_cache=2)
  rids = [engine.submit(r) for r in reqs]
  out = {rid: [] for rid in rids}
  while engine.has_work:
    for ev in engine.step():
      out[ev.rid].append(ev.token)
    running = {s.req.adapter for s in engine._running if s.req.adapter >= 0}
    assert len(running) <= 2
  st = engine.stats
  used = {r.adapter for r in reqs if r.adapter >= 0}
  assert st.adapter_loads >= len(used) and st.adapter_evictions > 0
  assert st.adapter_loads - st.adapter_evictions <= 2
  for req, rid in zip(reqs, rids):
    check_greedy(req, out[rid])


def test_decode_compiles_once_per_batch_bucket():
  model, params = tiny_model()
  engine = serve.Engine(model, params, max_batch=8)
  before = decoder.decode_step._cache_size()
  engine.generate(workload("uniform", 20, seed=5))
  # buckets 1, 2, 4, 8 at most, whatever the 20 requests' lengths
  assert decoder.decode_step._cache_size() - before <= 4


@pytest.mark.parametrize("bad,match", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, 64]), "vocabulary"),
    (dict(prompt=[1], adapter=8), "adapter"),
    (dict(prompt=[1], adapter=-2), "adapter"),
    (dict(prompt=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=[1], temperature=-0.5), "temperature"),
    (dict(prompt=[1] * 30, max_new_tokens=8), "seq_len"),
])
def test_bad_requests_are_refused_by_name(bad, match):
  model, params = tiny_model()
  engine = serve.Engine(model, params, max_batch=2)
  with pytest.raises(ValueError, match=match):
    engine.generate([serve.Request(**bad)])
  assert not engine.has_work  # nothing half-queued


def test_a_pool_too_small_for_one_request_is_refused():
  model, params = tiny_model()
  engine = serve.Engine(model, params, max_batch=2, page_size=4, num_pages=2)
  with pytest.raises(ValueError, match="too small.*num_pages"):
    engine.submit(serve.Request(prompt=[1, 2, 3], max_new_tokens=8))
  with pytest.raises(ValueError, match="num_pages"):
    serve.Engine(model, params, num_pages=0)
  with pytest.raises(ValueError, match="lora_adapters"):
    serve.Engine(GPT(GPTConfig()), params)
