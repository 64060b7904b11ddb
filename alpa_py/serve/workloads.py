"""Serving workloads as Punica and S-LoRA measured them (facts from
../shared/REFERENCE.md): who asks for which adapter, how long prompts and
answers are, and when requests arrive.

Punica's text-generation workloads (adapter popularity over ``n``
requests): *distinct* (one adapter per request), *uniform* (about sqrt(n)
adapters, equally popular), *skewed* (Zipf, alpha 1.5), *identical* (one
adapter); prompt lengths log-normal, total lengths uniform up to 2048.
S-LoRA's (*slora*): 2,000 adapters with power-law popularity, input and
output lengths uniform in [8, 512], Gamma arrivals with a coefficient of
variation ``cv`` (1-8 in the paper). Punica's arrivals are Poisson here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

WORKLOADS = ("distinct", "uniform", "skewed", "identical", "slora")
MAX_TOTAL = 2048
SLORA_ADAPTERS = 2000


@dataclasses.dataclass(frozen=True)
class SimRequest:
  rid: int
  arrival: float  # seconds
  adapter: int  # -1: names none (routed by its embedding, if any)
  prompt_len: int
  output_len: int
  embedding: tuple | None = None  # of an unnamed request
  intended: int = -1  # the adapter an unnamed request's embedding came from


def adapter_embeddings(num_adapters: int, dim: int = 32,
                       seed: int = 0) -> np.ndarray:
  """Unit embeddings of ``num_adapters`` adapters (deterministic in
  ``seed``), for routing unnamed requests."""
  rng = np.random.default_rng(seed + 7777)
  e = rng.normal(size=(num_adapters, dim)).astype(np.float32)
  return e / np.linalg.norm(e, axis=1, keepdims=True)


def num_adapters_of(name: str, n: int) -> int:
  """How many adapters workload ``name`` of ``n`` requests draws from."""
  if name == "slora":
    return SLORA_ADAPTERS
  if name == "uniform":
    return max(int(round(math.sqrt(n))), 1)
  if name == "identical":
    return 1
  return n


def _zipf(rng, n_items: int, alpha: float, size: int) -> np.ndarray:
  p = 1.0 / np.arange(1, n_items + 1) ** alpha
  return rng.choice(n_items, size=size, p=p / p.sum())


def adapters_for(name: str, n: int, rng) -> np.ndarray:
  """Adapter id of each of ``n`` requests under popularity ``name``."""
  if name == "distinct":
    return rng.permutation(n)
  if name == "uniform":
    return rng.integers(0, max(int(round(math.sqrt(n))), 1), n)
  if name == "skewed":
    return _zipf(rng, n, 1.5, n)
  if name == "identical":
    return np.zeros(n, np.int64)
  if name == "slora":
    return _zipf(rng, SLORA_ADAPTERS, 1.0, n)
  raise ValueError(f"unknown workload {name!r}; choose one of {WORKLOADS}")


def lengths_for(name: str, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """(prompt lengths, output lengths) of ``n`` requests."""
  if name == "slora":
    return rng.integers(8, 513, n), rng.integers(8, 513, n)
  prompt = np.clip(np.round(rng.lognormal(math.log(64), 1.0, n)), 2,
                   MAX_TOTAL // 2).astype(np.int64)
  total = rng.integers(prompt + 1, MAX_TOTAL + 1)
  return prompt, total - prompt


def arrivals(n: int, rate: float, rng, cv: float = 1.0) -> np.ndarray:
  """Arrival times of ``n`` requests at ``rate`` per second: Poisson
  (``cv`` 1) or Gamma gaps with coefficient of variation ``cv``."""
  if rate <= 0:
    raise ValueError(f"arrival rate (={rate!r}) must be > 0 requests/s")
  if cv == 1.0:
    gaps = rng.exponential(1.0 / rate, n)
  else:
    shape = 1.0 / cv ** 2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
  return np.cumsum(gaps) - gaps[0]


def make_workload(name: str, n: int, rate: float | None, seed: int = 0,
                  cv: float = 1.0, unnamed: float = 0.0, embed_dim: int = 32,
                  noise: float = 0.3) -> list[SimRequest]:
  """``n`` requests of workload ``name``; ``rate=None``: all at time 0
  (the offline load that measures a cluster's capacity). A fraction
  ``unnamed`` of them name no adapter: they carry the embedding of the
  adapter they would have named (``adapter_embeddings``) plus Gaussian
  noise of norm about ``noise``, and that adapter as ``intended``."""
  if not 0.0 <= unnamed <= 1.0:
    raise ValueError(f"unnamed (={unnamed}) must lie in [0, 1]")
  rng = np.random.default_rng(seed)
  adapters = adapters_for(name, n, rng)
  prompt, output = lengths_for(name, n, rng)
  times = np.zeros(n) if rate is None else arrivals(n, rate, rng, cv)
  out = [SimRequest(i, float(times[i]), int(adapters[i]), int(prompt[i]),
                    int(output[i])) for i in range(n)]
  if unnamed > 0:
    emb = adapter_embeddings(num_adapters_of(name, n), embed_dim, seed)
    pick = np.random.default_rng(seed + 1).uniform(size=n) < unnamed
    shake = np.random.default_rng(seed + 2).normal(
        size=(n, embed_dim)) * noise / math.sqrt(embed_dim)
    out = [dataclasses.replace(
        r, adapter=-1, intended=r.adapter,
        embedding=tuple(float(v) for v in emb[r.adapter] + shake[i]))
        if pick[i] else r for i, r in enumerate(out)]
  return out
