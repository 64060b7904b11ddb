"""Serving on several engines and over HTTP (``alpa_py.serve``): a router
over 2 engines (in this process, and as Ray actors) gives each request the
full model's greedy tokens; the OpenAI-compatible API returns what
``engine.generate`` returns, streamed or not, to 16 concurrent clients,
and answers malformed requests with a 400 while the engine keeps serving.
"""

import concurrent.futures
import json
import os

import pytest
from serve_models import CFG, check_greedy, tiny_model, workload

from alpa_py import serve

httpx = pytest.importorskip("httpx", reason="the serve extra: "
                            "pip install alpa_py[serve]")
pytest.importorskip("fastapi", reason="the serve extra")
pytest.importorskip("uvicorn", reason="the serve extra")

from alpa_py.serve import checkpoint, http  # noqa: E402


@pytest.mark.parametrize("policy", ["punica", "least-loaded"])
def test_router_over_two_engines_gives_the_full_models_tokens(policy):
  _, params = tiny_model()
  router = serve.make_router(CFG, params, num_engines=2, policy=policy,
                             max_batch=3, page_size=4, num_pages=12)
  reqs = workload("skewed", 10, seed=1)
  outs = router.generate(reqs)
  for req, out in zip(reqs, outs):
    check_greedy(req, out)
  stats = router.stats
  assert sum(s.generated_tokens for s in stats) == sum(map(len, outs))
  if policy == "least-loaded":  # spreads: both engines ran requests
    assert all(s.steps > 0 for s in stats)
  assert not router.has_work


def test_preempted_requests_are_placed_again_and_stay_exact():
  _, params = tiny_model()
  # pools of 6 pages of 4 tokens: long requests run the pools short
  router = serve.make_router(CFG, params, num_engines=2, policy="punica",
                             max_batch=4, page_size=4, num_pages=6)
  reqs = [serve.Request(prompt=[i + 1, 2 * i + 3], adapter=i % 8,
                        max_new_tokens=14) for i in range(8)]
  reqs.append(serve.Request(prompt=[5, 6], adapter=2, max_new_tokens=9,
                            temperature=0.7, seed=11))
  outs = router.generate(reqs)
  assert router.preemptions > 0
  for req, out in zip(reqs[:-1], outs[:-1]):
    check_greedy(req, out)
  model, _ = tiny_model()
  alone = serve.Engine(model, params, max_batch=1, page_size=4)
  assert outs[-1] == alone.generate([reqs[-1]])[0]  # sampling resumes exactly


def test_router_refuses_bad_requests_before_queueing():
  _, params = tiny_model()
  router = serve.make_router(CFG, params, num_engines=1, max_batch=2)
  with pytest.raises(ValueError, match="adapter"):
    router.submit(serve.Request(prompt=[1], adapter=CFG.lora_adapters))
  assert not router.has_work
  with pytest.raises(ValueError, match="cluster"):
    serve.make_router(CFG, params, cluster="slurm")
  with pytest.raises(ValueError, match="num_engines"):
    serve.make_router(CFG, params, num_engines=0)


def _requests():
  """16 requests: a mix of adapters, the base model, greedy and sampled."""
  reqs = workload("uniform", 16, seed=3)
  return [r if i % 4 else serve.Request(
      prompt=r.prompt, adapter=r.adapter, max_new_tokens=r.max_new_tokens,
      temperature=0.8, seed=i) for i, r in enumerate(reqs)]


def _body(req, stream):
  return {"model": "base" if req.adapter < 0 else f"adapter-{req.adapter}",
          "prompt": list(req.prompt), "max_tokens": req.max_new_tokens,
          "temperature": req.temperature, "seed": req.seed, "stream": stream}


def _post(client, url, req, stream):
  if not stream:
    r = client.post(url + "/v1/completions", json=_body(req, False))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == " ".join(map(str, choice["token_ids"]))
    return choice["token_ids"]
  tokens, done = [], False
  with client.stream("POST", url + "/v1/completions",
                     json=_body(req, True)) as r:
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    for line in r.iter_lines():
      if not line:
        continue
      assert line.startswith("data: ")
      data = line[len("data: "):]
      if data == "[DONE]":
        done = True
        break
      tokens += json.loads(data)["choices"][0]["token_ids"]
  assert done
  return tokens


@pytest.fixture(scope="module")
def server():
  _, params = tiny_model()
  router = serve.make_router(CFG, params, num_engines=2, max_batch=8,
                             page_size=4)
  srv = http.Server(router)
  yield srv
  srv.close()
  router.close()


def test_http_equals_engine_generate_for_16_concurrent_clients(server):
  model, params = tiny_model()
  reqs = _requests()
  want = serve.Engine(model, params, max_batch=4, page_size=4).generate(reqs)
  with httpx.Client(timeout=120) as client:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      got = list(pool.map(lambda ir: _post(client, server.url, ir[1],
                                           stream=ir[0] % 2 == 1),
                          enumerate(reqs)))
  assert got == want


