"""Serving policies (``serve.scheduler``) and the discrete-event cluster
simulator (``serve.simulator``): each policy does what its name says, the
simulator conserves requests and tokens, and batching many adapters beats
one adapter per batch by far on Punica's *distinct* workload."""

import math

import pytest

from alpa_py.serve import scheduler, sim_report, simulator, workloads
from alpa_py.serve.scheduler import GpuView


def _views():
  return [GpuView(0, 3, 4, 10, frozenset({1}), frozenset({1, 2})),
          GpuView(1, 1, 4, 50, frozenset({5}), frozenset({5})),
          GpuView(2, 4, 4, 90, frozenset({7}), frozenset({7})),  # full
          GpuView(3, 0, 4, 100, frozenset(), frozenset({9}))]


def test_punica_consolidates_into_the_largest_batch_with_room():
  p = scheduler.get_policy("punica")
  assert p.choose(9, 2, _views()) == 0  # batch 3 of 4, room for 2 pages
  assert p.choose(9, 20, _views()) == 1  # gpu 0 lacks the KV room
  ties = [GpuView(0, 2, 4, 10, frozenset(), frozenset()),
          GpuView(1, 2, 4, 30, frozenset(), frozenset())]
  assert p.choose(0, 1, ties) == 1  # ties: the most free KV pages
  assert p.choose(0, 1000, _views()) is None  # queued


def test_other_policies():
  views = _views()
  assert scheduler.get_policy("least-loaded").choose(1, 1, views) == 3
  rr = scheduler.get_policy("round-robin")
  assert [rr.choose(1, 1, views) for _ in range(4)] == [0, 1, 3, 0]
  one = scheduler.get_policy("one-adapter-per-batch")
  assert one.choose(5, 1, views) == 1 and one.choose(1, 1, views) == 0
  assert one.choose(4, 1, views) == 3  # only the empty GPU
  aff = scheduler.get_policy("adapter-affinity")
  assert aff.choose(2, 1, views) == 0  # cached on gpu 0
  assert aff.choose(9, 1, views) == 3 and aff.choose(8, 1, views) == 3
  with pytest.raises(ValueError, match="punica"):
    scheduler.get_policy("fastest")


def test_workloads_follow_their_definitions():
  n = 400
  d = workloads.make_workload("distinct", n, 10.0, seed=1)
  assert len({r.adapter for r in d}) == n
  u = workloads.make_workload("uniform", n, 10.0, seed=1)
  assert len({r.adapter for r in u}) <= round(math.sqrt(n))
  s = workloads.make_workload("skewed", n, 10.0, seed=1)
  top = max({r.adapter for r in s}, key=[r.adapter for r in s].count)
  assert [r.adapter for r in s].count(top) > n / 4  # Zipf 1.5 head
  assert {r.adapter for r in workloads.make_workload("identical", n, 1.0)} \
      == {0}
  for r in d + s:
    assert r.prompt_len >= 2 and r.output_len >= 1
    assert r.prompt_len + r.output_len <= workloads.MAX_TOTAL
  gaps = [b.arrival - a.arrival for a, b in zip(d, d[1:])]
  assert abs(sum(gaps) / len(gaps) - 0.1) < 0.02  # rate 10/s
  sl = workloads.make_workload("slora", n, 10.0, cv=4.0)
  assert all(8 <= r.prompt_len <= 512 and 8 <= r.output_len <= 512
             for r in sl)
  with pytest.raises(ValueError, match="distinct"):
    workloads.make_workload("zipf", 10, 1.0)


def _small_model():
  return simulator.StepTimeModel.roofline()


def test_simulator_conserves_requests_and_counts_gpu_time():
  reqs = workloads.make_workload("skewed", 120, 4.0, seed=2)
  for name in scheduler.POLICIES:
    r = simulator.simulate(reqs, scheduler.get_policy(name), gpus=3,
                           model=_small_model())
    assert r["requests"] == 120
    tokens = sum(q.prompt_len + q.output_len for q in reqs)
    assert r["throughput_tokens_per_s"] * r["span_seconds"] == \
        pytest.approx(tokens)
    assert 0 < r["gpu_seconds"] <= 3 * r["span_seconds"] + 1e-9
    assert r["p50_seconds_per_output_token"] <= \
        r["p99_seconds_per_output_token"]


def test_a_small_kv_pool_preempts_and_still_finishes():
  reqs = workloads.make_workload("uniform", 60, None, seed=3)
  r = simulator.simulate(reqs, scheduler.get_policy("punica"), gpus=2,
                         model=_small_model(), num_pages=300)
  assert r["preemptions"] > 0 and r["requests"] == 60


def test_punica_batches_beat_one_adapter_per_batch_on_distinct():
  res = sim_report.compare("distinct", 4, ["punica", "least-loaded",
                                           "one-adapter-per-batch"],
                           requests=150, progress=False)
  by = {(r["load"], r["policy"]): r for r in res["rows"]}
  assert by["saturating", "punica"]["throughput_tokens_per_s"] >= \
      3 * by["saturating", "one-adapter-per-batch"]["throughput_tokens_per_s"]
  # consolidation: fewer GPU-seconds than spreading at half load
  assert by["half", "punica"]["gpu_seconds"] < \
      by["half", "least-loaded"]["gpu_seconds"]
  assert "roofline" in res["step_time_model"]


def test_serve_sim_cli_refuses_bad_input(capsys):
  from alpa_py import cli
  assert cli.main(["serve-sim", "--workload", "zipf"]) == 2
  assert "distinct" in capsys.readouterr().err
  assert cli.main(["serve-sim", "--gpus", "0"]) == 2
  assert cli.main(["serve-sim", "--policy", "fastest"]) == 2
  assert "punica" in capsys.readouterr().err
