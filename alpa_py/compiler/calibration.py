"""Calibration of the cost model by active regression, and its disk cache.

``calibrate_model`` compiles a pool of candidate programs
(``calibration_pool``), reads each one's features from its HLO
(``cost_features``), chooses which few to profile by an active-regression
rule on an orthonormal basis of the features (``active_regression``),
profiles only those on the devices, and fits the coefficients by weighted
least squares (non-negative; ``loss="l1"`` for least absolute deviations).

Rows are divided by a prior guess of their time before selection and fit,
so that the fit minimises *relative* error (a 1 ms program counts as much
as a 100 ms one). The prior is a fixed, label-free order of magnitude per
platform; a poor prior costs labels, not correctness.

The fitted model is cached as JSON in ``$ALPA_PY_CACHE_DIR`` (default
``~/.cache/alpa_py``), one file per platform and device count, holding the
key it was measured under (device kind, count, jax and jaxlib versions). A
cache with another key is re-profiled with a message; an unreadable one is
re-profiled with a ``CalibrationCacheWarning``.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import warnings
from typing import Sequence

import jax
import numpy as np
from scipy.optimize import nnls

from alpa_py import _progress
from alpa_py.compiler import active_regression
from alpa_py.compiler import calibration_pool
from alpa_py.compiler.cost_features import FEATURES
from alpa_py.compiler.cost_model import (SCHEMA_VERSION, DeviceKey,
                                         LinearCostModel)

# 128 of the pool's 240 (about 5.5 per coefficient): over 52 leverage
# draws (four pools, labels from one pass), the fits priced the CPU suite's
# 27 data / ZeRO / hand-written programs with a median |pred/meas - 1| of
# at most 0.18 at 128 profiles, against up to 0.30 at 96 (the default
# pool's own draw among the worst) and 0.29 at 64; a calibration took
# 71-80 s here against 46-67 s at 96
# (docs/research/calibration_noise_and_zero3.md, section 5)
DEFAULT_BUDGET = 128
DEFAULT_POOL_SIZE = 240
SELECTIONS = active_regression.RULES + ("all",)

# label-free orders of magnitude (seconds per unit) that weight the rows
_PRIOR = {
    "cpu": {"fixed": 1e-4, "matmul_flops": 1e-10, "conv_flops": 1e-10,
            "nonmatmul_bytes": 1e-9,
            "kernel_launches": 1e-5, "count": 5e-5, "bytes": 1e-9},
    "default": {"fixed": 3e-5, "matmul_flops": 1e-14, "conv_flops": 2e-14,
                "nonmatmul_bytes": 1e-12,
                "kernel_launches": 5e-6, "count": 1e-5, "bytes": 1e-11},
}


class CalibrationCacheWarning(UserWarning):
  """A cached calibration could not be read; it is measured again."""


def minimum_budget() -> int:
  """The fewest profiles that determine the model: one per coefficient."""
  return len(FEATURES)


def prior_seconds(features: np.ndarray, platform: str) -> np.ndarray:
  """A label-free guess of each row's time (it only weights the rows)."""
  rates = _PRIOR.get(platform, _PRIOR["default"])
  # a collective's features are priced by their last part (bytes / count)
  vec = np.array([rates[f] if f in rates else rates[f.rsplit(":", 1)[-1]]
                  for f in FEATURES])
  return np.atleast_2d(features) @ vec


def check_budget(budget: int, pool_size: int) -> None:
  """Raises ValueError unless ``minimum_budget() <= budget <= pool_size``."""
  low = minimum_budget()
  if not isinstance(budget, int) or isinstance(budget, bool):
    raise TypeError(f"calibration budget (={budget!r}) must be an int: the "
                    "number of programs to profile")
  if budget < low:
    raise ValueError(
        f"calibration budget (={budget}) is below the minimum (={low}): the "
        f"cost model has {low} coefficients ({', '.join(FEATURES)}) and "
        f"needs at least one profiled program per coefficient; pass "
        f"budget >= {low}")
  if budget > pool_size:
    raise ValueError(f"calibration budget (={budget}) is larger than the "
                     f"pool of candidate programs (={pool_size}); raise "
                     "pool_size or lower the budget")


def compile_pool(devices: Sequence, pool_size: int, seed: int = 0,
                 progress: bool = True) -> list[calibration_pool.Compiled]:
  """Compiles every candidate of a pool (their features; nothing runs)."""
  pool = calibration_pool.candidate_pool(len(devices), pool_size, seed)
  out = []
  for i, cand in enumerate(pool):
    out.append(calibration_pool.compile_candidate(cand, devices))
    if progress and ((i + 1) % 40 == 0 or i + 1 == len(pool)):
      _progress.log(f"calibration: compiled {i + 1}/{len(pool)} candidate "
                    "programs (features)")
  return out


