"""Loading JellyBean's optimizer input format (its ``optimizer/utils.py``)
into a :class:`~alpa_py.serve.planner.problem.Problem`."""

from __future__ import annotations

import csv
import json
import math
import os

from alpa_py.serve.planner.problem import PlanError, Problem, check

# JellyBean's VQA example inputs (public, MIT licence; see its README.md)
VQA_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "data", "jellybean_vqa")


def _rows(folder, name, ncols, required=True):
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    if required:
      raise PlanError(f"{path} is missing (a required planner input)")
    return []
  out = []
  with open(path, newline="") as f:
    for line, row in enumerate(csv.reader(f), 1):
      while row and not row[-1].strip():
        row = row[:-1]  # trailing empty fields (one upstream row has one)
      if not row:
        continue
      if len(row) != ncols:
        raise PlanError(f"{path} line {line}: expected {ncols} fields, got "
                        f"{len(row)}: {row}")
      out.append((path, line, [c.strip() for c in row]))
  return out


def _number(path, line, text, what):
  try:
    value = float(text)
  except ValueError:
    raise PlanError(f"{path} line {line}: {what} {text!r} is not a number")
  if not math.isfinite(value) or value < 0:
    raise PlanError(f"{path} line {line}: {what} {value} must be finite "
                    f"and >= 0")
  return value


def _json(folder, name):
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    raise PlanError(f"{path} is missing (a required planner input)")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise PlanError(f"{path} is not valid JSON: {e}")


def _topological(nodes, edges):
  """Nodes in a topological order (ties by input order); a cycle is an
  error naming its nodes."""
  preds = {n: set() for n in nodes}
  for u, v in edges:
    preds[v].add(u)
  order, done = [], set()
  while len(order) < len(nodes):
    ready = [n for n in nodes if n not in done and preds[n] <= done]
    if not ready:
      left = [n for n in nodes if n not in done]
      raise PlanError(f"logical_graph.csv has a cycle through {left}")
    order.append(ready[0])
    done.add(ready[0])
  return order


