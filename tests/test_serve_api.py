"""serve-lite's OpenAI extras through the official client: structured output, logprobs, logit_bias, n, refused
fields and CORS (tiny random checkpoints; the embedded SmolLM2 where the output must make sense)."""

import http.client, json, math, re
from concurrent.futures import ThreadPoolExecutor
import jsonschema
import numpy as np
import pytest
from tinyvllm_core import LLM, LLMEngine, SamplingParams
from test_serve import MODEL, Running, assert_error, tiny_factory
from test_structured import PERSON, TOPICS

PROMPT = "What is 3 plus 9?"  # 13-15 tokens, as test_serve's prompts: no new prefill shapes
LONG_PROMPT = "Once upon a time there was a little girl who lived in a village near the forest, said the computer."


@pytest.fixture(scope="module")
def srv(checkpoints):
  s = Running(tiny_factory(checkpoints["llama"][0]), allowed_origins=["http://ui.example"])
  assert s.state.wait_ready(60), s.state.load_error
  yield s
  s.stop()


@pytest.fixture(scope="module")
def client(srv):
  return srv.client()


@pytest.fixture(scope="module")
def smol(smollm2_path):
  s = Running(lambda: LLMEngine(smollm2_path, device="CPU", kv_cache_gb=0.25, max_num_seqs=16), model_name="smollm2")
  assert s.state.wait_ready(120), s.state.load_error
  yield s
  s.stop()


def raw(srv, method, path, body=None, headers=None) -> tuple[int, dict, bytes]:
  """One request; its status, headers and body."""
  conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
  try:
    conn.request(method, path, None if body is None else json.dumps(body), headers or {})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()
  finally:
    conn.close()


# ---- structured output -------------------------------------------------------------------------


def test_json_schema_output_validates_for_ten_prompts(smol):
  """Nested objects, enums, arrays: every reply parses and validates, asked for at once (a batch of 10)."""
  client = smol.client()
  response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

  def ask(topic):
    messages = [{"role": "user", "content": f"Describe {topic} as JSON."}]
    return client.chat.completions.create(
      model="smollm2", messages=messages, temperature=0, max_tokens=150, response_format=response_format
    )

  with ThreadPoolExecutor(10) as pool:
    replies = list(pool.map(ask, TOPICS))
  for reply in replies:
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
  assert len({r.choices[0].message.content for r in replies}) > 5
  smol.wait_idle()


def test_json_object_and_guided_fields_streamed_and_cut(smol):
  client = smol.client()
  messages = [{"role": "user", "content": "Reply with a JSON object with the keys city and country for Paris."}]
  chunks = client.chat.completions.create(
    model="smollm2",
    messages=messages,
    temperature=0,
    max_tokens=60,
    response_format={"type": "json_object"},
    stream=True,
  )
  parts = list(chunks)
  text = "".join(c.choices[0].delta.content or "" for c in parts)
  assert parts[-1].choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict), text
  regex = client.completions.create(
    model="smollm2", prompt="The year is", max_tokens=10, temperature=0, extra_body={"guided_regex": "[0-9]{4}!"}
  )
  assert regex.choices[0].text[:4].isdigit() and regex.choices[0].text.endswith("!")
  lark = 'start: "yes" | "no"'
  reply = client.completions.create(
    model="smollm2", prompt="Is Paris in France?", max_tokens=5, extra_body={"guided_grammar": lark}
  )
  assert reply.choices[0].text in ("yes", "no") and reply.choices[0].finish_reason == "stop"
  cut = client.chat.completions.create(
    model="smollm2", messages=messages, max_tokens=4, response_format={"type": "json_object"}, temperature=0
  )
  assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")


# ---- logprobs, logit_bias -------------------------------------------------------------------------


def direct_run(checkpoints, prompt_ids, **params) -> object:
  llm = LLM(checkpoints["llama"][0], device="CPU", num_blocks=64, block_size=16)
  return llm.generate([prompt_ids], SamplingParams(temperature=0, ignore_eos=True, **params))[0]


def test_completion_logprobs_agree_with_the_engine(client, srv, checkpoints):
  reply = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=5)
  ids = srv.state.engine.encode(PROMPT)
  want = direct_run(checkpoints, ids, max_tokens=6, logprobs=5)
  lp, tokens = reply.choices[0].logprobs, srv.state.token_text
  assert lp.tokens == [tokens.text(e.token_id) for e in want.logprobs]
  np.testing.assert_allclose(lp.token_logprobs, [e.logprob for e in want.logprobs], atol=1e-4)
  for got, entry in zip(lp.top_logprobs, want.logprobs):
    expected = {tokens.text(token_id): value for token_id, value in entry.top}  # keyed by text, as OpenAI's are
    assert got.keys() == expected.keys() and len(entry.top) == 5
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-4)
  assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(6)]
  assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].logprobs is None
  chunks = list(
    client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2, stream=True)
  )
  streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
  np.testing.assert_allclose(streamed, lp.token_logprobs, atol=1e-4)
  offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
  assert offsets == lp.text_offset