def fill_unmeasured(coef: np.ndarray, measured: np.ndarray,
                    platform: str) -> tuple[np.ndarray, tuple[str, ...]]:
  """Coefficients of features no profiled program exercised: the largest
  of the measured collectives' of the same unit (a collective left out of
  the sample is not free), else the prior's rate.

  Returns:
    (coefficients, names of the filled features).
  """
  coef = np.array(coef, float)
  rates = _PRIOR.get(platform, _PRIOR["default"])
  filled = []
  for i, f in enumerate(FEATURES):
    if measured[i]:
      continue
    unit = f.rsplit(":", 1)[-1]
    if f == "conv_flops" and measured[FEATURES.index("matmul_flops")]:
      coef[i] = coef[FEATURES.index("matmul_flops")]  # as fast as a dot
      filled.append(f)
      continue
    peers = [coef[j] for j, g in enumerate(FEATURES)
             if measured[j] and ":" in g and g.endswith(":" + unit)]
    coef[i] = max(peers) if peers else rates.get(f, rates.get(unit, 0.0))
    filled.append(f)
  return coef, tuple(filled)


def fit_coefficients(x: np.ndarray, y: np.ndarray, weights: np.ndarray,
                     platform: str, loss: str = "l2"
                     ) -> tuple[np.ndarray, tuple[str, ...]]:
  """The model's coefficients fitted to profiled programs: features ``x``
  (one row per program), seconds ``y``, importance ``weights``; each row
  divided by its prior time (relative error), non-negative, the features
  no row exercised filled (``fill_unmeasured``).

  Returns:
    (coefficients, names of the filled features).
  """
  prior = prior_seconds(x, platform)
  coef = active_regression.fit(x / prior[:, None], y / prior, weights,
                               loss=loss)
  return fill_unmeasured(coef.clip(min=0.0), np.abs(x).sum(axis=0) > 0,
                         platform)


def fit_collective_terms(compiled, labels: dict, fixed: float,
                         rounds: int = 3) -> tuple:
  """(``<kind>:<link>``, alpha, beta) per collective kind and link, fitted
  on the pool's ``collective`` programs (one resharding or psum each; the
  ones not yet profiled are profiled now): seconds beyond ``fixed`` =
  alpha + beta * ring bytes (non-negative least squares), for kinds with
  at least two programs of different sizes."""
  idx = [i for i, c in enumerate(compiled)
         if c.candidate.family == "collective"]
  todo = [i for i in idx if i not in labels]
  if todo:
    y, _ = calibration_pool.profile([compiled[i] for i in todo], rounds=rounds)
    labels = {**labels, **dict(zip(todo, y.tolist()))}
  groups: dict[str, list[tuple[float, float]]] = {}
  for i in idx:
    f = compiled[i].features
    kinds = [(n.rsplit(":", 1)[0], f[j]) for j, n in enumerate(FEATURES)
             if n.endswith(":bytes") and f[j] > 0]
    if len(kinds) == 1:
      groups.setdefault(kinds[0][0], []).append(
          (kinds[0][1], max(labels[i] - fixed, 0.0)))
  terms = []
  for name, pts in sorted(groups.items()):
    b = np.array([p[0] for p in pts])
    if len(pts) < 2 or b.max() <= b.min():
      continue
    t = np.array([p[1] for p in pts])
    a = np.stack([np.ones_like(b), b], 1)
    # relative error: each program's row divided by its time
    w = 1.0 / np.maximum(t, 1e-6)
    alpha, beta = nnls(a * w[:, None], t * w)[0]
    terms.append((name, float(alpha), float(beta)))
  return tuple(terms)


def _rel_error(pred: np.ndarray, y: np.ndarray) -> float:
  return float(np.mean(np.abs(pred - y) / y))


