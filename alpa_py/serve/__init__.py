"""Multi-LoRA serving in the manner of Punica (MLSys '24): a batched decode
engine over a paged KV cache with a bounded device cache of adapters.

  from alpa_py import serve
  engine = serve.Engine(model, params, max_batch=32, page_size=16)
  outs = engine.generate([serve.Request(prompt=[1, 5, 9], adapter=3)])

Several engines (in this process or as Ray actors) behind a scheduling
policy: ``serve.make_router``; the OpenAI-compatible HTTP API:
``serve.http`` (``alpa-py serve``). Requests that name no adapter but carry
an embedding: ``serve.AdapterRouting`` (online matching by affinity under
per-adapter capacity), given to the ``Router`` or the simulator.
"""

from alpa_py.serve.affinity import AdapterRouting
from alpa_py.serve.cluster import LocalEngines, RayEngines, Router, make_router
from alpa_py.serve.engine import Engine, EngineStats, Event
from alpa_py.serve.request import Request

__all__ = ["AdapterRouting", "Engine", "EngineStats", "Event", "LocalEngines", "RayEngines",
           "Request", "Router", "make_router"]