def test_chat_logprobs_agree_with_the_engine(client, srv, checkpoints):
  messages = [{"role": "user", "content": "Hi"}]
  reply = client.chat.completions.create(
    model=MODEL, messages=messages, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
  )
  ids = srv.state.engine.apply_chat_template(messages, add_generation_prompt=True)
  want = direct_run(checkpoints, ids, max_tokens=5, logprobs=3)
  content = reply.choices[0].logprobs.content
  assert [c.token for c in content] == [srv.state.token_text.text(e.token_id) for e in want.logprobs]
  for got, entry in zip(content, want.logprobs):
    assert (
      math.isclose(got.logprob, entry.logprob, abs_tol=1e-4) and bytes(got.bytes).decode(errors="replace") == got.token
    )
    assert [t.token for t in got.top_logprobs] == [srv.state.token_text.text(t) for t, _ in entry.top]
    np.testing.assert_allclose([t.logprob for t in got.top_logprobs], [v for _, v in entry.top], atol=1e-4)
  plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
  assert plain.choices[0].logprobs is None
  chunks = client.chat.completions.create(
    model=MODEL, messages=messages, temperature=0, max_tokens=5, logprobs=True, stream=True
  )
  streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
  assert [t.token for t in streamed] == [c.token for c in content] and all(t.top_logprobs == [] for t in streamed)


def test_logit_bias_moves_the_greedy_choice(client, srv, checkpoints):
  """-100 on the greedy token makes the runner-up win; +100 on a token makes it win every step."""
  engine = srv.state.engine
  first = direct_run(checkpoints, engine.encode(PROMPT), max_tokens=1, logprobs=2)
  best, runner_up = first.token_ids[0], first.logprobs[0].top[1][0]
  banned = client.completions.create(
    model=MODEL, prompt=PROMPT, temperature=0, max_tokens=1, logprobs=0, logit_bias={str(best): -100}
  )
  assert banned.choices[0].logprobs.tokens == [srv.state.token_text.text(runner_up)] and runner_up != best
  forced = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=2, logit_bias={"42": 100})
  assert forced.choices[0].text == srv.state.engine.decode([42, 42])


# ---- n ------------------------------------------------------------------------------------------


def test_n_choices_share_the_prompt(client, srv):
  """n=3: three choices with seeds seed, seed+1, seed+2; the prompt's full blocks computed once (the other two
  choices find them in the prefix cache); usage counts the prompt once."""
  sampled = dict(model=MODEL, temperature=1.0, max_tokens=6, extra_body={"ignore_eos": True, "top_k": 0})
  before = srv.metrics()["prefix_cache_hit_tokens_total"]
  reply = client.completions.create(prompt=LONG_PROMPT, n=3, seed=11, **sampled)
  hits = srv.metrics()["prefix_cache_hit_tokens_total"] - before
  prompt_len = reply.usage.prompt_tokens
  assert prompt_len == len(srv.state.engine.encode(LONG_PROMPT)) and prompt_len >= 32 and prompt_len % 16
  assert hits == 2 * (prompt_len // 16 * 16)  # each later choice: every full block of the prompt
  assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens == 18
  alone = [client.completions.create(prompt=LONG_PROMPT, seed=11 + i, **sampled).choices[0].text for i in range(3)]
  assert [c.text for c in reply.choices] == alone and len(set(alone)) > 1
  chunks = list(
    client.completions.create(
      prompt=LONG_PROMPT, n=3, seed=11, stream=True, stream_options={"include_usage": True}, **sampled
    )
  )
  texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
  assert texts == alone and chunks[-1].usage.completion_tokens == 18
  chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], n=2, **sampled)
  assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 12
  srv.wait_idle()


