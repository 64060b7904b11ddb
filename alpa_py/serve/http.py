"""An OpenAI-compatible HTTP front end for a ``serve.Router`` (FastAPI
behind uvicorn; install with ``pip install alpa_py[serve]``).

  GET  /v1/models        the base model ("base") and its adapters
                         ("adapter-0" ...)
  POST /v1/completions   {"model": "adapter-3", "prompt": [1, 5, 9],
                          "max_tokens": 16, "temperature": 0, "stop": [2],
                          "seed": 0, "stream": false}

The engine has no tokenizer: a prompt is a list of token ids (or a list of
such lists, one choice each), and each choice carries its new tokens as
``token_ids`` (``text`` is the same ids written out, space separated).
``stream: true`` sends server-sent events, one chunk per token, then
``data: [DONE]``. A malformed request gets a 400 with an OpenAI-style
error body; it never reaches the engine.

One thread (``EngineLoop``) owns the router: it takes new requests between
steps, steps the engines while any request is live, and hands each event
to the request's waiting handler.

(No ``from __future__ import annotations`` here: FastAPI reads the
endpoint's parameter annotation, imported inside ``make_app``, at runtime.)
"""


import asyncio
import itertools
import json
import queue
import threading
import time

from alpa_py.serve.request import Request

BASE_MODEL = "base"


def model_names(num_adapters: int) -> list[str]:
  return [BASE_MODEL] + [f"adapter-{i}" for i in range(num_adapters)]


class EngineLoop:
  """Runs ``router`` on a thread of its own; ``submit`` is thread safe."""

  def __init__(self, router):
    self.router = router
    self._inbox: queue.Queue = queue.Queue()
    self._listeners: dict = {}
    self._stop = threading.Event()
    self.error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, name="alpa-py-engine",
                                    daemon=True)
    self._thread.start()

  def submit(self, request: Request, on_event) -> None:
    """Queues ``request``; ``on_event(event)`` is called (on the engine
    thread) for each of its tokens, or ``on_event(exception)`` if the
    engine fails.

    Raises:
      ValueError: a bad request (checked here, before it is queued).
    """
    self.router.check(request)
    if self.error is not None:
      raise RuntimeError(f"the engine failed earlier: {self.error!r}")
    self._inbox.put((request, on_event))

  def _take(self, block: bool) -> None:
    try:
      item = self._inbox.get(timeout=0.05) if block else \
          self._inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      request, on_event = item
      self._listeners[self.router.submit(request)] = on_event
      try:
        item = self._inbox.get_nowait()
      except queue.Empty:
        return

  def _run(self) -> None:
    while not self._stop.is_set():
      self._take(block=not self.router.has_work)
      if not self.router.has_work:
        continue
      try:
        events = self.router.step()
      except Exception as e:  # noqa: BLE001 - reported to every waiter
        self.error = e
        for cb in self._listeners.values():
          cb(e)
        self._listeners.clear()
        return
      for ev in events:
        cb = self._listeners.get(ev.rid)
        if cb is not None:
          try:
            cb(ev)
          except RuntimeError:  # its client's event loop is gone
            pass
          if ev.finished:
            del self._listeners[ev.rid]

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=30)


class BadRequest(ValueError):
  """A request the API rejects (sent back as a 400)."""


_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None,
                "top_p": 1, "suffix": None}


def parse_completion(body, names: list[str]) -> tuple[str, list[Request], bool]:
  """(model name, one Request per prompt, stream?) of a completions body.

  Raises:
    BadRequest: the message names the field and what it may be.
  """
  if not isinstance(body, dict):
    raise BadRequest("the body must be a JSON object")
  model = body.get("model")
  if model not in names:
    raise BadRequest(f"model (={model!r}) must be one of "
                     f"{names[:6] + (['...'] if len(names) > 6 else [])} "
                     "(GET /v1/models lists them)")
  adapter = names.index(model) - 1
  prompt = body.get("prompt")
  if isinstance(prompt, str):
    raise BadRequest("prompt is text, but this server has no tokenizer: "
                     "send token ids (a list of ints, or a list of such lists)")
  if isinstance(prompt, list) and prompt and all(isinstance(p, list)
                                                 for p in prompt):
    prompts = prompt
  elif isinstance(prompt, list):
    prompts = [prompt]
  else:
    raise BadRequest(f"prompt (={prompt!r}) must be a list of token ids or "
                     "a list of such lists")
  for key, default in _UNSUPPORTED.items():
    if key in body and body[key] != default and body[key] is not None:
      raise BadRequest(f"{key} (={body[key]!r}) is not supported; leave it "
                       f"out (or {default!r})")
  stop = body.get("stop", [])
  stop = [stop] if isinstance(stop, int) and not isinstance(stop, bool) \
      else stop
  if not isinstance(stop, list):
    raise BadRequest(f"stop (={stop!r}) must be a token id or a list of them")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise BadRequest(f"stream (={stream!r}) must be true or false")
  reqs = []
  for p in prompts:
    r = Request(prompt=p, adapter=adapter,
                max_new_tokens=body.get("max_tokens", 16),
                temperature=body.get("temperature", 1.0), stop=tuple(stop),
                seed=body.get("seed", 0))
    reqs.append(r)
  return model, reqs, stream


