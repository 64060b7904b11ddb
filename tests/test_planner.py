"""The serving planner: JellyBean's heuristic reproduces its published VQA
plan, the MILP beats it and is checked against brute force, bad input."""

import dataclasses
import itertools
import json
import os
import shutil

import pytest

from alpa_py.serve import planner as pl


@pytest.fixture(scope="module")
def vqa():
  return pl.load_jellybean(pl.VQA_EXAMPLE)


def _check_plan(problem, plan):
  """The plan meets every rate and the threshold, one operator per
  worker, within each worker's throughput, and its costs re-derive."""
  rates = problem.required_rates()
  used = [w for ws in plan.worker_rates.values() for w, _ in ws]
  assert len(used) == len(set(used))
  for op, ws in plan.worker_rates.items():
    var = plan.model_assignment[op]
    assert sum(r for _, r in ws) == pytest.approx(rates[op], rel=1e-6)
    for w, r in ws:
      assert -1e-9 <= r <= problem.throughput(op, w, var) * (1 + 1e-9)
  assert plan.end_to_end_accuracy >= problem.threshold
  assert plan.end_to_end_accuracy == problem.accuracy_of(plan.model_assignment)
  compute, comm = pl.plan_costs(problem, plan.model_assignment,
                                plan.worker_rates)
  assert compute == pytest.approx(plan.compute_cost, rel=1e-12)
  assert comm == pytest.approx(plan.communication_cost, rel=1e-9, abs=1e-12)


def test_heuristic_reproduces_jellybean_published_plan(vqa):
  plan = pl.jellybean_plan(vqa)
  # JellyBean's README: compute 6.242, communication 1.2667783071018048
  assert plan.compute_cost == pytest.approx(6.242, abs=1e-12)
  assert plan.communication_cost == pytest.approx(1.2667783071018048,
                                                  rel=1e-12)
  assert plan.end_to_end_accuracy == 56.59
  assert plan.model_assignment == {
      "ExtractImageFeature": "resnet18",
      "SpeechRecognition": "wav2vec2-large-960h-lv60-self", "VQA": "default"}
  assert plan.worker_assignment == {
      "ExtractImageFeature": ["workflow-compute-cpu-1",
                              "workflow-compute-cpu-2",
                              "workflow-compute-cpu-5"],
      "SpeechRecognition": ["workflow-compute-gpu-1",
                            "workflow-compute-cpu-3"],
      "VQA": ["workflow-compute-cpu-6"]}
  _check_plan(vqa, plan)


def test_milp_beats_the_heuristic_on_vqa_and_is_proven_optimal(vqa):
  plan = pl.optimal_plan(vqa, time_limit=10.0)
  _check_plan(vqa, plan)
  assert plan.total_cost <= 6.242 + 1.2667783071018048
  assert plan.optimality_gap < 1e-4
  assert plan.solve_seconds < 10.0
  out = plan.to_json()
  for key in ("compute_cost", "communication_cost", "end_to_end_accuracy",
              "model_assignment", "worker_assignment", "optimality_gap",
              "solve_seconds"):
    assert key in out
  json.dumps(out)


def _reduced(vqa, workers, rate):
  return dataclasses.replace(pl.restrict(vqa, workers=workers),
                             source_rates={s: rate for s in vqa.source_rates})


