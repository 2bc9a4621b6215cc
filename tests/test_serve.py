"""`tinyvllm serve-lite`: the OpenAI-compatible server, driven by the official openai client and raw HTTP."""

import functools, http.client, json, os, re, signal, socket, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest
from model_factory import CHAT_TEMPLATE
from openai import OpenAI, AuthenticationError
from tinyvllm_core import ConfigError, LLMEngine
from tinyvllm_cli.bench import bench_serve
from tinyvllm_cli.serve import make_server

MODEL = "tiny"
ERROR_KEYS = {"message", "type", "param", "code"}


class Running:
  """A server on a free port of 127.0.0.1, serving from a thread."""

  def __init__(self, factory, **kw):
    self.server, self.state = make_server(factory, "127.0.0.1", 0, model_name=kw.pop("model_name", MODEL), **kw)
    self.port = self.server.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def client(self, api_key="unused") -> OpenAI:
    return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

  def request(self, method, path, body=None, headers=None) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
    try:
      data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
      conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
      resp = conn.getresponse()
      text = resp.read().decode()
      try:
        return resp.status, json.loads(text)
      except ValueError:
        return resp.status, text
    finally:
      conn.close()

  def metrics(self) -> dict[str, float]:
    status, text = self.request("GET", "/metrics")
    assert status == 200
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^tinyvllm:(\S+?)(?:\{[^}]*\})? (\S+)$", text, re.M)}

  def wait_idle(self, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      s = self.state.loop.stats()
      if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]:
        return s
      time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle: {self.state.loop.stats()}")

  def stop(self):
    self.server.shutdown()
    self.server.server_close()
    self.state.close()


def tiny_factory(path, **kw):
  return lambda: LLMEngine(path, device="CPU", num_blocks=512, block_size=16, max_num_seqs=16, **kw)


# the test checkpoints' template, with a system block and <tool_call> calls when tools are given (as Qwen2.5's)
TOOLS_TEMPLATE = (
  "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n"
  'Call a function as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}' + CHAT_TEMPLATE
)


def with_template(checkpoint: Path, template: str, folder: Path) -> Path:
  """A copy of a tiny checkpoint with another chat template."""
  for file in checkpoint.iterdir():
    (folder / file.name).write_bytes(file.read_bytes())
  config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
  return folder


@pytest.fixture(scope="module")
def srv(checkpoints, tmp_path_factory):
  path = with_template(checkpoints["llama"][0], TOOLS_TEMPLATE, tmp_path_factory.mktemp("llama-tools"))
  s = Running(tiny_factory(path), max_body_bytes=64 << 10, timeout_s=3.0)
  assert s.state.wait_ready(60), s.state.load_error
  yield s
  s.stop()


@pytest.fixture(scope="module")
def client(srv):
  return srv.client()


