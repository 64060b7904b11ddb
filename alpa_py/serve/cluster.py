"""Serving on several engines: a ``Router`` places each request on an
engine by a scheduling policy (``serve.scheduler``, the same objects the
serving simulator uses) and steps every engine that has work.

Engines live in this process, one per device (``LocalEngines``), or as Ray
actors, one per GPU (``RayEngines``; on CPU hosts, one per simulated
device). ``RayEngines`` reuses the Ray cluster that
``alpa_py.init(cluster="ray")`` attached to, or starts a local one (and
stops it on ``close``).

  router = serve.Router(serve.LocalEngines(cfg, params, num_engines=2))
  outs = router.generate([serve.Request(prompt=[1, 2], adapter=3)])

A request is placed when the policy finds an engine with a free row and KV
room (the oldest queued requests are offered first; one the policy leaves
queued keeps its place). A request preempted inside an engine (its KV pool
ran short) comes back to the router's queue, ahead of new ones, and is
placed again by the policy (possibly on another engine), where its prompt
and the tokens it generated so far are re-prefilled.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import numpy as np

from alpa_py.serve.engine import Engine, EngineStats, Event
from alpa_py.serve.request import Request
from alpa_py.serve.scheduler import GpuView, Policy, get_policy


def _step(engine: Engine):
  """One step of ``engine``: its events, and the requests it preempted
  (taken out of its queue, for the router to place again)."""
  return engine.step(), engine.release_preempted()


def _engine(cfg, params, device, options):
  from alpa_py.models import GPT
  return Engine(GPT(cfg), params, device=device, **options)


class LocalEngines:
  """``num_engines`` engines in this process, one per local device (the
  first ``num_engines`` devices). ``options`` go to ``serve.Engine``."""

  def __init__(self, cfg, params, num_engines: int = 1, devices=None,
               **options):
    import jax
    devices = list(devices or jax.devices())
    if not isinstance(num_engines, int) or not 1 <= num_engines <= len(devices):
      raise ValueError(f"num_engines (={num_engines!r}) must be an int in "
                       f"[1, {len(devices)}] (one engine per device)")
    self.cfg = cfg
    self.engines = [_engine(cfg, params, d, options)
                    for d in devices[:num_engines]]
    self.page_size = self.engines[0].pool.page_size

  def __len__(self) -> int:
    return len(self.engines)

  def views(self) -> list[GpuView]:
    return [e.view(i) for i, e in enumerate(self.engines)]

  def submit(self, i: int, request: Request, generated=()) -> int:
    return self.engines[i].submit(request, generated)

  def step(self, which: Sequence[int]) -> list[tuple[list[Event], list]]:
    return [_step(self.engines[i]) for i in which]

  def stats(self) -> list[EngineStats]:
    return [e.stats for e in self.engines]

  def close(self) -> None:
    self.engines = []


class _EngineActor:
  """One engine in a Ray actor (methods are called through Ray)."""

  def __init__(self, cfg, params, platform: str, options):
    if platform == "cpu":
      os.environ["JAX_PLATFORMS"] = "cpu"
    self.engine = _engine(cfg, params, None, options)

  def page_size(self):
    return self.engine.pool.page_size

  def view(self, gid):
    return self.engine.view(gid)

  def submit(self, request, generated):
    return self.engine.submit(request, generated)

  def step(self):
    return _step(self.engine)

  def stats(self):
    return self.engine.stats


class RayEngines:
  """``num_engines`` engines as Ray actors: one GPU each where the cluster
  has GPUs; on CPU hosts each takes no CPU reservation (the host workers of
  ``alpa_py.init(cluster="ray")`` hold those) and runs on the host's CPU
  device."""

  def __init__(self, cfg, params, num_engines: int = 2, **options):
    import ray
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not isinstance(num_engines, int) or num_engines < 1:
      raise ValueError(f"num_engines (={num_engines!r}) must be an int >= 1")
    self.started_ray = False
    if not ray.is_initialized():  # no alpa_py.init(cluster="ray") cluster
      ray.init(include_dashboard=False, log_to_driver=False)
      self.started_ray = True
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and num_engines > gpus:
      raise ValueError(f"num_engines (={num_engines}) is more than the "
                       f"{gpus} GPUs of the Ray cluster (one engine per GPU)")
    actor = ray.remote(num_cpus=0, num_gpus=1 if gpus else 0)(_EngineActor)
    host = _to_host(params)
    self.cfg = cfg
    self.actors = [actor.remote(cfg, host, "gpu" if gpus else "cpu",
                                options) for _ in range(num_engines)]
    # every engine built (or its error raised here)
    self.page_size = self._get(a.page_size.remote() for a in self.actors)[0]

  def __len__(self) -> int:
    return len(self.actors)

  def _get(self, refs):
    import ray
    try:
      return ray.get(list(refs), timeout=600)
    except ray.exceptions.RayTaskError as e:
      raise e.as_instanceof_cause() from None

  def views(self) -> list[GpuView]:
    return self._get(a.view.remote(i) for i, a in enumerate(self.actors))

  def submit(self, i: int, request: Request, generated=()) -> int:
    return self._get([self.actors[i].submit.remote(request,
                                                   list(generated))])[0]

  def step(self, which: Sequence[int]) -> list[tuple[list[Event], list]]:
    return self._get(self.actors[i].step.remote() for i in which)

  def stats(self) -> list[EngineStats]:
    return self._get(a.stats.remote() for a in self.actors)

  def close(self) -> None:
    import ray
    for a in self.actors:
      try:
        ray.kill(a)
      except Exception:  # noqa: BLE001 - already gone
        pass
    self.actors = []
    if self.started_ray and ray.is_initialized():
      ray.shutdown()


def _to_host(params):
  import jax
  return jax.tree_util.tree_map(np.asarray, params)


@dataclasses.dataclass
class _Placed:
  engine: int
  local: int


class Router:
  """Places requests on ``engines`` (``LocalEngines`` or ``RayEngines``)
  by ``policy`` (a name or a ``scheduler.Policy``) and steps them.

  Request ids are the router's own; ``step`` returns events under them."""

  def __init__(self, engines, policy: str | Policy = "punica",
               scan_limit: int = 256, adapter_routing=None):
    self.engines = engines
    # serve.AdapterRouting: requests that name no adapter but carry an
    # embedding go to the adapter of largest affinity with room
    self.adapter_routing = adapter_routing
    self._routed: dict[int, int] = {}  # router id -> adapter it was routed to
    self.cfg = engines.cfg
    self.policy = get_policy(policy) if isinstance(policy, str) else policy
    self.scan_limit = scan_limit
    # (id, request, tokens it generated before a preemption)
    self._queue: collections.deque[tuple[int, Request, list]] = \
        collections.deque()
    self._placed: dict[int, _Placed] = {}
    self._back: dict[tuple[int, int], int] = {}
    self._next = 0
    self.preemptions = 0  # requests preempted and placed again

  def check(self, request: Request) -> None:
    """Raises ValueError naming a bad field (``Request.check``)."""
    cfg = self.cfg
    request.check(vocab_size=cfg.vocab_size, num_adapters=cfg.lora_adapters,
                  seq_len=cfg.seq_len)

  def submit(self, request: Request) -> int:
    """Queues ``request`` (checked now, and routed to an adapter when it
    names none and carries an embedding); returns its id."""
    self.check(request)
    rid = self._next
    self._next += 1
    routing = self.adapter_routing
    if routing is not None and request.adapter == -1 and \
        request.embedding is not None:
      if routing.num_adapters > self.cfg.lora_adapters:
        raise ValueError(f"adapter_routing holds {routing.num_adapters} "
                         f"adapters; the model has {self.cfg.lora_adapters}")
      adapter = routing.route(request.embedding)
      if adapter >= 0:
        request = dataclasses.replace(request, adapter=adapter)
        self._routed[rid] = adapter
    self._queue.append((rid, request, []))
    return rid

  def routed_adapter(self, rid: int) -> int | None:
    """The adapter a request was routed to while it runs (None: not
    routed, or finished)."""
    return self._routed.get(rid)

  @property
  def has_work(self) -> bool:
    return bool(self._queue or self._placed)

  def _place(self) -> None:
    if not self._queue:
      return
    views = self.engines.views()
    page_size = self.engines.page_size
    kept = collections.deque()
    scanned = 0
    while self._queue and scanned < self.scan_limit:
      rid, req, generated = item = self._queue.popleft()
      scanned += 1
      pages = -(-(len(req.prompt) + len(generated) + 1) // page_size)
      gid = self.policy.choose(req.adapter, pages, views)
      if gid is None:
        kept.append(item)
        continue
      local = self.engines.submit(gid, req, generated)
      self._placed[rid] = _Placed(gid, local)
      self._back[(gid, local)] = rid
      v = views[gid]
      adapters = v.batch_adapters | ({req.adapter} if req.adapter >= 0
                                     else set())
      views[gid] = dataclasses.replace(
          v, batch=v.batch + 1, free_pages=v.free_pages - pages,
          batch_adapters=frozenset(adapters))
    self._queue.extendleft(reversed(kept))

  def step(self) -> list[Event]:
    """Places what the policy allows, then steps every engine holding a
    request; returns the events under the router's request ids."""
    self._place()
    busy = sorted({p.engine for p in self._placed.values()})
    events, again = [], []
    for gid, (evs, preempted) in zip(busy, self.engines.step(busy)):
      for ev in evs:
        rid = self._back[(gid, ev.rid)]
        events.append(Event(rid, ev.token, ev.finished))
        if ev.finished:
          del self._back[(gid, ev.rid)]
          del self._placed[rid]
          if rid in self._routed:
            self.adapter_routing.release(self._routed.pop(rid))
      for local, req, generated in preempted:
        rid = self._back.pop((gid, local))
        del self._placed[rid]
        again.append((rid, req, generated))
    # preempted requests go first, oldest first, wherever the policy says
    self._queue.extendleft(reversed(sorted(again, key=lambda x: x[0])))
    self.preemptions += len(again)
    return events

  def generate(self, requests: Sequence[Request]) -> list[list[int]]:
    """Runs ``requests`` to completion; each one's new token ids, in
    request order."""
    for r in requests:
      self.check(r)
    rids = [self.submit(r) for r in requests]
    out = {rid: [] for rid in rids}
    left = set(rids)
    while left:
      for ev in self.step():
        if ev.rid in out:
          out[ev.rid].append(ev.token)
          if ev.finished:
            left.discard(ev.rid)
    return [out[rid] for rid in rids]

  @property
  def stats(self) -> list[EngineStats]:
    """Each engine's ``EngineStats``."""
    return self.engines.stats()

  def close(self) -> None:
    self.engines.close()


def make_router(cfg, params, num_engines: int = 1, cluster: str = "local",
                policy: str = "punica", adapter_routing=None,
                **options) -> Router:
  """A ``Router`` over ``num_engines`` engines in this process
  (``cluster="local"``) or as Ray actors (``cluster="ray"``)."""
  if cluster == "local":
    return Router(LocalEngines(cfg, params, num_engines, **options), policy,
                  adapter_routing=adapter_routing)
  if cluster == "ray":
    return Router(RayEngines(cfg, params, num_engines, **options), policy,
                  adapter_routing=adapter_routing)
  raise ValueError(f"cluster (={cluster!r}) must be 'local' or 'ray'")