def load_jellybean(folder, *, comm_scale: float = 0.1,
                   latency_overestimate: float = 1.0) -> Problem:
  """A :class:`Problem` from a folder in JellyBean's optimizer input
  format (its ``optimizer/utils.py``), with the accuracy profile as
  ``accuracy_profiles.json`` (``{"end_to_end": {"operators": [...],
  "accuracy": [{"variants": [...], "accuracy": a}, ...]}, "operators":
  {op: {"variants": [...], "cost_profile": {...}}}}``). ``comm_scale``
  multiplies every link price (JellyBean's COMM_COST_SCALING_FACTOR)."""
  if not os.path.isdir(folder):
    raise PlanError(f"planner inputs folder {folder!r} does not exist")
  price = {}
  for path, line, (w, p) in _rows(folder, "workers_specs.csv", 2):
    if w in price:
      raise PlanError(f"{path} line {line}: worker {w!r} listed twice")
    price[w] = _number(path, line, p, "worker price")
  if not price:
    raise PlanError(f"{folder}/workers_specs.csv lists no workers")

  def known(path, line, w):
    if w not in price:
      raise PlanError(f"{path} line {line}: worker {w!r} is not in "
                      f"workers_specs.csv")
    return w

  worker_link = {}
  for path, line, (a, b, c) in _rows(folder, "workers_workers_link.csv", 3,
                                     required=False):
    worker_link[(known(path, line, a), known(path, line, b))] = \
        _number(path, line, c, "link price") * comm_scale
  tiers = {w: 0 for w in price}
  part_path = os.path.join(folder, "workers_partition.json")
  if os.path.exists(part_path):
    part = _json(folder, "workers_partition.json")
    if not isinstance(part, list) or not all(isinstance(t, list)
                                             for t in part):
      raise PlanError(f"{part_path} must be a list of lists of worker "
                      f"names (tier 0 first)")
    seen = set()
    for t, names in enumerate(part):
      for w in names:
        if w not in price:
          raise PlanError(f"{part_path}: worker {w!r} is not in "
                          f"workers_specs.csv")
        if w in seen:
          raise PlanError(f"{part_path}: worker {w!r} is in two tiers")
        seen.add(w)
        tiers[w] = t
  edges = []
  nodes = []
  for _, _, (u, v) in _rows(folder, "logical_graph.csv", 2):
    edges.append((u, v))
    for n in (u, v):
      if n not in nodes:
        nodes.append(n)
  if not edges:
    raise PlanError(f"{folder}/logical_graph.csv has no edges")
  nodes = _topological(nodes, edges)
  if os.path.exists(os.path.join(
      folder, "throughput_normalization_ratios_per_variant.csv")):
    raise PlanError("throughput_normalization_ratios_per_variant.csv: "
                    "per-variant rate ratios are not supported yet (the "
                    "required rates would depend on the variants); give "
                    "throughput_normalization_ratios.csv")
  ratios = {}
  for path, line, (u, v, r) in _rows(
      folder, "throughput_normalization_ratios.csv", 3, required=False):
    if (u, v) not in edges:
      raise PlanError(f"{path} line {line}: {u} -> {v} is not an edge of "
                      f"logical_graph.csv")
    ratios[(u, v)] = _number(path, line, r, "ratio")
  source_rates = {}
  for path, line, (s, r) in _rows(folder, "input_injection_rates.csv", 2):
    if s not in nodes:
      raise PlanError(f"{path} line {line}: source {s!r} is not a node of "
                      f"logical_graph.csv")
    source_rates[s] = _number(path, line, r, "injection rate")
  for v in nodes:
    has_pred = any(w == v for _, w in edges)
    if v in source_rates and has_pred:
      raise PlanError(f"source {v!r} has inputs in logical_graph.csv")
    if v not in source_rates and not has_pred:
      raise PlanError(f"node {v!r} has no inputs and no injection rate in "
                      f"input_injection_rates.csv")
  latency = {}
  for path, line, (op, w, var, lat) in _rows(folder, "execution_profile.csv",
                                             4):
    known(path, line, w)
    if op not in nodes or op in source_rates:
      raise PlanError(f"{path} line {line}: {op!r} is not an operator of "
                      f"logical_graph.csv")
    ms = _number(path, line, lat, "latency")
    if ms <= 0:
      raise PlanError(f"{path} line {line}: latency must be > 0 ms")
    latency[(op, w, var)] = ms * latency_overestimate
  message = {}
  for path, line, (u, v, uv, vv, kb) in _rows(folder, "message_sizes.csv",
                                              5):
    if (u, v) not in edges:
      raise PlanError(f"{path} line {line}: {u} -> {v} is not an edge of "
                      f"logical_graph.csv")
    message.setdefault((u, v), {})[(uv, vv)] = _number(path, line, kb,
                                                       "message size")
  for e in edges:
    if e not in message:
      raise PlanError(f"message_sizes.csv has no row for the edge "
                      f"{e[0]} -> {e[1]}")
  source_link = {}
  for path, line, (s, w, c) in _rows(folder, "sources_workers_link.csv", 3,
                                     required=False):
    if s not in source_rates:
      raise PlanError(f"{path} line {line}: {s!r} is not a source in "
                      f"input_injection_rates.csv")
    source_link[(s, known(path, line, w))] = \
        _number(path, line, c, "link price") * comm_scale
  req = _json(folder, "accuracy_requirement.json")
  if not isinstance(req, dict) or "sink" not in req or "threshold" not in req:
    raise PlanError(f"{folder}/accuracy_requirement.json must hold "
                    f"{{\"sink\": ..., \"threshold\": ...}}")
  if req["sink"] not in nodes:
    raise PlanError(f"accuracy_requirement.json: sink {req['sink']!r} is "
                    f"not a node of logical_graph.csv")
  prof = _json(folder, "accuracy_profiles.json")
  try:
    e2e = prof["end_to_end"]
    acc_ops = tuple(e2e["operators"])
    accuracy = {tuple(row["variants"]): float(row["accuracy"])
                for row in e2e["accuracy"]}
    op_info = prof.get("operators", {})
  except (KeyError, TypeError, ValueError) as e:
    raise PlanError(f"{folder}/accuracy_profiles.json is malformed ({e!r}); "
                    f"expected end_to_end.operators and end_to_end.accuracy "
                    f"rows of variants and accuracy")
  for op in acc_ops:
    if op not in nodes or op in source_rates:
      raise PlanError(f"accuracy_profiles.json: {op!r} is not an operator")
  for key in accuracy:
    if len(key) != len(acc_ops):
      raise PlanError(f"accuracy_profiles.json: combination {list(key)} "
                      f"does not have one variant per operator {acc_ops}")
  variants, variant_cost = {}, {}
  for op in nodes:
    if op in source_rates:
      continue
    listed = set(op_info.get(op, {}).get("variants") or [])
    listed |= {k[acc_ops.index(op)] for k in accuracy} if op in acc_ops \
        else set()
    profiled = {var for (o, _, var) in latency if o == op}
    if not listed:
      listed = profiled
    if not listed:
      raise PlanError(f"operator {op!r} has no latency on any worker in "
                      f"execution_profile.csv")
    for var in sorted(listed):
      if var not in profiled:
        raise PlanError(f"variant {var!r} of {op!r} has no latency on any "
                        f"worker in execution_profile.csv")
    variants[op] = tuple(sorted(listed))
    variant_cost[op] = dict(op_info.get(op, {}).get("cost_profile") or {})
  problem = Problem(
      nodes=tuple(nodes), edges=tuple(edges), source_rates=source_rates,
      ratios=ratios, message_kb=message, variants=variants,
      latency_ms=latency, worker_price=price, tiers=tiers,
      worker_link=worker_link, source_link=source_link,
      accuracy_ops=acc_ops, accuracy=accuracy,
      threshold=float(req["threshold"]), sink=req["sink"],
      variant_cost=variant_cost)
  check(problem)
  return problem
