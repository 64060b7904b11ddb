"""Errors the compiler raises about a plan (not about user input)."""


class InfeasiblePlanError(ValueError):
  """No plan meets the constraints: the per-device memory budget, or the
  rule that heavy ops are split (``allow_recompute_heavy_op=False``)."""


class ScheduleError(ValueError):
  """A pipeline program reads a tensor that no earlier instruction made
  available: produced later in the schedule, never produced for that
  micro-batch, or freed before the read (see ``program_check``)."""