def test_models_lists_the_base_model_and_every_adapter(server):
  r = httpx.get(server.url + "/v1/models", timeout=30)
  assert r.status_code == 200
  ids = [m["id"] for m in r.json()["data"]]
  assert ids == ["base"] + [f"adapter-{i}" for i in range(CFG.lora_adapters)]


@pytest.mark.parametrize("body, match", [
    ({"model": "adapter-99", "prompt": [1]}, "model"),
    ({"model": "base", "prompt": "hello"}, "tokenizer"),
    ({"model": "base", "prompt": [1, CFG.vocab_size]}, "vocabulary"),
    ({"model": "base", "prompt": [1], "max_tokens": 0}, "max_tokens"),
    ({"model": "base", "prompt": [1], "temperature": -1}, "temperature"),
    ({"model": "base", "prompt": [1], "max_tokens": CFG.seq_len}, "seq_len"),
    ({"model": "base", "prompt": [1], "n": 3}, "n "),
    ({"model": "base", "prompt": []}, "empty"),
    ([1, 2], "JSON object"),
])
def test_malformed_requests_get_a_400_and_the_engine_keeps_serving(
    server, body, match):
  r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
  assert r.status_code == 400, r.text
  assert match in r.json()["error"]["message"]
  ok = httpx.post(server.url + "/v1/completions", timeout=60, json={
      "model": "adapter-1", "prompt": [3, 4], "max_tokens": 2,
      "temperature": 0})
  assert ok.status_code == 200
  assert len(ok.json()["choices"][0]["token_ids"]) == 2


def test_a_body_that_is_not_json_gets_a_400(server):
  r = httpx.post(server.url + "/v1/completions", content=b"{oops",
                 headers={"content-type": "application/json"}, timeout=30)
  assert r.status_code == 400
  assert "not JSON" in r.json()["error"]["message"]


def test_checkpoint_round_trip_and_config_errors(tmp_path):
  _, params = tiny_model()
  path = checkpoint.save(tmp_path / "model", CFG, params)
  cfg = checkpoint.load_config(os.path.join(path, "config.json"))
  assert cfg == CFG
  back = checkpoint.load_params(path, cfg)
  import jax
  import numpy as np
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), b)
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"hidden": 32, "widht": 3}))
  with pytest.raises(ValueError, match="widht"):
    checkpoint.load_config(str(bad))
  bad.write_text(json.dumps({"hidden": 32}))
  with pytest.raises(ValueError, match="lora_adapters"):
    checkpoint.load_config(str(bad))
  other = tmp_path / "other.json"
  other.write_text(json.dumps({**checkpoint.config_to_json(CFG),
                               "hidden": 64}))
  with pytest.raises(ValueError, match="shape"):
    checkpoint.load_params(path, checkpoint.load_config(str(other)))
  with pytest.raises(ValueError, match="no orbax checkpoint"):
    checkpoint.load_params(str(tmp_path / "nowhere"), CFG)


@pytest.mark.slow  # starts a Ray cluster and two engine actors (~40 s)
def test_ray_engines_give_the_full_models_tokens():
  os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
  pytest.importorskip("ray")
  _, params = tiny_model()
  router = serve.make_router(CFG, params, num_engines=2, cluster="ray",
                             policy="least-loaded", max_batch=3, page_size=4,
                             num_pages=12)
  try:
    for kind in ("distinct", "uniform", "skewed", "identical"):
      reqs = workload(kind, 8, seed=2)
      outs = router.generate(reqs)
      for req, out in zip(reqs, outs):
        check_greedy(req, out)
    assert all(s.steps > 0 for s in router.stats)  # both engines served
  finally:
    router.close()


def test_cli_serve_refuses_a_bad_config_by_name(tmp_path, capsys):
  from alpa_py import cli
  bad = tmp_path / "cfg.json"
  bad.write_text(json.dumps({"hidden": 32, "lora_adapters": 0}))
  assert cli.main(["serve", "--model-config", str(bad)]) == 2
  assert "lora_adapters" in capsys.readouterr().err


class _FailingRouter:
  """A router whose engines fail on their first step."""

  cfg = CFG
  has_work = False

  def check(self, request):
    pass

  def submit(self, request):
    self.has_work = True
    return 0

  def step(self):
    raise RuntimeError("device lost")


def test_an_engine_failure_is_a_500_then_503_never_a_hang():
  srv = http.Server(_FailingRouter())
  try:
    body = {"model": "base", "prompt": [1], "max_tokens": 2}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 500 and "device lost" in r.text
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 503 and "failed earlier" in r.text
  finally:
    srv.close()
