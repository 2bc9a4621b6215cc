"""serve-lite's tool calls and reasoning through the official client, on a tiny random Qwen3 checkpoint whose chat
template is Qwen3-style (tools, <tool_call> blocks, <think>): the grammar forces calls whose arguments validate,
streamed and not; a tool round trip reaches the template; <think> text comes back as reasoning_content."""

import json
import jsonschema
import pytest
from test_serve import Running, assert_error, tiny_factory, with_template
from test_tool_calls import PARAMETERS, QWEN3_TEMPLATE, TOOLS, WEATHER

MODEL = "tiny"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}  # a random model would think until max_tokens
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL_REGEX = r'<tool_call>\n\{"name": "get_time", "arguments": \{\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def srv(checkpoints, tmp_path_factory):
  path = with_template(checkpoints["qwen3"][0], QWEN3_TEMPLATE, tmp_path_factory.mktemp("qwen3-tools"))
  s = Running(tiny_factory(path))
  assert s.state.wait_ready(60), s.state.load_error
  yield s
  s.stop()


@pytest.fixture(scope="module")
def client(srv):
  return srv.client()


def calls_of(tool_calls) -> list[tuple[str, dict]]:
  """(name, arguments) of each call, checking the arguments validate against the function's parameters."""
  out = []
  for call in tool_calls:
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    out.append((call.function.name, arguments))
  return out


def streamed_calls(chunks) -> tuple[list[tuple[str, dict]], str]:
  """The calls a stream's tool_calls deltas carry (each whole, with its index), and its last finish_reason."""
  calls, finish = {}, None
  for c in chunks:
    for call in c.choices[0].delta.tool_calls or []:
      assert call.index not in calls
      calls[call.index] = call
    finish = c.choices[0].finish_reason or finish
  return calls_of([calls[i] for i in sorted(calls)]), finish


def end_after_a_call(srv) -> dict:
  """A +100 bias on the end of turn: "required" lets the reply write more calls, and a random model may write calls
  until max_tokens; the grammar allows the end only after a whole call, so the reply ends after its first."""
  return {str(eos): 100 for eos in srv.state.engine.eos_token_ids}


def test_required_tool_choice_gives_calls_that_validate(client, srv):
  required = dict(tool_choice="required", max_tokens=200, extra_body=NO_THINKING, logit_bias=end_after_a_call(srv))
  reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, **required)
  choice = reply.choices[0]
  assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
  calls = calls_of(choice.message.tool_calls)
  assert calls and all(name in PARAMETERS for name, _ in calls)
  chunks = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True, **required)
  got, finish = streamed_calls(chunks)
  assert finish == "tool_calls" and got and all(name in PARAMETERS for name, _ in got)


def test_named_tool_choice_calls_that_function(client):
  named = {"type": "function", "function": {"name": "get_weather"}}
  for stream in (False, True):
    reply = client.chat.completions.create(
      model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200, extra_body=NO_THINKING, stream=stream
    )
    calls, finish = streamed_calls(reply) if stream else (calls_of(reply.choices[0].message.tool_calls), "tool_calls")
    assert finish == "tool_calls" and [name for name, _ in calls] == ["get_weather"]
    assert set(WEATHER["required"]) <= set(calls[0][1])


def test_auto_parses_a_call_the_model_writes(client):
  """tool_choice auto: a <tool_call> block in the reply (forced here by a regex) comes back as a call."""
  extra = NO_THINKING | {"guided_regex": CALL_REGEX}
  reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, extra_body=extra)
  assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
  assert calls_of(reply.choices[0].message.tool_calls) == [("get_time", {})]
  chunks = list(
    client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, extra_body=extra, stream=True)
  )
  assert streamed_calls(chunks) == ([("get_time", {})], "tool_calls")
  assert not "".join(c.choices[0].delta.content or "" for c in chunks)
  off = client.chat.completions.create(
    model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=60, extra_body=extra
  )
  assert off.choices[0].finish_reason == "stop" and off.choices[0].message.tool_calls is None
  assert off.choices[0].message.content.startswith("<tool_call>")  # tool_choice none: no tools, nothing parsed


def test_a_two_turn_tool_round_trip(client, srv):
  """The call comes back; the assistant's call and the tool's result go into the next prompt as the template
  renders them."""
  first = client.chat.completions.create(
    model=MODEL,
    messages=ASK,
    tools=TOOLS,
    tool_choice="required",
    max_tokens=200,
    extra_body=NO_THINKING,
    logit_bias=end_after_a_call(srv),
  )
  call = first.choices[0].message.tool_calls[0]
  history = [
    *ASK,
    first.choices[0].message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}),
    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
  ]
  second = client.chat.completions.create(
    model=MODEL, messages=history, tools=TOOLS, max_tokens=4, extra_body=NO_THINKING
  )
  assert second.choices[0].finish_reason in ("stop", "length")
  from tinyvllm_cli.tool_calls import normalize_tool_messages

  want = srv.state.engine.apply_chat_template(
    normalize_tool_messages(history), add_generation_prompt=True, tools=TOOLS, enable_thinking=False
  )
  assert second.usage.prompt_tokens == len(want)
  prompt = srv.state.engine.decode(want)
  assert call.function.arguments in prompt and '<tool_response>\n{"temperature": 21}' in prompt


def test_tool_requests_that_are_refused(srv):
  bad = [
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
  ]
  for fields, param in bad:
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS} | fields
    assert_error(srv.request("POST", "/v1/chat/completions", body), 400, param)


# ---- reasoning ----------------------------------------------------------------------------------

THINK_REGEX = "<think>\n[a-z]{3,6}\n</think>\n\n[a-z]{3,6}"


def test_reasoning_is_split_from_the_content(client):
  """<think>...</think> (forced here by a regex) comes back as reasoning_content, streamed and not."""
  extra = {"guided_regex": THINK_REGEX}
  reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0, extra_body=extra)
  message = reply.choices[0].message
  assert reply.choices[0].finish_reason == "stop"
  assert message.reasoning_content.isalpha() and message.content.isalpha() and "<think>" not in message.content
  chunks = list(
    client.chat.completions.create(
      model=MODEL, messages=ASK, max_tokens=40, temperature=0, extra_body=extra, stream=True
    )
  )
  reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
  content = "".join(c.choices[0].delta.content or "" for c in chunks)
  assert (reasoning, content) == (message.reasoning_content, message.content)


def test_enable_thinking_reaches_the_template(client, srv):
  on = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
  off = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, extra_body=NO_THINKING)
  engine = srv.state.engine
  assert on.usage.prompt_tokens == len(engine.apply_chat_template(ASK, add_generation_prompt=True))
  closed = engine.apply_chat_template(ASK, add_generation_prompt=True, enable_thinking=False)
  assert off.usage.prompt_tokens == len(closed) > on.usage.prompt_tokens
  srv.wait_idle()