def _brute_force(problem):
  """Every variant combination and every map of workers to operators (or
  to none); rates by an LP per map. Exact on two tiers with prices uniform
  per tier pair: then one side of every sender-receiver product is a
  constant (the other side sits in one tier, or traffic would go down),
  so the cost is linear in the rates."""
  from ortools.linear_solver import pywraplp
  tiers = problem.tiers
  assert set(tiers.values()) == {0, 1}
  rates = problem.required_rates()
  ops, workers = problem.operators, problem.workers
  best = None
  for combo in problem.feasible_combinations():
    model = dict(zip(problem.accuracy_ops, combo))
    model.update({op: problem.variants[op][0] for op in ops
                  if op not in model})
    for owner in itertools.product([None] + list(ops), repeat=len(workers)):
      sets = {op: [w for w, o in zip(workers, owner) if o == op]
              for op in ops}
      tp = {(op, w): problem.throughput(op, w, model[op]) for op in ops
            for w in sets[op]}
      if any(t is None for t in tp.values()) or any(
          sum(tp[(op, w)] for w in sets[op]) < rates[op] for op in ops):
        continue
      if any(tiers[b] < tiers[a] for u, v in problem.edges
             if u in sets for a in sets[u] for b in sets[v]):
        continue
      lp = pywraplp.Solver.CreateSolver("GLOP")
      r = {k: lp.NumVar(0, t, str(k)) for k, t in tp.items()}
      cost = sum(problem.worker_price[w] for op in ops for w in sets[op])
      terms = []
      for u, v in problem.edges:
        m = problem.message(u, v, model.get(u, "default"), model[v])
        for b in sets[v]:
          if u in problem.source_rates:
            if tiers[b] > 0:
              terms.append(problem.source_link.get((u, b), 0) * m *
                           pl.GB_PER_HOUR * r[(v, b)])
            continue
          for a in sets[u]:
            if tiers[b] > tiers[a]:
              c = problem.worker_link.get((a, b), 0) * m * pl.GB_PER_HOUR
              if all(tiers[x] == 0 for x in sets[u]):  # sum_a r_a = R_u
                terms.append(c * r[(v, b)] / len(sets[u]))
              else:  # every receiver in tier 1: sum_b r_b = R_v
                terms.append(c * r[(u, a)] * rates[v] / rates[u] /
                             len(sets[v]))
      for op in ops:
        lp.Add(lp.Sum([r[(op, w)] for w in sets[op]]) == rates[op])
      lp.Minimize(lp.Sum(terms) if terms else 0)
      if lp.Solve() != lp.OPTIMAL:
        continue
      total = cost + lp.Objective().Value()
      if best is None or total < best[0]:
        best = (total, combo, sets)
  return best


def test_milp_equals_brute_force_on_a_reduced_instance(vqa):
  small = _reduced(vqa, ["workflow-compute-cpu-1", "workflow-compute-cpu-3",
                         "workflow-compute-cpu-5", "workflow-compute-cpu-6",
                         "workflow-compute-gpu-1"], rate=12.0)
  best, _, _ = _brute_force(small)
  plan = pl.optimal_plan(small)
  _check_plan(small, plan)
  assert plan.total_cost == pytest.approx(best, rel=1e-5)
  heur = pl.jellybean_plan(small)
  _check_plan(small, heur)
  assert plan.total_cost <= heur.total_cost * (1 + 1e-9)


def _copy(tmp_path):
  d = tmp_path / "inputs"
  shutil.copytree(pl.VQA_EXAMPLE, d)
  return d


def _append(path, text):
  with open(path, "a") as f:
    f.write("\n" + text)


def test_bad_inputs_name_what_is_wrong(tmp_path):
  cases = []
  d = _copy(tmp_path / "cycle")
  _append(d / "logical_graph.csv", "VQA,ExtractImageFeature\n")
  cases.append((d, r"cycle through \['ExtractImageFeature'"))
  d = _copy(tmp_path / "nolat")
  prof = json.loads((d / "accuracy_profiles.json").read_text())
  prof["operators"]["VQA"]["variants"].append("big")
  (d / "accuracy_profiles.json").write_text(json.dumps(prof))
  cases.append((d, r"variant 'big' of 'VQA' has no latency on any worker"))
  d = _copy(tmp_path / "acc")
  (d / "accuracy_requirement.json").write_text(
      json.dumps({"sink": "VQA", "threshold": 60.0}))
  cases.append((d, r"no variant combination reaches the accuracy threshold "
                   r"60.0 \(the best is 58.33\)"))
  d = _copy(tmp_path / "rate")
  (d / "input_injection_rates.csv").write_text("ReadImage,4000\n"
                                               "ReadSpeech,40\n")
  cases.append((d, r"'ExtractImageFeature' must carry 4000 items/s"))
  d = _copy(tmp_path / "missing")
  os.remove(d / "workers_specs.csv")
  cases.append((d, r"workers_specs.csv is missing"))
  d = _copy(tmp_path / "malformed")
  _append(d / "workers_specs.csv", "cpu-9,cheap\n")
  cases.append((d, r"worker price 'cheap' is not a number"))
  d = _copy(tmp_path / "fields")
  _append(d / "message_sizes.csv", "ReadImage,ExtractImageFeature,1\n")
  cases.append((d, r"message_sizes.csv line \d+: expected 5 fields"))
  d = _copy(tmp_path / "link")
  _append(d / "workers_workers_link.csv", "workflow-compute-cpu-1,tpu-1,1\n")
  cases.append((d, r"worker 'tpu-1' is not in workers_specs.csv"))
  d = _copy(tmp_path / "json")
  (d / "accuracy_profiles.json").write_text("{not json")
  cases.append((d, r"accuracy_profiles.json is not valid JSON"))
  for folder, pattern in cases:
    with pytest.raises(pl.PlanError, match=pattern):
      pl.load_jellybean(str(folder))
  with pytest.raises(pl.PlanError, match=r"does not exist"):
    pl.load_jellybean(str(tmp_path / "nowhere"))