def calibrate_model(devices: Sequence | None = None,
                    budget: int = DEFAULT_BUDGET, *,
                    pool_size: int = DEFAULT_POOL_SIZE,
                    selection: str = "leverage", loss: str = "l2", seed: int = 0,
                    rounds: int = 3, progress: bool = True) -> LinearCostModel:
  """Profiles ``budget`` actively chosen programs and fits the cost model.

  Args:
    devices: the devices to calibrate (None: all of ``jax.devices()``).
      Every candidate runs on all of them.
    budget: programs to profile (at least ``minimum_budget()``).
    pool_size: candidate programs to choose from (all are compiled).
    selection: ``leverage``, ``bss``, ``uniform`` or ``all``.
    loss: ``l2`` or ``l1`` (outliers).
    seed: the pool draw and the selection.
    rounds: interleaved timing rounds per profiled program.
    progress: report compile and profile progress.

  Raises:
    ValueError: a budget below the minimum or above the pool, an unknown
      selection rule or loss.
  """
  devices = list(devices) if devices is not None else jax.devices()
  if selection not in SELECTIONS:
    raise ValueError(f"selection (={selection!r}) must be one of {SELECTIONS}")
  if loss not in ("l2", "l1"):
    raise ValueError(f"loss (={loss!r}) must be 'l2' or 'l1'")
  check_budget(budget if selection != "all" else pool_size, pool_size)
  key = DeviceKey.of(devices)
  t0 = time.perf_counter()
  compiled = compile_pool(devices, pool_size, seed, progress)
  x = np.array([c.features for c in compiled])
  prior = prior_seconds(x, key.platform)
  a = x / prior[:, None]
  if selection == "all":
    sel = active_regression.Selection("all", np.arange(len(x)),
                                      np.ones(len(x)))
  else:
    sel = active_regression.select(selection, a, budget,
                                   np.random.default_rng(seed))
  if progress:
    _progress.log(f"calibration: profiling {len(sel.indices)} of {len(x)} "
                  f"programs ({selection}) on {key}")
  chosen = [compiled[i] for i in sel.indices]
  y, _ = calibration_pool.profile(
      chosen, rounds=rounds,
      on_round=(lambda r, n: _progress.log(f"calibration: timing round "
                                           f"{r}/{n}")) if progress else None)
  coef, filled = fit_coefficients(x[sel.indices], y, sel.weights,
                                  key.platform, loss)
  contention = calibration_pool.measure_contention(devices)
  terms = fit_collective_terms(
      compiled, dict(zip(sel.indices.tolist(), y.tolist())),
      coef[FEATURES.index("fixed")], rounds)
  if progress:
    _progress.log("calibration: one resharding alone (collective + copies): "
                  + ", ".join(f"{k} {a * 1e6:.0f} us + {b * 1e9:.2f} ns/B"
                              for k, a, b in terms))
  if filled and progress:
    _progress.log(f"calibration: no profiled program exercised {filled}; "
                  "priced as the costliest measured collective")
  model = LinearCostModel(
      key=key, coefficients=tuple(float(c) for c in coef),
      budget=len(sel.indices), pool_size=len(x), selection=selection,
      loss=loss, train_rel_error=_rel_error(x[sel.indices] @ coef, y),
      unmeasured=filled, contention=contention, collective_terms=terms,
      labels=tuple((compiled[i].candidate.id, float(t))
                   for i, t in zip(sel.indices, y)))
  if progress:
    _progress.log(f"calibration: done in {time.perf_counter() - t0:.1f} s "
                  f"(fit error on the profiled programs "
                  f"{model.train_rel_error:.1%})")
  return model


# -- the disk cache ----------------------------------------------------------

def cache_dir() -> pathlib.Path:
  root = os.environ.get("ALPA_PY_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "alpa_py")
  return pathlib.Path(root)


def cache_path(platform: str, num_devices: int) -> pathlib.Path:
  return cache_dir() / f"calibrated-{platform}-{num_devices}dev.json"


def save(model: LinearCostModel) -> pathlib.Path | None:
  """Writes ``model`` to its cache file (None where that is not writable)."""
  path = cache_path(model.key.platform, model.key.num_devices)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(model.to_json(), indent=1))
    tmp.replace(path)
  except OSError:
    return None
  return path


def load(key: DeviceKey) -> LinearCostModel | None:
  """The cached model for ``key``, or None: no cache (silently), a cache
  for another key (with a message) or an unreadable one (with a
  ``CalibrationCacheWarning``)."""
  path = cache_path(key.platform, key.num_devices)
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text())
    if isinstance(data, dict) and data.get("schema") not in (None, SCHEMA_VERSION):
      _progress.log(f"calibration cache {path} has schema {data['schema']}, "
                    f"this version reads {SCHEMA_VERSION}: profiling again")
      return None
    model = LinearCostModel.from_json(data)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    warnings.warn(f"the calibration cache {path} is unreadable ({e}); "
                  "profiling again", CalibrationCacheWarning, stacklevel=3)
    return None
  if model.key != key:
    _progress.log(f"calibration cache {path} was measured on {model.key}; "
                  f"this is {key}: profiling again")
    return None
  return model


def load_or_calibrate(devices: Sequence | None = None,
                      budget: int = DEFAULT_BUDGET,
                      **kwargs) -> LinearCostModel:
  """The cached model for these devices, or a new calibration (cached)."""
  devices = list(devices) if devices is not None else jax.devices()
  cached = load(DeviceKey.of(devices))
  if cached is not None:
    return cached
  _progress.log(f"calibrating the cost model on {len(devices)} "
                f"{devices[0].platform} devices (once; cached in "
                f"{cache_path(devices[0].platform, len(devices))})")
  model = calibrate_model(devices, budget, **kwargs)
  save(model)
  return model
