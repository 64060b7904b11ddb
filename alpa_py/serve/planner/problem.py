"""The planner's problem and plan: a serving workflow, the fleet that may
serve it, JellyBean's cost definitions (see the package doc)."""

from __future__ import annotations

import dataclasses
import math

GB_PER_HOUR = 3600 / 1024 / 1024  # KB/s -> GB/h


class PlanError(ValueError):
  """Bad planner input, or no plan meets the objectives."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """A serving workflow and the fleet that may serve it (see the module
  doc). Link prices are $/GB after the scaling factor."""

  nodes: tuple  # topological order, sources included
  edges: tuple  # (u, v)
  source_rates: dict  # source -> items/s
  ratios: dict  # (u, v) -> rate normalisation ratio
  message_kb: dict  # (u, v) -> {(u_variant, v_variant): KB}
  variants: dict  # operator -> tuple of variants
  latency_ms: dict  # (operator, worker, variant) -> ms per item
  worker_price: dict  # worker -> $/h, in input order
  tiers: dict  # worker -> tier
  worker_link: dict  # (a, b) -> $/GB
  source_link: dict  # (source, worker) -> $/GB
  accuracy_ops: tuple  # the operators that key the accuracy table
  accuracy: dict  # tuple of variants (accuracy_ops order) -> accuracy
  threshold: float
  sink: str
  variant_cost: dict = dataclasses.field(default_factory=dict)

  @property
  def operators(self) -> tuple:
    return tuple(n for n in self.nodes if n not in self.source_rates)

  @property
  def workers(self) -> tuple:
    return tuple(self.worker_price)

  def preds(self, v) -> list:
    return [u for u, w in self.edges if w == v]

  def required_rates(self) -> dict:
    rate = {}
    for v in self.nodes:
      rate[v] = (self.source_rates[v] if v in self.source_rates else
                 min(rate[u] * self.ratios.get((u, v), 1.0)
                     for u in self.preds(v)))
    return rate

  def throughput(self, op, worker, variant):
    lat = self.latency_ms.get((op, worker, variant))
    return None if lat is None else 1000.0 / lat

  def message(self, u, v, u_variant="default", v_variant="default"):
    """KB per item on ``u -> v``, with JellyBean's fallbacks to
    ``default`` on either side."""
    table = self.message_kb[(u, v)]
    for key in ((u_variant, v_variant), ("default", v_variant),
                (u_variant, "default"), ("default", "default")):
      if key in table:
        return table[key]
    raise PlanError(f"message_sizes.csv has no size for {u} -> {v} with "
                    f"variants ({u_variant}, {v_variant}) nor a default")

  def accuracy_of(self, model_assignment) -> float:
    key = tuple(model_assignment[o] for o in self.accuracy_ops)
    return self.accuracy.get(key, -math.inf)

  def feasible_combinations(self) -> list:
    return [k for k, a in self.accuracy.items() if a >= self.threshold]


@dataclasses.dataclass(frozen=True)
class Plan:
  """``worker_rates``: operator -> [(worker, items/s)]."""

  compute_cost: float
  communication_cost: float
  end_to_end_accuracy: float
  model_assignment: dict
  worker_rates: dict
  method: str
  optimality_gap: float | None = None
  solve_seconds: float = 0.0

  @property
  def total_cost(self) -> float:
    return self.compute_cost + self.communication_cost

  @property
  def worker_assignment(self) -> dict:
    return {op: [w for w, _ in ws] for op, ws in self.worker_rates.items()}

  def to_json(self) -> dict:
    """JellyBean's optimizer output keys, plus the gap, the solve time,
    the per-worker rates and the method."""
    return dict(compute_cost=self.compute_cost,
                communication_cost=self.communication_cost,
                end_to_end_accuracy=self.end_to_end_accuracy,
                model_assignment=dict(self.model_assignment),
                worker_assignment=self.worker_assignment,
                optimality_gap=self.optimality_gap,
                solve_seconds=self.solve_seconds,
                worker_rates={op: [[w, r] for w, r in ws]
                              for op, ws in self.worker_rates.items()},
                method=self.method)

  def __str__(self) -> str:
    gap = ("" if self.optimality_gap is None else
           f", gap {100 * self.optimality_gap:.3g}%")
    lines = [f"{self.method}: compute {self.compute_cost:.4f} + "
             f"communication {self.communication_cost:.4f} = "
             f"{self.total_cost:.4f} $/h, accuracy "
             f"{self.end_to_end_accuracy:.2f} ({self.solve_seconds:.2f} s"
             f"{gap})"]
    for op, ws in self.worker_rates.items():
      var = self.model_assignment.get(op, "default")
      lines.append(f"  {op} [{var}]: " + ", ".join(
          f"{w} {r:.3f}/s" for w, r in ws))
    return "\n".join(lines)


def check(problem: Problem) -> None:
  """Errors for objectives no plan can meet on its own: no combination
  reaches the accuracy threshold, or some operator's rate exceeds what
  all the workers able to run it could carry."""
  feasible = problem.feasible_combinations()
  if not feasible:
    best = max(problem.accuracy.values(), default=None)
    raise PlanError(f"no variant combination reaches the accuracy threshold "
                    f"{problem.threshold} (the best is {best})")
  rates = problem.required_rates()
  for op in problem.operators:
    best = 0.0
    for var in problem.variants[op]:
      best = max(best, sum(problem.throughput(op, w, var) or 0.0
                           for w in problem.workers))
    if best < rates[op] * (1 - 1e-12):
      raise PlanError(f"operator {op!r} must carry {rates[op]:g} items/s "
                      f"but all workers together carry at most {best:g} "
                      f"with any variant")


def plan_costs(problem: Problem, model_assignment: dict,
               worker_rates: dict) -> tuple:
  """``(compute, communication)`` in $/h with JellyBean's definitions
  (communication is ``inf`` when an edge sends to a lower tier)."""
  rates = problem.required_rates()
  tier = problem.tiers
  compute = 0.0
  for op in problem.operators:
    compute += sum(problem.worker_price[w] for w, _ in worker_rates[op])
  comm = 0.0
  for u, v in problem.edges:
    m = problem.message(u, v, model_assignment.get(u, "default"),
                        model_assignment.get(v, "default"))
    if u in problem.source_rates:
      for w, r in worker_rates[v]:
        if tier[w] > 0:
          comm += problem.source_link.get((u, w), 0.0) * r * m * GB_PER_HOUR
      continue
    for a, ra in worker_rates[u]:
      for b, rb in worker_rates[v]:
        if tier[b] < tier[a] and ra > 0 and rb > 0:
          return compute, math.inf
        if tier[b] > tier[a]:
          comm += (problem.worker_link.get((a, b), 0.0) * ra * rb * m /
                   rates[u] * GB_PER_HOUR)
  return compute, comm


def restrict(problem: Problem, *, combinations=None, workers=None) -> Problem:
  """``problem`` with only these accuracy-table ``combinations`` and these
  ``workers`` (None: all): the planners' baselines ("one variant
  everywhere", "one device type only")."""
  out = problem
  if combinations is not None:
    keep = {tuple(c) for c in combinations}
    missing = keep - set(problem.accuracy)
    if missing:
      raise PlanError(f"combinations {sorted(missing)} are not in the "
                      f"accuracy table")
    out = dataclasses.replace(out, accuracy={
        k: v for k, v in problem.accuracy.items() if k in keep})
  if workers is not None:
    keep = set(workers)
    unknown = keep - set(problem.worker_price)
    if unknown:
      raise PlanError(f"workers {sorted(unknown)} are not in the problem")
    out = dataclasses.replace(
        out,
        worker_price={w: p for w, p in out.worker_price.items() if w in keep},
        tiers={w: t for w, t in out.tiers.items() if w in keep},
        latency_ms={k: v for k, v in out.latency_ms.items() if k[1] in keep},
        worker_link={k: v for k, v in out.worker_link.items()
                     if k[0] in keep and k[1] in keep},
        source_link={k: v for k, v in out.source_link.items()
                     if k[1] in keep})
  return out
