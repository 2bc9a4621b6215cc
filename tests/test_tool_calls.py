"""Tool calls per chat template: the parser chosen from the template, replies parsed whole and streamed in any
chunking, grammars that force well-formed calls (checked token by token with SmolLM2's tokenizer), and a history
with tool calls and tool results rendered through a Qwen3-style and a Llama-3.2-style template."""

import json
import random
import re

import jsonschema
import llguidance
import numpy as np
import pytest
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from tinyvllm_cli.tool_calls import (
  HermesToolParser,
  Llama3JsonToolParser,
  ToolStreamer,
  normalize_tool_messages,
  tool_parser_for,
)
from tinyvllm_core.formats.tokenizer import render_chat

QWEN3_TEMPLATE = r"""
{%- if tools %}
  {{- '<|im_start|>system\n' }}
  {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
  {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" }}
  {{- "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
  {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
  {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within " }}
  {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' }}
  {{- '\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
  {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
  {%- elif message.role == "assistant" %}
    {%- set content = message.content %}
    {%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}
    {{- '<|im_start|>assistant\n' + content }}
    {%- for tool_call in message.tool_calls or [] %}
      {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
      {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
      {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
      {%- if tool_call.arguments is string %}{{- tool_call.arguments }}
      {%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
      {{- '}\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- elif message.role == "tool" %}
    {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
    {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
    {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""

LLAMA32_TEMPLATE = r"""
{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
  {%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- if tools is not none %}
  {%- set first_user_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}
  {{- '<|start_header_id|>user<|end_header_id|>\n\n' }}
  {{- "Given the following functions, please respond with a JSON for a function call with its proper arguments " }}
  {{- "that best answers the given prompt.\n\n" }}
  {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
  {{- "Do not use variables.\n\n" }}
  {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
  {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
  {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
  {%- elif 'tool_calls' in message %}
    {%- if not message.tool_calls | length == 1 %}
      {{- raise_exception("This model only supports single tool-calls at once!") }}
    {%- endif %}
    {%- set tool_call = message.tool_calls[0].function %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
    {{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}<|eot_id|>" }}
  {%- elif message.role == "tool" or message.role == "ipython" %}
    {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>" }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

SMOLLM2_TEMPLATE = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TOOLS = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"

WEATHER = {
  "type": "object",
  "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
  },
  "required": ["city", "unit"],
  "additionalProperties": False,
}
TOOLS = [
  {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather {in} a city", "parameters": WEATHER},
  },
  {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": {"type": "object", "properties": {}, "additionalProperties": False}}


def qwen_call(name: str, arguments: dict) -> str:
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def plain(calls: list[dict]) -> list[tuple[str, dict]]:
  """(name, arguments) of OpenAI tool calls, checking their shape."""
  for call in calls:
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
    assert isinstance(call["function"]["arguments"], str)
  return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# ---- the parser a template gets ----------------------------------------------------------------------


def test_the_parser_is_chosen_from_the_template():
  assert isinstance(tool_parser_for(QWEN3_TEMPLATE), HermesToolParser)
  assert isinstance(tool_parser_for(LLAMA32_TEMPLATE), Llama3JsonToolParser)
  assert tool_parser_for(SMOLLM2_TEMPLATE) is None  # no tools
  assert tool_parser_for(MISTRAL_TOOLS) is None  # tools, in a format not parsed here
  assert tool_parser_for(None) is None and tool_parser_for("") is None


# ---- parsing -------------------------------------------------------------------------------------


def test_hermes_calls_are_parsed_out_of_the_text():
  p = HermesToolParser()
  one = qwen_call("get_weather", {"city": "Paris", "unit": "celsius"})
  content, calls = p.parse(one)
  assert content == "" and plain(calls) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
  content, calls = p.parse(f"Let me check.\n\n{one}\n{qwen_call('get_time', {})}\n")
  assert content == "Let me check." and [n for n, _ in plain(calls)] == ["get_weather", "get_time"]
  content, calls = p.parse(f"Before {one} after")
  assert content == "Beforeafter" and len(calls) == 1
  assert len({c["id"] for c in p.parse(one + one)[1]}) == 2
  assert plain(p.parse('<tool_call>\n{"name": "get_time"}')[1]) == [("get_time", {})]  # cut before its end tag


@pytest.mark.parametrize(
  "text",
  [
    "no calls here",
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
    '<tool_call>\n["name", "f"]\n</tool_call> and text',
    '<tool_call>\n{"name": "f", "arguments": {',  # cut inside the JSON: not a call
    "<tool_call",
  ],
)
def test_hermes_text_that_only_looks_like_a_call_stays_content(text):
  assert HermesToolParser().parse(text) == (text, [])


def test_a_malformed_block_beside_a_call_stays_content():
  bad = "<tool_call>\n{oops}\n</tool_call>"
  content, calls = HermesToolParser().parse(f"A {bad} {qwen_call('get_time', {})} B")
  assert content == f"A {bad}B" and plain(calls) == [("get_time", {})]


def test_llama3_json_calls_are_parsed():
  p = Llama3JsonToolParser()
  assert plain(p.parse('{"name": "get_time", "parameters": {}}')[1]) == [("get_time", {})]
  content, calls = p.parse('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}\n')
  assert content == "" and plain(calls) == [("get_weather", {"city": "Oslo"})]
  content, calls = p.parse(' {"name": "a", "parameters": {"x": ";"}}; {"name": "b", "arguments": {}}')
  assert content == "" and plain(calls) == [("a", {"x": ";"}), ("b", {})]
  for text in ['{"name": "a"} trailing words', '{"x": 1}', '{"name": 3}', "Sure: {}", '{"name": "a", "parameters"', ""]:
    assert p.parse(text) == (text, [])


# ---- streaming -----------------------------------------------------------------------------------

HERMES_REPLIES = [
  "plain text, no calls <tool",
  "Let me look.\n\n"
  + qwen_call("get_weather", {"city": "Paris", "unit": "celsius"})
  + "\n"
  + qwen_call("get_time", {}),
  "A <tool_call>\n{oops}\n</tool_call>  " + qwen_call("get_time", {}) + "\n\n  B  \n",
  qwen_call("get_time", {}) + "\n<tool_call>\n{bad}\n</tool_call>\ntail",
  '<tool_call>\n{"name": "get_time"}',
  "<tool_call>\n{unclosed",
  "  \n ",
  "<tool_call></tool_call><tool_call>",
]
LLAMA_REPLIES = [
  '{"name": "get_time", "parameters": {}}',
  '\n<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
  "<|python_tag|> not json",
  "<|pyth",
  "A plain answer {with braces}",
  '  {"name": "a", "parameters": {}} and more',
  "",
]


def streamed(parser, text: str, rng: random.Random) -> tuple[str, list[dict]]:
  streamer, content, calls, i = ToolStreamer(parser), "", [], 0
  while i < len(text):
    n = rng.randint(1, 12)
    c, new = streamer.feed(text[i : i + n])
    content, calls, i = content + c, calls + new, i + n
  c, new = streamer.flush()
  return content + c, calls + new


@pytest.mark.parametrize(
  "parser,text",
  [(HermesToolParser(), t) for t in HERMES_REPLIES] + [(Llama3JsonToolParser(), t) for t in LLAMA_REPLIES],
)
def test_streamed_in_any_chunking_equals_the_whole(parser, text):
  content, calls = parser.parse(text)
  rng = random.Random(text)
  for _ in range(30):
    got_content, got_calls = streamed(parser, text, rng)
    assert (got_content, plain(got_calls)) == (content, plain(calls))


def test_content_streams_until_a_call_and_a_call_comes_once_whole():
  s = ToolStreamer(HermesToolParser())
  assert s.feed("Checking ") == ("Checking", [])  # trailing space held: dropped if a call follows
  assert s.feed("now <tool_") == (" now", [])
  assert s.feed('call>\n{"name": "get_time", ') == ("", [])
  content, calls = s.feed('"arguments": {}}\n</tool_call>\n')
  assert content == "" and plain(calls) == [("get_time", {})]
  assert s.flush() == ("", [])
  s = ToolStreamer(Llama3JsonToolParser())
  assert s.feed(" Hi") == (" Hi", []) and s.feed(" {") == (" {", [])


# ---- grammars --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab(smollm2_path):
  """(llguidance tokenizer, tokenizers.Tokenizer, eos id) of the embedded SmolLM2."""
  from tinyvllm_core.formats import load_model_files

  files = load_model_files(smollm2_path, "CPU")
  n_vocab = files.tokenizer.get_vocab_size()
  return (
    llguidance.LLTokenizer(files.tokenizer.to_str(), n_vocab, files.eos_token_ids),
    files.tokenizer,
    files.eos_token_ids[0],
  )


def matcher(vocab, grammar: str) -> llguidance.LLMatcher:
  m = llguidance.LLMatcher(vocab[0], grammar, log_level=0)
  assert not m.is_error(), m.get_error()
  return m


def accepts(vocab, grammar: str, text: str) -> bool:
  """Whether the grammar lets the model write text token by token and then end."""
  m = matcher(vocab, grammar)
  ok = all(m.consume_token(t) for t in vocab[1].encode(text, add_special_tokens=False).ids)
  return ok and m.is_accepting()


NAMED = {"type": "function", "function": {"name": "get_weather"}}
PARSERS = [HermesToolParser(), Llama3JsonToolParser()]


@pytest.mark.parametrize("parser", PARSERS)
def test_grammars_compile_for_each_tool_choice(parser):
  for choice in ("auto", "none", None):
    assert parser.grammar(TOOLS, choice) is None
  for choice in ("required", NAMED):
    for reasoning, started in ((False, False), (True, False), (False, True)):
      grammar = parser.grammar(TOOLS, choice, reasoning=reasoning, started=started)
      assert llguidance.LLMatcher.validate_grammar(grammar) == "", grammar
  nope = {"type": "function", "function": {"name": "nope"}}
  for choice in (nope, "sometimes", {"type": "function"}, {"function": "get_time"}, {"function": {"name": 3}}):
    with pytest.raises(ValueError):
      parser.grammar(TOOLS, choice)
  with pytest.raises(ValueError):
    parser.grammar(None, "required")


def test_the_hermes_grammar_accepts_calls_and_rejects_malformed_ones(vocab):
  p = HermesToolParser()
  paris = qwen_call("get_weather", {"city": "Paris", "unit": "celsius"})
  now = qwen_call("get_time", {})
  required, named = p.grammar(TOOLS, "required"), p.grammar(TOOLS, NAMED)
  assert accepts(vocab, required, paris) and accepts(vocab, required, f"{paris}\n{now}")
  assert accepts(vocab, named, paris) and not accepts(vocab, named, now)
  assert not accepts(vocab, named, f"{paris}\n{paris}")  # a named function: one call
  for bad in (
    qwen_call("get_weather", {"city": "Paris"}),  # a required argument missing
    qwen_call("get_weather", {"city": "Paris", "unit": "kelvin"}),
    qwen_call("get_weather", {"city": "Paris", "unit": "celsius", "extra": 1}),
    qwen_call("get_time", {"x": 1}),
    qwen_call("send_mail", {}),
    "Sure! " + paris,
    paris.replace("</tool_call>", ""),
  ):
    assert not accepts(vocab, required, bad), bad
  with_thinking = p.grammar(TOOLS, "required", reasoning=True)
  assert accepts(vocab, with_thinking, f"<think>\nParis, so get_weather.\n</think>\n\n{paris}")
  assert accepts(vocab, with_thinking, paris) and not accepts(vocab, required, f"<think>x</think>{paris}")
  assert accepts(vocab, p.grammar(TOOLS, "required", started=True), f"Paris.\n</think>\n\n{paris}")


def test_the_llama3_grammar_accepts_one_call(vocab):
  p = Llama3JsonToolParser()
  grammar = p.grammar(TOOLS, "required")
  assert accepts(vocab, grammar, '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}')
  assert accepts(vocab, grammar, '{"name": "get_time", "parameters": {}}')
  assert not accepts(vocab, grammar, '{"name": "get_time", "arguments": {}}')
  assert not accepts(vocab, grammar, '{"name": "get_weather", "parameters": {"city": "Rome"}}')
  assert not accepts(vocab, p.grammar(TOOLS, NAMED), '{"name": "get_time", "parameters": {}}')


def random_walk(vocab, grammar: str, rng: np.random.Generator, max_steps: int = 400) -> str:
  """Text the grammar allows, sampled token by token uniformly among the allowed tokens (ending when it may)."""
  m, mask, ids = matcher(vocab, grammar), allocate_token_bitmask(1, vocab[0].vocab_size), []
  for _ in range(max_steps):
    fill_next_token_bitmask(m, mask)
    bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[: vocab[0].vocab_size]
    allowed = np.flatnonzero(bits)
    allowed = allowed[allowed != vocab[2]]  # EOS ends the walk, below
    if not len(allowed) or (bits[vocab[2]] and rng.random() < 0.7):
      return vocab[1].decode(ids, skip_special_tokens=False)
    token = int(rng.choice(allowed))
    assert m.consume_token(token)
    ids.append(token)
  raise AssertionError(f"no end after {max_steps} tokens: {vocab[1].decode(ids)!r}")


@pytest.mark.parametrize("parser", PARSERS)
def test_whatever_the_grammar_lets_through_parses_and_validates(vocab, parser):
  rng = np.random.default_rng(0)
  for choice in ("required", NAMED):
    for _ in range(4):
      text = random_walk(vocab, parser.grammar(TOOLS, choice), rng)
      content, calls = parser.parse(text)
      assert content == "" and calls, text
      for name, arguments in plain(calls):
        assert choice == "required" or name == "get_weather"
        jsonschema.validate(arguments, PARAMETERS[name])


# ---- the history reaches the template --------------------------------------------------------------

HISTORY = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Weather in Paris?"},
  {
    "role": "assistant",
    "content": None,
    "tool_calls": [
      {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
      }
    ],
  },
  {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
  {"role": "assistant", "content": "It is 18 degrees and sunny."},
  {"role": "user", "content": "And the time?"},
]


def test_tools_and_a_tool_round_trip_reach_a_qwen3_template():
  messages = normalize_tool_messages(HISTORY)
  assert HISTORY[2]["content"] is None and isinstance(HISTORY[2]["tool_calls"][0]["function"]["arguments"], str)
  prompt = render_chat(QWEN3_TEMPLATE, messages, {}, tools=TOOLS)
  assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
  assert "\n".join(json.dumps(t) for t in TOOLS) in prompt
  call = qwen_call("get_weather", {"city": "Paris", "unit": "celsius"})
  assert f"<|im_start|>assistant\n{call}<|im_end|>\n" in prompt
  assert "<|im_start|>user\n<tool_response>\n18 degrees, sunny\n</tool_response><|im_end|>\n" in prompt
  assert prompt.endswith("<|im_start|>user\nAnd the time?<|im_end|>\n<|im_start|>assistant\n")
  assert plain(HermesToolParser().parse(call)[1]) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
  with pytest.raises(Exception, match="NoneType"):  # what the normalizing spares the template: '</think>' in None
    render_chat(QWEN3_TEMPLATE, HISTORY, {}, tools=TOOLS)


def test_tools_and_a_tool_round_trip_reach_a_llama32_template():
  prompt = render_chat(LLAMA32_TEMPLATE, normalize_tool_messages(HISTORY), {}, tools=TOOLS)
  assert "Environment: ipython" in prompt and json.dumps(TOOLS[0], indent=4) in prompt
  assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>' in prompt
  assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 degrees, sunny<|eot_id|>" in prompt


def test_normalizing_leaves_other_messages_alone():
  messages = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello", "tool_calls": []},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]},
  ]
  out = normalize_tool_messages(messages)
  assert out[0] is messages[0] and out[1] == {"role": "assistant", "content": "hello"}
  assert out[2]["tool_calls"][0]["function"]["arguments"] == "not json"
