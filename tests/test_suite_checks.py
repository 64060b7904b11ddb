"""The suite's self-check is computed from measured times, with predictions
judged against them (order agreement, median error); the measurements are
interleaved rounds."""

import pytest

from alpa_py.bench import plans, suite


def _row(plan, meas, pred, mem=1):
  return dict(plan=plan, measured_step_seconds=meas, memory_per_device=mem,
              predicted={"p": dict(step_seconds=pred)})


def test_checks_judge_auto_on_measured_times():
  rows = [_row("jit", 9.0, 9.0), _row("data", 1.0, 3.0, mem=4),
          _row("zero2", 2.0, 1.0, mem=2), _row("auto", 1.04, 0.5, mem=2)]
  c = suite.checks(rows, ["p"])
  assert c["best_measured_baseline"] == "data"
  assert c["auto_measured_over_best_baseline"] == pytest.approx(1.04)
  assert c["auto_measured_le_1.05x_best_baseline"]
  assert c["auto_memory_le_data_parallel"]
  # predicted zero2 < data, measured data < zero2: disagree; auto vs zero2
  # agree; auto vs data (1.04 apart) not compared
  assert c["order_agreement[p]"] == [1, 2]
  ratios = c["predicted_over_measured[p]"]
  assert ratios["data"] == pytest.approx(3.0)
  # |pred/meas - 1|: jit 0, zero2 0.5, auto 0.519, data 2
  assert c["median_abs_error[p]"] == pytest.approx((0.5 + (1 - 0.5 / 1.04)) / 2)
  rows[-1]["measured_step_seconds"] = 1.2
  assert not suite.checks(rows, ["p"])["auto_measured_le_1.05x_best_baseline"]


def test_measure_interleaved_runs_rounds_in_turn():
  order = []

  class Fake(plans.Runner):
    def step(self):
      order.append(self.fn)
      return {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}[self.fn]

  names = ("a", "b", "c", "d")
  runners = {k: Fake(k, None, None, 0, {}, 0.0, {}) for k in names}
  got = plans.measure_interleaved(runners, 6)
  assert got == {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
  assert order[:4] == list(names)  # one warm-up step each, in order
  rounds = [order[4 + 4 * i:8 + 4 * i] for i in range(6)]
  assert len(order) == 4 * 7
  assert all(sorted(r) == list(names) for r in rounds)  # each once per round
  assert len({tuple(r) for r in rounds}) > 1  # the order changes
  with pytest.raises(ValueError, match="rounds"):
    plans.measure_interleaved(runners, 0)
