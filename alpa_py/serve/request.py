"""A generation request and its checks (``serve.Request``)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request.

  Attributes:
    prompt: token ids (at least one).
    adapter: the LoRA adapter to apply; -1 for the base model alone.
    max_new_tokens: tokens to generate at most (> 0).
    temperature: 0 for greedy decoding, > 0 to sample from
      ``softmax(logits / temperature)``.
    stop: token ids that end the request (the stop token is returned).
    seed: the sampling seed (a request's tokens depend on it alone, not on
      the batch it runs in).
    embedding: for a request that names no adapter (``adapter=-1``), a
      representation of what it asks; a ``Router`` with
      ``adapter_routing`` sends it to the adapter of largest affinity
      with room (``serve.AdapterRouting``). Ignored otherwise.
  """

  prompt: Sequence[int]
  adapter: int = -1
  max_new_tokens: int = 16
  temperature: float = 0.0
  stop: Sequence[int] = ()
  seed: int = 0
  embedding: Sequence[float] | None = None

  def check(self, *, vocab_size: int, num_adapters: int, seq_len: int) -> None:
    """Raises ValueError naming the bad field and what it may be."""
    prompt = list(self.prompt)
    if not prompt:
      raise ValueError("Request.prompt is empty; give at least one token id")
    bad = [t for t in prompt if not isinstance(t, numbers.Integral)
           or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"Request.prompt holds token id(s) {bad[:5]} outside "
                       f"[0, {vocab_size}) (the model's vocabulary)")
    a = self.adapter
    if not isinstance(a, int) or isinstance(a, bool) or \
        not -1 <= a < num_adapters:
      raise ValueError(f"Request.adapter (={a!r}) must be -1 (the base model) "
                       f"or an adapter id in [0, {num_adapters})")
    m = self.max_new_tokens
    if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
      raise ValueError(f"Request.max_new_tokens (={m!r}) must be an int > 0")
    if len(prompt) + m > seq_len:
      raise ValueError(
          f"a prompt of {len(prompt)} tokens with max_new_tokens={m} needs "
          f"{len(prompt) + m} positions; the model has seq_len={seq_len}: "
          f"shorten the prompt or lower max_new_tokens to "
          f"{max(seq_len - len(prompt), 0)}")
    t = self.temperature
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0:
      raise ValueError(f"Request.temperature (={t!r}) must be >= 0 "
                       "(0: greedy)")
    bad = [s for s in self.stop if not isinstance(s, int) or
           not 0 <= s < vocab_size]
    if bad:
      raise ValueError(f"Request.stop holds token id(s) {bad[:5]} outside "
                       f"[0, {vocab_size})")
    if self.embedding is not None:
      import numpy as np
      e = np.asarray(self.embedding)
      if e.ndim != 1 or e.size == 0 or not np.issubdtype(e.dtype, np.number) \
          or not np.all(np.isfinite(e)):
        raise ValueError("Request.embedding must be a non-empty 1-D sequence "
                         f"of finite numbers; got shape {e.shape}, dtype "
                         f"{e.dtype}")
    sd = self.seed
    if not isinstance(sd, int) or isinstance(sd, bool) or not 0 <= sd < 2**32:
      raise ValueError(f"Request.seed (={sd!r}) must be an int in [0, 2**32)")