# Every JIT-captured batch shape costs the engine seconds on this CPU: prompts of 13-15 tokens (no full 16-token
# block, so no prefix-cache hit changes the prefill size) and at most 16 new tokens keep the shapes few.
GREEDY = dict(model=MODEL, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
PROMPTS = [f"What is {i} plus {i * 3}?" for i in range(16)]


def assert_error(status_body, status, param=None):
  got, body = status_body
  assert got == status, body
  assert set(body["error"]) == ERROR_KEYS and body["error"]["message"], body
  if param:
    assert body["error"]["param"] == param, body


# ---- endpoints ---------------------------------------------------------------------------------


def test_health_models_and_metrics(srv):
  assert srv.request("GET", "/health") == (200, {"status": "ok"})
  status, models = srv.request("GET", "/v1/models")
  assert status == 200 and [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 1024
  assert srv.request("GET", f"/v1/models/{MODEL}")[1]["id"] == MODEL
  status, text = srv.request("GET", "/metrics")
  assert status == 200
  for name in (
    "num_requests_running",
    "num_requests_waiting",
    "kv_cache_usage_perc",
    "prompt_tokens_total",
    "generation_tokens_total",
    "prefix_cache_hit_rate",
    "time_to_first_token_seconds_bucket",
    "inter_token_latency_seconds_bucket",
    "e2e_request_latency_seconds_count",
  ):
    assert f"tinyvllm:{name}{{" in text
  sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*\{(?:[a-z_]+="[^"]*",?)*\} -?[0-9.e+-]+$')
  assert all(line.startswith("# ") or sample.match(line) for line in text.strip().splitlines())


def test_completion_streaming_equals_non_streaming(client):
  full = client.completions.create(prompt=PROMPTS[0], **GREEDY)
  assert full.choices[0].finish_reason == "length" and full.object == "text_completion"
  assert full.usage.completion_tokens == 8 and full.usage.total_tokens == full.usage.prompt_tokens + 8
  chunks = list(
    client.completions.create(prompt=PROMPTS[0], stream=True, stream_options={"include_usage": True}, **GREEDY)
  )
  assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
  assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_equals_non_streaming(client):
  messages = [{"role": "user", "content": "Hello there"}]
  full = client.chat.completions.create(messages=messages, **GREEDY)
  assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
  assert full.usage.completion_tokens == 8
  chunks = list(client.chat.completions.create(messages=messages, stream=True, **GREEDY))
  assert chunks[0].choices[0].delta.role == "assistant" and all(c.usage is None for c in chunks)
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
  again = client.chat.completions.create(messages=messages, **GREEDY)
  assert again.usage.prompt_tokens_details.cached_tokens > 0  # the prompt's full blocks come from the prefix cache
  assert again.choices[0].message.content == full.choices[0].message.content


def test_stop_string_ends_the_text(client):
  text = client.completions.create(prompt=PROMPTS[1], **{**GREEDY, "max_tokens": 16}).choices[0].text
  stop = next(text[i : i + 2] for i in range(3, len(text) - 1) if text[i : i + 2].strip())
  want = text[: text.find(stop)]
  got = client.completions.create(prompt=PROMPTS[1], stop=[stop], **{**GREEDY, "max_tokens": 16})
  assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
  chunks = list(client.completions.create(prompt=PROMPTS[1], stop=stop, stream=True, **{**GREEDY, "max_tokens": 16}))
  assert "".join(c.choices[0].text for c in chunks) == want


def test_penalties_reach_the_sampler(client, checkpoints):
  """OpenAI's presence / frequency penalties and vLLM's repetition_penalty give what the engine gives alone."""
  from tinyvllm_core import LLM, SamplingParams

  penalties = dict(presence_penalty=1.5, frequency_penalty=1.0)
  extra = {"ignore_eos": True, "repetition_penalty": 1.8}
  reply = client.completions.create(
    model=MODEL, prompt=PROMPTS[1], temperature=0, max_tokens=8, **penalties, extra_body=extra
  )
  llm = LLM(checkpoints["llama"][0], device="CPU", num_blocks=64, block_size=16)
  params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.8, **penalties)
  assert reply.choices[0].text == llm.generate(PROMPTS[1], params)[0].text


def test_seed_makes_sampling_reproducible(client):
  def sample(seed):
    return (
      client.completions.create(
        model=MODEL,
        prompt=PROMPTS[2],
        temperature=1.0,
        seed=seed,
        max_tokens=12,
        extra_body={"ignore_eos": True, "top_k": 0, "top_p": 1.0},
      )
      .choices[0]
      .text
    )

  first = sample(7)
  assert sample(7) == first and sample(8) != first


def test_sixteen_concurrent_streams_get_their_own_answers(client):
  alone = [client.completions.create(prompt=p, **GREEDY).choices[0].text for p in PROMPTS]

  def stream(p):
    return "".join(c.choices[0].text for c in client.completions.create(prompt=p, stream=True, **GREEDY))

  with ThreadPoolExecutor(16) as pool:
    together = list(pool.map(stream, PROMPTS))
  assert together == alone and len(set(alone)) > 1


def test_disconnect_mid_stream_aborts_and_frees_blocks(srv):
  before = srv.metrics()
  body = json.dumps(
    {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
  )
  sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
  sock.sendall(
    "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
  )
  seen = b""
  while seen.count(b"data: ") < 3:
    seen += sock.recv(4096)
  sock.close()
  srv.wait_idle()
  after = srv.metrics()
  assert after["generation_tokens_total"] - before["generation_tokens_total"] < 900
  assert after.get("request_finished_total", 0) >= 1 and "abort" in srv.request("GET", "/metrics")[1]


# ---- bad input ---------------------------------------------------------------------------------

BAD = [
  ("/v1/completions", b"{not json", 400, None),
  ("/v1/completions", b"[1, 2]", 400, None),
  ("/v1/completions", b"[" * 50000, 400, None),
  ("/v1/completions", {"model": MODEL}, 400, "prompt"),
  ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
  ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
  ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
  ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
  (
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": 3},
    400,
    "chat_template_kwargs",
  ),
  ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
  ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, None),
  ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, None),
  ("/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
  ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
  ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
  ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
  (
    "/v1/chat/completions",
    {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000},
    400,
    "max_completion_tokens",
  ),
  ("/v1/completions", {"prompt": [5] * 1100}, 400, "prompt"),
  ("/v1/completions", {"prompt": [99999]}, 400, "prompt"),
  ("/v1/completions", {"prompt": ""}, 400, "prompt"),
  ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
  ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
  ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": "x"}, 400, "stream_options"),
  ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop"),
  ("/v1/completions", {"prompt": "hi", "stop": ""}, 400, "stop"),
  ("/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
  ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
  ("/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n"),
  ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, None),
  ("/v1/completions", {"prompt": "hi", "frequency_penalty": "x"}, 400, "frequency_penalty"),
  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}, 400, None),
  ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_an_openai_error(srv, path, body, status, param):
  assert_error(srv.request("POST", path, body), status, param)


def test_bad_routes_sizes_and_framing(srv):
  assert_error(srv.request("GET", "/nope"), 404)
  assert_error(srv.request("GET", "/v1/completions"), 405)
  assert_error(srv.request("DELETE", "/v1/models"), 405)
  assert_error(srv.request("GET", "/v1/models/gpt-4"), 404, "model")
  assert_error(srv.request("POST", "/v1/completions", {"prompt": "x" * (80 << 10)}), 413)
  with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:  # a huge declared body is refused unread
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 413")
  with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 411")
  with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
    sock.sendall(b"GARBAGE\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 400")
  assert srv.request("GET", "/health")[0] == 200
  assert srv.client().completions.create(prompt=PROMPTS[5], **GREEDY).usage.completion_tokens == 8


def test_stalled_client_times_out_without_blocking_others(srv):
  with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as stalled:
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    start = time.monotonic()
    assert srv.request("GET", "/health")[0] == 200 and time.monotonic() - start < 2
    assert stalled.recv(4096) == b""  # closed by the server's 3 s socket timeout
    assert 2.5 < time.monotonic() - start < 15


# ---- security, loading, load -------------------------------------------------------------------


def test_api_key_is_required_everywhere_but_health(checkpoints):
  s = Running(tiny_factory(checkpoints["llama"][0]), api_key="s3cret")
  try:
    assert s.state.wait_ready(60)
    assert s.request("GET", "/health")[0] == 200
    for method, path in (
      ("GET", "/v1/models"),
      ("GET", "/metrics"),
      ("POST", "/v1/completions"),
      ("POST", "/v1/chat/completions"),
    ):
      assert_error(s.request(method, path, {"prompt": "hi"}), 401)
      assert_error(s.request(method, path, {"prompt": "hi"}, {"Authorization": "Bearer wrong"}), 401)
    assert s.request("GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
    with pytest.raises(AuthenticationError):
      s.client("wrong").models.list()
    assert [m.id for m in s.client("s3cret").models.list()] == [MODEL]
  finally:
    s.stop()


def test_health_is_503_while_loading_and_after_a_failed_load(checkpoints):
  go = threading.Event()

  def slow():
    assert go.wait(60)
    return tiny_factory(checkpoints["llama"][0])()

  s = Running(slow)
  try:
    assert s.request("GET", "/health") == (503, {"status": "loading"})
    assert_error(s.request("GET", "/v1/models"), 503)
    assert_error(s.request("POST", "/v1/completions", {"prompt": "hi"}), 503)
    go.set()
    assert s.state.wait_ready(60) and s.request("GET", "/health") == (200, {"status": "ok"})
  finally:
    s.stop()

  def broken():
    raise ConfigError("model.safetensors: tensor 'embed' is missing")

  s = Running(broken)
  try:
    assert not s.state.wait_ready(10)
    status, body = s.request("GET", "/health")
    assert status == 503 and body["status"] == "error" and "embed" in body["error"]
  finally:
    s.stop()


def test_warm_up_runs_after_health_and_yields_to_a_request(srv, checkpoints, monkeypatch):
  """/health answers 200 before any batch shape is captured; a request that comes while a warm-up step runs pauses
  the warm-up (its queued round is aborted), runs alone after that step and answers what a server without warm-up
  answers; once the server is idle the warm-up resumes and completes."""
  import tinyvllm_cli.serve

  monkeypatch.setattr(tinyvllm_cli.serve, "RESUME_AFTER_IDLE_S", 0.2)
  gate, in_engine = threading.Event(), []

  def gated():  # the engine's first step (the warm-up's) waits until the request is queued
    engine = LLMEngine(checkpoints["llama"][0], device="CPU", num_blocks=512, block_size=16, max_num_seqs=2)
    step = engine.step

    def gated_step():
      assert gate.wait(60), "the warm-up was never paused"
      in_engine.append(len(engine.scheduler.running) + len(engine.scheduler.waiting))
      return step()

    engine.step = gated_step
    return engine

  body = {"model": MODEL, "prompt": list(range(3, 40)), "max_tokens": 8, "temperature": 0, "ignore_eos": True}
  expected = srv.request("POST", "/v1/completions", body)[1]["choices"][0]["text"]
  s = Running(gated, warmup=True)
  try:
    assert s.state.wait_ready(60)
    warmup = s.state.warmup
    progress = {"done": 0, "rounds": len(warmup.rounds)}
    assert s.request("GET", "/health") == (200, {"status": "ok", "warmup": progress})  # its progress, still 200
    while not warmup.pending:  # its first round is queued, and that step waits at the gate
      time.sleep(0.01)
    with ThreadPoolExecutor(1) as pool:
      reply = pool.submit(s.request, "POST", "/v1/completions", body)
      while not warmup.paused:
        time.sleep(0.01)
      assert warmup.done == 0
      gate.set()
      status, answer = reply.result(120)
    assert status == 200 and answer["choices"][0]["text"] == expected
    assert in_engine[0] == 1 and set(in_engine[1:9]) == {1}  # the warm-up's step in flight, then the request alone
    deadline = time.monotonic() + 300
    while not warmup.finished and time.monotonic() < deadline:
      time.sleep(0.1)
    assert warmup.finished and warmup.elapsed_s is not None and len(s.state.engine.captured_shapes()) > 10
    assert s.request("GET", "/health") == (200, {"status": "ok", "warmup": progress | {"done": len(warmup.rounds)}})
    s.wait_idle()
  finally:
    s.stop()


class FakeWarmUp:
  """Records what the server asks of its warm-up."""

  finished = False
  done = 1
  rounds = [(1, 8, "greedy")] * 3

  def __init__(self):
    self.calls = []

  def pause(self):
    self.calls.append("pause")

  def resume(self):
    self.calls.append("resume")

  def stop(self):
    self.calls.append("stop")


class IdleEngine:
  def stats(self):
    return {}

  def has_unfinished_requests(self):
    return False


def test_the_warm_up_resumes_only_after_an_idle_moment(monkeypatch):
  """Requests one after another keep the warm-up paused; it resumes RESUME_AFTER_IDLE_S after the last one ends,
  and stops with the server."""
  import tinyvllm_cli.serve

  warmup = FakeWarmUp()
  monkeypatch.setattr(tinyvllm_cli.serve, "RESUME_AFTER_IDLE_S", 0.3)
  monkeypatch.setattr(tinyvllm_cli.serve, "_background_warm_up", lambda loop: warmup)
  s = Running(IdleEngine, warmup=True)
  try:
    assert s.state.wait_ready(10) and s.state.warmup is warmup
    assert s.request("GET", "/health") == (200, {"status": "ok", "warmup": {"done": 1, "rounds": 3}})
    for rid in ("a", "b", "c"):
      s.state.track([rid], True)
      s.state.track([rid], False)
    time.sleep(0.1)
    assert warmup.calls == ["pause"] * 3
    time.sleep(0.5)
    assert warmup.calls == ["pause"] * 3 + ["resume"]
  finally:
    s.stop()
  assert warmup.calls[-1] == "stop"


WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
MIXED = [  # beside the plain streams: constrained and tool-calling requests, streamed and not
  dict(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}),
  dict(response_format={"type": "json_object"}, stream=True),
  dict(extra_body={"guided_regex": "[a-z]{2,10}"}),
  dict(tools=[TOOL], tool_choice="required"),
  dict(tools=[TOOL], tool_choice="required", stream=True),
  dict(tools=[TOOL], logprobs=True, top_logprobs=2, n=2),
]


def test_bounded_load_run_has_no_failures_and_frees_every_block(srv, tmp_path, capsys):
  """200 requests, 32 at a time: 140 plain streams from bench serve and, at the same time, 60 constrained and
  tool-calling ones; none fails and every KV block is free at the end."""
  (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
  load = dict(concurrency="24", num_prompts=140, max_tokens=4, warmup=False, json_output=True)
  with ThreadPoolExecutor(1) as bench, ThreadPoolExecutor(8) as pool:
    plain = bench.submit(bench_serve, srv.url, dataset=tmp_path / "prompts.txt", output_dir=tmp_path / "out", **load)
    mixed = list(pool.map(mixed_request, [srv.client()] * 60, range(60)))
    report = plain.result()
  assert all(reason in ("stop", "length", "tool_calls") for reasons in mixed for reason in reasons), mixed
  level = report["levels"][0]
  assert (level["completed"], level["failed"]) == (140, 0) and level["total_output_tokens"] == 560
  assert level["output_throughput"] > 0 and level["median_ttft_ms"] > 0 and level["median_itl_ms"] > 0
  assert json.loads(capsys.readouterr().out)["levels"][0]["completed"] == 140
  assert {p.suffix for p in (tmp_path / "out").glob("serve-*")} == {".json", ".md"}
  assert "| successful | 140 |" in next((tmp_path / "out").glob("serve-*.md")).read_text()
  srv.wait_idle()


def test_bench_serve_json_schema_constrains_every_request(srv, tmp_path):
  (tmp_path / "schema.json").write_text(json.dumps(WEATHER))
  report = bench_serve(
    srv.url,
    concurrency="2",
    num_prompts=4,
    max_tokens=4,
    warmup=False,
    endpoint="chat",
    json_schema=tmp_path / "schema.json",
    output_dir=tmp_path,
  )
  assert report["levels"][0]["completed"] == 4 and report["config"]["json_schema"] == WEATHER
  assert "output constrained to the JSON schema" in next(tmp_path.glob("serve-*.md")).read_text()


def mixed_request(client: OpenAI, i: int) -> list[str]:
  """One of the MIXED requests (a 200 or an exception); its choices' finish reasons."""
  kwargs = MIXED[i % len(MIXED)] | {"model": MODEL, "max_tokens": 6, "temperature": 0}
  reply = client.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[i % 16]}], **kwargs)
  if not kwargs.get("stream"):
    return [choice.finish_reason for choice in reply.choices]
  return [choice.finish_reason for chunk in reply for choice in chunk.choices if choice.finish_reason]