# ---- refused fields -----------------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]
FUNCTION = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
REFUSED = [
  ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
  ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
  ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
  ("/v1/chat/completions", {"messages": HI, "functions": [{"name": "f"}]}, "functions"),
  ("/v1/chat/completions", {"messages": HI, "function_call": "auto"}, "function_call"),
  ("/v1/chat/completions", {"messages": HI, "audio": {"voice": "x"}}, "audio"),
  ("/v1/chat/completions", {"messages": HI, "prediction": {"type": "content"}}, "prediction"),
  ("/v1/chat/completions", {"messages": HI, "frobnicate": 1}, "frobnicate"),
  ("/v1/completions", {"prompt": "hi", "top_logprobs": 2}, "top_logprobs"),
  ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "xml"}}, "response_format"),
  ("/v1/chat/completions", {"messages": HI, "response_format": "json"}, "response_format"),
  (
    "/v1/chat/completions",
    {"messages": HI, "response_format": {"type": "json_schema"}},
    "response_format.json_schema.schema",
  ),
  ("/v1/completions", {"prompt": "hi", "guided_json": "{not json"}, "guided_json"),
  ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "nope"}}, "guided_json"),
  ("/v1/completions", {"prompt": "hi", "guided_regex": "[a-"}, "guided_regex"),
  ("/v1/completions", {"prompt": "hi", "guided_grammar": "start: ( x"}, "guided_grammar"),
  ("/v1/completions", {"prompt": "hi", "guided_regex": "a", "guided_json": {"type": "object"}}, "guided_regex"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": "1"}}, "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": [1]}, "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
  ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
  ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
  ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs"),
  ("/v1/chat/completions", {"messages": HI, "logprobs": 3}, "logprobs"),
  ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
  ("/v1/chat/completions", {"messages": [{"role": "system", "content": None}, *HI]}, "messages[0].content"),
  ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
  ("/v1/chat/completions", {"messages": [*HI, {"role": "assistant", "tool_calls": [1]}]}, "messages[1].tool_calls[0]"),
  ("/v1/chat/completions", {"messages": HI, "tools": [FUNCTION]}, "tools"),  # the template takes no tools
  ("/v1/chat/completions", {"messages": HI, "tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("path,body,param", REFUSED, ids=[f"{i}-{r[2]}" for i, r in enumerate(REFUSED)])
def test_refused_field_is_a_400_naming_it(srv, path, body, param):
  assert_error(srv.request("POST", path, {"model": MODEL, **body}), 400, param)


def test_fields_at_their_inert_value_are_accepted(srv):
  inert = {"echo": False, "best_of": 1, "n": 1, "suffix": None, "logprobs": None, "user": "me", "store": False}
  status, body = srv.request("POST", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **inert})
  assert status == 200 and body["choices"][0]["logprobs"] is None, body
  chat = {"messages": [{"role": "developer", "content": "Be brief."}, *HI], "response_format": {"type": "text"}}
  status, body = srv.request(
    "POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "logprobs": False, **chat}
  )
  assert status == 200 and "logprobs" not in body["choices"][0]["message"], body


# ---- CORS ---------------------------------------------------------------------------------------


def test_cors_preflight_and_origin(srv, checkpoints):
  asked = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
  status, headers, body = raw(
    srv,
    "OPTIONS",
    "/v1/chat/completions",
    headers=asked | {"Access-Control-Request-Headers": "authorization,content-type"},
  )
  assert status == 204 and body == b""
  assert (
    headers["Access-Control-Allow-Origin"] == "http://ui.example" and "POST" in headers["Access-Control-Allow-Methods"]
  )
  assert headers["Access-Control-Allow-Headers"] == "authorization,content-type"
  status, headers, _ = raw(srv, "OPTIONS", "/v1/chat/completions", headers=asked | {"Origin": "http://evil.example"})
  assert status == 403 and "Access-Control-Allow-Origin" not in headers
  assert raw(srv, "OPTIONS", "/nope", headers=asked)[0] == 404
  body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
  status, headers, _ = raw(srv, "POST", "/v1/completions", body, {"Origin": "http://ui.example"})
  assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://ui.example"
  status, headers, _ = raw(srv, "POST", "/v1/completions", body | {"stream": True}, {"Origin": "http://ui.example"})
  assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://ui.example"
  assert "Access-Control-Allow-Origin" not in raw(srv, "GET", "/health", headers={"Origin": "http://evil.example"})[1]
  open_srv = Running(tiny_factory(checkpoints["llama"][0]), allowed_origins=["*"], api_key="k")
  try:
    status, headers, _ = raw(open_srv, "OPTIONS", "/v1/models", headers=asked)  # no key needed for a preflight
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert (
      raw(open_srv, "GET", "/health", headers={"Origin": "http://any.example"})[1]["Access-Control-Allow-Origin"] == "*"
    )
  finally:
    open_srv.stop()


def test_access_log_line_per_request(checkpoints, capfd):
  """One stderr line per request when asked; no CORS header without --allowed-origins."""
  s = Running(tiny_factory(checkpoints["llama"][0]), access_log=True)
  try:
    assert s.state.wait_ready(60)
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
    status, headers, _ = raw(s, "POST", "/v1/completions", body, {"Origin": "http://ui.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    s.request("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True})
  finally:
    s.stop()
  lines = capfd.readouterr().err.splitlines()
  assert any(re.fullmatch(r"POST /v1/completions 200 prompt=3 completion=2 \d+\.\d{3}s", line) for line in lines), lines
  assert any(line.startswith("POST /v1/completions 400 prompt=- completion=- ") for line in lines), lines
