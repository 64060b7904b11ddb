"""A multi-LoRA decode engine: one base model and many adapters on one
device, continuous batching over a paged KV cache (``serve.Engine``).

Each ``step()`` admits waiting requests while the batch has a free row, KV
pages and an adapter slot (prefilling them together, SGMV over their
prompt segments), then decodes one token for every request admitted
earlier (BGMV, one adapter per row). Requests leave the batch when they
hit a stop token or ``max_new_tokens``, and their pages go back to the
free list. When the pool cannot give a running request its next page, the
newest requests are preempted: their pages are freed and they are queued
again at the front, to be re-prefilled (prompt + tokens so far) when they
are admitted again. Programs are compiled per power-of-two bucket (rows
for decode, rows and tokens for prefill), never per request.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py.serve import approx_attention, decoder
from alpa_py.serve.adapters import AdapterCache, host_adapters
from alpa_py.serve.kv_cache import PagePool
from alpa_py.serve.request import Request
from alpa_py.serve.scheduler import GpuView

# share of the device memory left after the weights that the KV pool takes
KV_MEMORY_FRACTION = 0.8


@dataclasses.dataclass(frozen=True)
class EngineStats:
  """Counters since the engine was made: ``tokens_per_s`` is generated
  tokens over the wall time spent in ``step``; ``kv_pages_used`` the most
  pages held at once; ``mean_distinct_adapters`` counts adapters (not the
  base model) per step; ``preemptions`` the requests preempted and later
  re-prefilled. With ``attention="kernel_sum"``: ``attention_evaluations``
  counts the key evaluations of the decode queries (every layer and
  head), ``attention_keys`` the keys exact attention would have read."""

  steps: int
  mean_batch_size: float
  mean_distinct_adapters: float
  tokens_per_s: float
  kv_pages_used: int
  adapter_loads: int
  adapter_evictions: int
  preemptions: int = 0
  generated_tokens: int = 0
  attention_evaluations: int = 0
  attention_keys: int = 0


@dataclasses.dataclass(frozen=True)
class Event:
  """A token generated for request ``rid`` (``finished``: its last)."""

  rid: int
  token: int
  finished: bool


@dataclasses.dataclass
class _Seq:
  rid: int
  req: Request
  tokens: list  # prompt + generated
  generated: list
  admitted: int = -1  # admission order (preemption takes the newest)
  preempted: bool = False
  forced: list | None = None  # teacher-forced tokens (``Engine.score``)
  scores: list | None = None  # their logits

  @property
  def done(self) -> bool:
    return len(self.generated) >= self.req.max_new_tokens or bool(
        self.generated and self.generated[-1] in self.req.stop)


def _bucket(n: int, lo: int = 1) -> int:
  b = lo
  while b < n:
    b *= 2
  return b


class Engine:
  """Serves ``model`` (an ``alpa_py.models.GPT`` with ``lora_adapters > 0``)
  with ``params`` from ``model.init``.

  Args:
    max_batch: requests decoded together at most.
    page_size: tokens per KV page.
    num_pages: KV pages; None takes as many as fit in 80% of the device
      memory left after the weights (on CPU devices, enough for
      ``max_batch`` requests of ``seq_len`` tokens).
    adapter_cache: adapters held on the device at once (default: all of
      them, up to ``max_batch``); the others wait in host memory.
    device: the device (default: the first).
    lora_backend: the LoRA operators' backend (``kernels.lora``).
    attention: ``"exact"``, or ``"kernel_sum"``: decode attends through a
      ``sketch.KVAttention`` per sequence, layer and head
      (``serve.approx_attention``; relative error ``eps`` per query);
      ``attention_options`` go to it (``eps``, ``delta``,
      ``exact_below``, ``seed``, ...).
  """

  def __init__(self, model, params, *, max_batch: int = 32,
               page_size: int = 16, num_pages: int | None = None,
               adapter_cache: int | None = None, device=None,
               lora_backend: str = "auto", attention: str = "exact",
               attention_options: dict | None = None):
    cfg = getattr(model, "cfg", None)
    if cfg is None or not getattr(cfg, "lora_adapters", 0):
      raise ValueError("serve.Engine needs an alpa_py.models.GPT with "
                       "lora_adapters > 0 (its cfg sets how many adapters)")
    if not isinstance(max_batch, int) or max_batch <= 0:
      raise ValueError(f"max_batch (={max_batch!r}) must be an int > 0")
    if attention not in approx_attention.ATTENTION:
      raise ValueError(f"attention (={attention!r}) must be one of "
                       f"{approx_attention.ATTENTION}")
    self.cfg = cfg
    self.sketch = approx_attention.SketchedKV(cfg, attention_options) \
        if attention == "kernel_sum" else None
    self.device = device or jax.devices()[0]
    self.max_batch = max_batch
    self.layout = decoder.Layout(cfg, page_size, lora_backend)
    self.params = jax.device_put(params, self.device)
    self.adapters = AdapterCache(
        host_adapters(params, cfg.num_layers),
        min(cfg.lora_adapters, max_batch) if adapter_cache is None
        else adapter_cache, cfg.dtype, self.device)
    if num_pages is None:
      num_pages = self._default_pages(page_size)
    self.pool = PagePool(num_pages, page_size)
    shape = (cfg.num_layers, num_pages + 1, page_size, cfg.num_heads,
             cfg.hidden // cfg.num_heads)
    self.k_pages = jax.device_put(jnp.zeros(shape, cfg.dtype), self.device)
    self.v_pages = jax.device_put(jnp.zeros(shape, cfg.dtype), self.device)
    self.max_pages_per_seq = self.pool.pages_for(cfg.seq_len)
    self._waiting: collections.deque[_Seq] = collections.deque()
    self._running: list[_Seq] = []
    self._next_rid = 0
    self._admissions = 0
    self._steps = 0
    self._rows = 0
    self._distinct = 0
    self._tokens = 0
    self._seconds = 0.0
    self._peak_pages = 0
    self._preemptions = 0
    self._held: list[Event] = []  # other requests' events during score()

  # -- sizing ----------------------------------------------------------------

  def _default_pages(self, page_size: int) -> int:
    per_seq = -(-self.cfg.seq_len // page_size)
    if self.device.platform == "cpu":
      return self.max_batch * per_seq
    stats = self.device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
      return self.max_batch * per_seq
    left = limit - stats.get("bytes_in_use", 0)
    per_page = decoder.page_bytes(self.cfg, page_size, self.cfg.dtype)
    return max(int(KV_MEMORY_FRACTION * left // per_page), 1)

  # -- requests --------------------------------------------------------------

  def submit(self, request: Request, generated: Sequence[int] = ()) -> int:
    """Queues ``request``; returns its id (events name it). ``generated``:
    the tokens it already generated elsewhere (a request preempted on
    another engine resumes here: its context is re-prefilled and sampling
    goes on from its next token).

    Raises:
      ValueError: a bad request (the message names the field), or one that
        needs more KV pages than the whole pool has.
    """
    cfg = self.cfg
    request.check(vocab_size=cfg.vocab_size, num_adapters=cfg.lora_adapters,
                  seq_len=cfg.seq_len)
    need = self.pool.pages_for(len(request.prompt) + request.max_new_tokens)
    if need > self.pool.num_pages:
      raise ValueError(
          f"the KV pool ({self.pool.num_pages} pages of "
          f"{self.pool.page_size} tokens) is too small for a request of "
          f"{len(request.prompt)} + {request.max_new_tokens} tokens "
          f"({need} pages): raise num_pages or page_size")
    rid = self._next_rid
    self._next_rid += 1
    self._waiting.append(_Seq(rid, request,
                              list(request.prompt) + list(generated),
                              list(generated)))
    return rid

  def release_preempted(self) -> list[tuple[int, Request, list[int]]]:
    """Takes the preempted requests out of this engine's queue, to be
    placed again elsewhere: (id, request, tokens generated so far) each."""
    out = [(s.rid, s.req, list(s.generated)) for s in self._waiting
           if s.preempted]
    self._waiting = collections.deque(s for s in self._waiting
                                      if not s.preempted)
    return out

  @property
  def has_work(self) -> bool:
    return bool(self._waiting or self._running or self._held)

  def view(self, gid: int = 0) -> GpuView:
    """What a scheduling policy sees of this engine: its requests (running
    and queued), the KV pages left once the queued ones' prompts are
    placed, and its adapters."""
    queued = list(self._waiting)
    promised = sum(self.pool.pages_for(len(s.tokens)) for s in queued)
    return GpuView(gid, len(self._running) + len(queued), self.max_batch,
                   self.pool.free - promised,
                   frozenset(self._in_use(self._running + queued)),
                   frozenset(self.adapters.cached()))

  def generate(self, requests: Sequence[Request]) -> list[list[int]]:
    """Runs ``requests`` to completion (with whatever else is queued);
    returns each one's new token ids, in request order."""
    for r in requests:  # every request checked before any is queued
      r.check(vocab_size=self.cfg.vocab_size,
              num_adapters=self.cfg.lora_adapters, seq_len=self.cfg.seq_len)
    rids = [self.submit(r) for r in requests]
    out = {rid: [] for rid in rids}
    while any(not self._finished(rid, out) for rid in rids):
      for ev in self.step():
        if ev.rid in out:
          out[ev.rid].append(ev.token)
    return [out[rid] for rid in rids]

  def score(self, request: Request, continuation: Sequence[int]
            ) -> np.ndarray:
    """Teacher forcing: the model's next-token logits after the prompt and
    each prefix of ``continuation`` (row j: after ``continuation[:j]``),
    ``[len(continuation), vocab]``, computed by this engine's prefill and
    decode (its attention included) while it serves whatever else is
    queued (their events wait for the next ``step``).
    ``request.max_new_tokens`` and ``stop`` are ignored.

    Raises:
      ValueError: an empty continuation, a token id that is not an
        integer in the vocabulary, or prompt + continuation longer than
        the model's ``seq_len``.
    """
    cont = list(continuation)
    if not cont:
      raise ValueError("continuation is empty; give at least one token id")
    bad = [t for t in cont if not isinstance(t, numbers.Integral)
           or isinstance(t, bool) or not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise ValueError(f"continuation has token id {bad[0]!r}: ids are "
                       f"integers in [0, {self.cfg.vocab_size})")
    total = len(list(request.prompt)) + len(cont)
    if total > self.cfg.seq_len:
      raise ValueError(f"prompt + continuation is {total} tokens, more than "
                       f"the model's seq_len (={self.cfg.seq_len}); shorten "
                       "the continuation")
    req = dataclasses.replace(request, max_new_tokens=len(cont), stop=())
    rid = self.submit(req)
    seq = self._waiting[-1]
    seq.forced, seq.scores = [int(t) for t in cont], []
    kept: list[Event] = []  # step() hands back what was held before
    while not self._finished(rid, None):
      kept += [ev for ev in self.step() if ev.rid != rid]
    self._held = kept
    return np.stack(seq.scores).astype(np.float32)

  def _finished(self, rid, out) -> bool:
    return not any(s.rid == rid for s in self._waiting) and \
        not any(s.rid == rid for s in self._running)

  # -- the step --------------------------------------------------------------

  def step(self) -> list[Event]:
    """Admits and prefills what fits, decodes one token for the rest."""
    held, self._held = self._held, []
    t0 = time.perf_counter()
    preempted = self._preemptions
    old = self._make_room(list(self._running))
    # no admission in a step that preempted: the pages just freed are the
    # running requests' next ones
    new = [] if self._preemptions > preempted else self._admit(len(old))
    events = []
    if new:
      events += self._prefill(new)
    if old:
      events += self._decode(old)
    batch = old + new
    if batch:
      self._steps += 1
      self._rows += len(batch)
      self._distinct += len(self._in_use(batch))
    self._running = [s for s in self._running if not s.done]
    for s in batch:
      if s.done:
        self.pool.release(s.rid)
        if self.sketch is not None:
          self.sketch.drop(s.rid)
    self._seconds += time.perf_counter() - t0
    return held + events

  def _in_use(self, seqs) -> set:
    return {s.req.adapter for s in seqs if s.req.adapter >= 0}

  def _make_room(self, old: list[_Seq]) -> list[_Seq]:
    """Reserves the next token's page of every running sequence, oldest
    first, preempting the newest while the pool runs short."""
    old = sorted(old, key=lambda s: s.admitted)
    kept: list[_Seq] = []
    while old:
      s = old[0]
      if self.pool.can_hold(s.rid, len(s.tokens)):
        self.pool.reserve(s.rid, len(s.tokens))
        kept.append(old.pop(0))
        continue
      victim = old.pop() if len(old) > 1 else old.pop(0)
      self._preempt(victim)
    self._running = kept
    self._peak_pages = max(self._peak_pages, self.pool.used)
    return kept

  def _preempt(self, s: _Seq) -> None:
    self.pool.release(s.rid)
    if self.sketch is not None:
      self.sketch.drop(s.rid)
    self._preemptions += 1
    s.preempted = True
    self._waiting.appendleft(s)

  def _admit(self, running: int) -> list[_Seq]:
    """Waiting sequences (in order, skipping ones whose adapter cannot be
    loaded now) that fit in the free rows, pages and adapter slots."""
    new: list[_Seq] = []
    skipped = collections.deque()
    while self._waiting and running + len(new) < self.max_batch:
      s = self._waiting.popleft()
      in_use = self._in_use(self._running + new)
      if not self.adapters.can_admit(s.req.adapter, in_use):
        skipped.append(s)
        continue
      # a fresh sequence prefills its prompt; a preempted one its tokens but
      # the last, whose K/V the next decode writes: room for all its tokens
      if not self.pool.can_hold(s.rid, len(s.tokens)):
        self._waiting.appendleft(s)
        break
      self.pool.reserve(s.rid, len(s.tokens))
      self.adapters.ensure(s.req.adapter, in_use)
      s.preempted = False
      s.admitted = self._admissions
      self._admissions += 1
      new.append(s)
    self._waiting.extendleft(reversed(skipped))
    self._running = self._running + new
    self._peak_pages = max(self._peak_pages, self.pool.used)
    return new

  def _sampling(self, seqs, rows):
    temps = np.zeros(rows, np.float32)
    seeds = np.zeros(rows, np.uint32)
    counters = np.zeros(rows, np.int32)
    for i, s in enumerate(seqs):
      temps[i] = s.req.temperature
      seeds[i] = s.req.seed
      counters[i] = len(s.generated)
    return temps, seeds, counters

  def _emit(self, seqs, tokens, sample_mask, logits) -> list[Event]:
    events = []
    rows = None
    for r, (s, tok, take) in enumerate(zip(seqs, tokens, sample_mask)):
      if not take:
        continue
      tok = int(tok)
      if s.forced is not None:
        rows = np.asarray(logits) if rows is None else rows
        s.scores.append(rows[r])
        tok = s.forced[len(s.generated)]
      s.generated.append(tok)
      s.tokens.append(tok)
      self._tokens += 1
      events.append(Event(s.rid, tok, s.done))
    return events

  def _prefill(self, new: list[_Seq]) -> list[Event]:
    ps = self.pool.page_size
    ctxs = [s.tokens[:-1] if s.generated else s.tokens for s in new]
    total = sum(len(c) for c in ctxs)
    tb = _bucket(total, 16)
    rb = _bucket(len(new))
    tokens = np.zeros(tb, np.int32)
    positions = np.zeros(tb, np.int32)
    segment = np.full(tb, rb, np.int32)
    pages = np.full(tb, self.pool.scratch, np.int32)
    offsets = np.zeros(tb, np.int32)
    starts = np.zeros(rb + 2, np.int32)
    seg_slots = np.full(rb + 1, -1, np.int32)
    last = np.zeros(rb, np.int32)
    t = 0
    for i, (s, ctx) in enumerate(zip(new, ctxs)):
      n = len(ctx)
      tokens[t:t + n] = ctx
      positions[t:t + n] = np.arange(n)
      segment[t:t + n] = i
      table = self.pool.tables[s.rid]
      pages[t:t + n] = [table[j // ps] for j in range(n)]
      offsets[t:t + n] = np.arange(n) % ps
      starts[i] = t
      seg_slots[i] = self.adapters.slot(s.req.adapter)
      last[i] = t + n - 1
      t += n
    starts[len(new):rb + 1] = t
    starts[rb + 1] = tb
    temps, seeds, counters = self._sampling(new, rb)
    nxt, logits, self.k_pages, self.v_pages = decoder.prefill(
        self.layout, self.params, self.adapters.slots, self.k_pages,
        self.v_pages, tokens, positions, segment, pages, offsets, starts,
        seg_slots, last, temps, seeds, counters)
    if self.sketch is not None:
      for s, ctx in zip(new, ctxs):
        self.sketch.build(s.rid, *approx_attention.context_kv(
            self.k_pages, self.v_pages, self.pool.tables[s.rid], len(ctx),
            ps))
    nxt = np.asarray(nxt)[:len(new)]
    return self._emit(new, nxt, [not s.generated for s in new], logits)

  def _decode(self, seqs: list[_Seq]) -> list[Event]:
    b = _bucket(len(seqs))
    tokens = np.zeros(b, np.int32)
    positions = np.zeros(b, np.int32)
    tables = np.full((b, self.max_pages_per_seq), self.pool.scratch, np.int32)
    slot_ids = np.full(b, -1, np.int32)
    for i, s in enumerate(seqs):
      tokens[i] = s.tokens[-1]
      positions[i] = len(s.tokens) - 1
      table = self.pool.tables[s.rid]
      tables[i, :len(table)] = table
      slot_ids[i] = self.adapters.slot(s.req.adapter)
    temps, seeds, counters = self._sampling(seqs, b)
    if self.sketch is not None:
      nxt, logits = self.sketch.decode(self, [s.rid for s in seqs], tokens,
                                       positions, slot_ids, temps, seeds,
                                       counters)
    else:
      nxt, logits, self.k_pages, self.v_pages = decoder.decode_step(
          self.layout, self.params, self.adapters.slots, self.k_pages,
          self.v_pages, tokens, positions, tables, slot_ids, temps, seeds,
          counters)
    nxt = np.asarray(nxt)[:len(seqs)]
    return self._emit(seqs, nxt, [True] * len(seqs), logits)

  # -- figures ---------------------------------------------------------------

  @property
  def stats(self) -> EngineStats:
    steps = max(self._steps, 1)
    return EngineStats(
        steps=self._steps, mean_batch_size=self._rows / steps,
        mean_distinct_adapters=self._distinct / steps,
        tokens_per_s=self._tokens / self._seconds if self._seconds else 0.0,
        kv_pages_used=self._peak_pages,
        adapter_loads=self.adapters.loads,
        adapter_evictions=self.adapters.evictions,
        preemptions=self._preemptions, generated_tokens=self._tokens,
        attention_evaluations=self.sketch.evaluations if self.sketch else 0,
        attention_keys=self.sketch.keys if self.sketch else 0)