# ---- the command and the real model ------------------------------------------------------------


def test_cli_serves_until_ctrl_c(checkpoints):
  cmd = [
    sys.executable,
    "-m",
    "tinyvllm_cli",
    "serve-lite",
    "--model",
    str(checkpoints["llama"][0]),
    "--port",
    "0",
    "--device",
    "CPU",
    "--served-model-name",
    MODEL,
  ]
  proc = subprocess.Popen(
    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"}
  )
  try:
    lines = [proc.stdout.readline() for _ in range(4)]  # ready once loaded; the warm-up goes on in the background
    assert lines[1].startswith("ready: tiny") and lines[3].startswith("warming up in the background"), lines
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", lines[0]).group(1))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # the request may wait for captures
    conn.request("GET", "/health")
    health = conn.getresponse()
    assert health.status == 200 and health.read()
    conn.request(
      "POST",
      "/v1/completions",
      json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3}),
      {"Content-Type": "application/json"},
    )
    assert json.loads(conn.getresponse().read())["usage"]["completion_tokens"] == 3
    proc.send_signal(signal.SIGINT)
    out, errors = proc.communicate(timeout=30)
  finally:
    proc.kill()
  stopped = out.strip().splitlines()[-1]
  assert proc.returncode == 0 and stopped == "serve-lite stopped (1 requests served)", (out, errors)
  log = errors.splitlines()  # one access log line per request
  assert len(log) == 2 and re.fullmatch(r"GET /health 200 prompt=- completion=- \d+\.\d{3}s", log[0]), errors
  assert re.fullmatch(r"POST /v1/completions 200 prompt=3 completion=3 \d+\.\d{3}s", log[1]), errors
  bad = subprocess.run([*cmd[:4], "--model", "/no/such/model"], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 1 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_cli_dtype_and_drafts_reach_the_engine_and_a_bad_dtype_is_one_line(checkpoints, monkeypatch):
  from typer.testing import CliRunner
  import tinyvllm_core
  from tinyvllm_cli.main import app

  seen = {}

  def fake_engine(path, **kwargs):
    seen.update(kwargs)
    raise ConfigError("stopped by the test")

  monkeypatch.setattr(tinyvllm_core, "LLMEngine", fake_engine)
  r = CliRunner().invoke(
    app,
    [
      *("serve-lite", "--model", str(checkpoints["llama"][0]), "--port", "0", "--device", "CPU"),
      *("--dtype", "float16", "--num-speculative-tokens", "3"),
    ],
    env={"COLUMNS": "200", "NO_COLOR": "1"},
  )
  assert r.exit_code == 1 and "could not load" in r.stderr and "stopped by the test" in r.stderr, r.output
  assert seen["dtype"] == "float16" and seen["device"] == "CPU" and seen["num_speculative_tokens"] == 3
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "tinyvllm_cli",
      "serve-lite",
      "--model",
      str(checkpoints["llama"][0]),
      "--port",
      "0",
      "--dtype",
      "half",
    ],
    capture_output=True,
    text=True,
    timeout=60,
    env={**os.environ, "COLUMNS": "200"},
  )
  assert bad.returncode == 1 and bad.stdout == "", bad.stderr  # refused before the port is bound or the model loads
  assert bad.stderr.strip() == "error: --dtype 'half': choose auto, float32, float16 or bfloat16"