def _check_all(loop: EngineLoop, reqs) -> None:
  for r in reqs:
    try:
      loop.router.check(r)
    except (ValueError, TypeError) as e:
      raise BadRequest(str(e).replace("Request.", "").replace(
          "max_new_tokens", "max_tokens")) from None


def make_app(loop: EngineLoop):
  """The FastAPI application serving ``loop``'s router."""
  from fastapi import FastAPI, Request as HttpRequest
  from fastapi.responses import JSONResponse, StreamingResponse

  app = FastAPI(title="alpa_py multi-LoRA serving")
  names = model_names(loop.router.cfg.lora_adapters)
  ids = itertools.count()

  def error(status: int, message: str, kind="invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "param": None, "code": None}})

  @app.get("/v1/models")
  def list_models():
    return {"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "alpa_py"}
        for n in names]}

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    try:
      body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return error(400, f"the body is not JSON ({e})")
    try:
      model, reqs, stream = parse_completion(body, names)
      _check_all(loop, reqs)
    except BadRequest as e:
      return error(400, str(e))
    aio = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    try:
      for i, r in enumerate(reqs):
        loop.submit(r, lambda ev, i=i: aio.call_soon_threadsafe(
            events.put_nowait, (i, ev)))
    except RuntimeError as e:  # the engine failed earlier
      return error(503, str(e), "server_error")
    head = {"id": f"cmpl-{next(ids)}", "object": "text_completion",
            "created": int(time.time()), "model": model}
    if stream:
      return StreamingResponse(_stream(events, reqs, head),
                               media_type="text/event-stream")
    tokens = [[] for _ in reqs]
    reasons = [None] * len(reqs)
    left = len(reqs)
    while left:
      i, ev = await events.get()
      if isinstance(ev, BaseException):
        return error(500, f"the engine failed: {ev!r}", "server_error")
      tokens[i].append(ev.token)
      if ev.finished:
        reasons[i] = _reason(reqs[i], ev.token)
        left -= 1
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    done = sum(map(len, tokens))
    return {**head, "choices": [
        {"index": i, "text": _text(t), "token_ids": t, "logprobs": None,
         "finish_reason": reasons[i]} for i, t in enumerate(tokens)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                  "total_tokens": prompt_tokens + done}}

  return app


def _text(tokens) -> str:
  return " ".join(map(str, tokens))


def _reason(req: Request, last: int) -> str:
  return "stop" if last in req.stop else "length"


async def _stream(events, reqs, head):
  left = len(reqs)
  while left:
    i, ev = await events.get()
    if isinstance(ev, BaseException):
      err = {"error": {"message": f"the engine failed: {ev!r}",
                       "type": "server_error"}}
      yield f"data: {json.dumps(err)}\n\n"
      break
    reason = _reason(reqs[i], ev.token) if ev.finished else None
    left -= ev.finished
    chunk = {**head, "choices": [{"index": i, "text": " " + str(ev.token),
                                  "token_ids": [ev.token], "logprobs": None,
                                  "finish_reason": reason}]}
    yield f"data: {json.dumps(chunk)}\n\n"
  yield "data: [DONE]\n\n"


class Server:
  """The HTTP API on ``host:port`` (port 0: a free one), served by uvicorn
  on a background thread; ``url`` once started, ``close()`` to stop."""

  def __init__(self, router, host: str = "127.0.0.1", port: int = 0):
    import socket

    import uvicorn
    self.loop = EngineLoop(router)
    self._sock = socket.socket()
    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._sock.bind((host, port))
    self.host, self.port = self._sock.getsockname()[:2]
    config = uvicorn.Config(make_app(self.loop), log_level="warning")
    self._server = uvicorn.Server(config)
    self._thread = threading.Thread(
        target=self._server.run, kwargs={"sockets": [self._sock]},
        name="alpa-py-http", daemon=True)
    self._thread.start()
    deadline = time.time() + 60
    while not self._server.started:
      if not self._thread.is_alive() or time.time() > deadline:
        raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
      time.sleep(0.02)

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def close(self) -> None:
    self._server.should_exit = True
    self._thread.join(timeout=30)
    self.loop.close()
    self._sock.close()


def serve_forever(router, host: str, port: int) -> None:
  """Serves the API until interrupted (the CLI's ``alpa-py serve``)."""
  import uvicorn
  loop = EngineLoop(router)
  try:
    uvicorn.run(make_app(loop), host=host, port=port, log_level="info")
  finally:
    loop.close()