def test_rates_the_workers_cannot_carry_jointly(vqa):
  # each operator alone fits on all nine workers, all three together do not
  tight = dataclasses.replace(vqa, source_rates={"ReadImage": 150.0,
                                                 "ReadSpeech": 100.0})
  with pytest.raises(pl.PlanError, match=r"cannot carry the rates jointly"):
    pl.optimal_plan(tight)


def test_time_limit_with_no_plan_found_is_an_error(vqa):
  with pytest.raises(pl.PlanError, match=r"time limit \(0.001 s\) passed "
                     r"with no feasible plan"):
    pl.optimal_plan(vqa, time_limit=1e-3)
  with pytest.raises(pl.PlanError, match=r"time_limit \(=0\)"):
    pl.optimal_plan(vqa, time_limit=0)


def test_cli_serve_plan_writes_plan_json(tmp_path, capsys):
  from alpa_py import cli
  assert cli.main(["serve-plan", "--out", str(tmp_path)]) == 0
  printed = capsys.readouterr().out
  assert "MILP / JellyBean heuristic total cost" in printed
  plan = json.loads((tmp_path / "plan.json").read_text())
  base = json.loads((tmp_path / "jellybean_plan.json").read_text())
  assert base["compute_cost"] == pytest.approx(6.242)
  assert plan["compute_cost"] + plan["communication_cost"] <= 7.509
  assert set(plan["worker_assignment"]) == {"ExtractImageFeature",
                                            "SpeechRecognition", "VQA"}
  assert cli.main(["serve-plan", "--inputs", str(tmp_path / "none"),
                   "--out", str(tmp_path)]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_lora_fleet_plan_meets_rates_accuracy_and_slo_in_simulation(tmp_path):
  from alpa_py.serve.planner import fleet
  acc = {("HotAdapter", "merged"): 30.0, ("HotAdapter", "lora-r16"): 30.0,
         ("HotAdapter", "lora-r8"): 25.0, ("OtherAdapters", "lora-r16"): 28.0,
         ("OtherAdapters", "lora-r8"): 20.0}
  work = fleet.LoraWorkload(output_tokens_per_s=1024.0)
  profiles = fleet.write_lora_fleet(str(tmp_path), acc, work,
                                    slo_tpot_s=0.08, threshold=28.5)
  # fewer adapter bytes never serve fewer tokens
  for (op, dev, var), p in profiles.items():
    if var == "lora-r8":
      assert p[1] >= profiles[(op, dev, "lora-r16")][1]
  problem = pl.load_jellybean(str(tmp_path), comm_scale=1.0)
  plan = pl.optimal_plan(problem)
  _check_plan(problem, plan)
  # the threshold rules out truncating the other adapters
  assert plan.model_assignment["OtherAdapters"] == "lora-r16"
  largest = pl.optimal_plan(pl.restrict(
      problem, combinations=[("lora-r16", "lora-r16")]))
  assert plan.total_cost <= largest.total_cost * (1 + 1e-9)
  op, ws = "OtherAdapters", plan.worker_rates["OtherAdapters"]
  w, rate = ws[0]
  sim = fleet.simulate_worker(
      profiles[(op, w.split("#")[0], "lora-r16")], op, "lora-r16", rate,
      work, requests=150)
  assert sim["p99_tpot_ms"] <= 80.0
  with pytest.raises(ValueError, match=r"no device meets the SLO \(1 ms"):
    fleet.write_lora_fleet(str(tmp_path / "x"), acc, work, slo_tpot_s=0.001,
                           threshold=0.0)
  with pytest.raises(pl.PlanError, match=r"combinations \[\('a', 'b'\)\]"):
    pl.restrict(problem, combinations=[("a", "b")])