REPEAT = "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the old river bank."


def test_real_smollm2_through_the_server_with_and_without_drafts(smollm2_path):
  """Paris; and a server with --num-speculative-tokens 4 answers the same greedy text, drafts accepted (a reply that
  repeats its prompt)."""
  answers, metrics = {}, {}
  for k in (0, 4):
    kwargs = dict(device="CPU", kv_cache_gb=0.25, max_num_seqs=4, num_speculative_tokens=k)
    s = Running(functools.partial(LLMEngine, smollm2_path, **kwargs), model_name="smollm2")
    try:
      assert s.state.wait_ready(120), s.state.load_error
      answers[k] = [smollm2_reply(s.client(), question) for question in ("What is the capital of France?", REPEAT)]
      metrics[k] = s.metrics()
    finally:
      s.stop()
  assert "Paris" in answers[0][0] and answers[4] == answers[0], answers
  assert metrics[0]["spec_decode_num_draft_tokens_total"] == 0 < metrics[4]["spec_decode_num_accepted_tokens_total"]


def smollm2_reply(client: OpenAI, question: str) -> str:
  messages = [{"role": "user", "content": question}]
  reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24)
  assert reply.choices[0].finish_reason in ("stop", "length")
  return reply.choices[0].message.content


def test_bench_serve_is_a_bench_preset_with_one_line_errors():
  from typer.testing import CliRunner
  from tinyvllm_cli.main import app

  r = CliRunner().invoke(app, ["bench", "serve", "--url", "http://127.0.0.1:9", "--timeout", "2", "-c", "1", "-n", "1"])
  assert r.exit_code == 1 and "cannot reach http://127.0.0.1:9" in r.output and "Traceback" not in r.output
  r = CliRunner().invoke(app, ["bench", "serve", "--url", "http://127.0.0.1:9", "--json-schema", "/no/such.json"])
  assert r.exit_code == 1 and "cannot read --json-schema /no/such.json" in r.output and "Traceback" not in r.output
