"""The OpenAI API as serve-lite speaks it: a request body parsed into what the engine runs (every field serve-lite does
not honour refused with a 400 naming it), and the completions, chunks and logprobs it answers with."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from tinyvllm_cli.reasoning import (
  THINK_CLOSE,
  ReasoningSplitter,
  has_reasoning,
  prompt_opens_reasoning,
  split_reasoning,
)
from tinyvllm_cli.tool_calls import ToolParser, ToolStreamer, normalize_tool_messages, tool_parser_for
from tinyvllm_cli.ui import one_line

INVALID_REQUEST = "invalid_request_error"
MAX_N = 128  # choices per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 20 for chat, 5 for completions)
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
  """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

  def __init__(
    self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = INVALID_REQUEST
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- which fields are honoured -----------------------------------------------------------------

SHARED_FIELDS = frozenset(
  {
    *("model", "stream", "stream_options", "n", "seed", "max_tokens", "max_completion_tokens", "user"),
    *("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"),
    *("stop", "stop_token_ids", "ignore_eos", "logit_bias", "logprobs"),
    *("response_format", "guided_json", "guided_regex", "guided_grammar"),
  }
)
CHAT_FIELDS = SHARED_FIELDS | {"messages", "top_logprobs", "chat_template_kwargs", "tools", "tool_choice"}
CHAT_FIELDS |= {"parallel_tool_calls"}
COMPLETION_FIELDS = SHARED_FIELDS | {"prompt"}
# fields serve-lite does not honour, accepted at the one value that asks for nothing
INERT = {"echo": False, "best_of": 1, "suffix": "", "store": False, "modalities": ["text"], "service_tier": "auto"}
# why a field is refused, where more than "not supported" helps
REFUSED = {
  "echo": "'echo' (the prompt in the completion) is not supported",
  "best_of": "'best_of' above 1 is not supported; use n",
  "suffix": "'suffix' (text after the completion) is not supported",
  "functions": "the legacy 'functions' field is not supported; send 'tools'",
  "function_call": "the legacy 'function_call' field is not supported; send 'tool_choice'",
}


def check_fields(body: dict, chat: bool) -> None:
  """Refuse every field serve-lite would otherwise ignore: a 200 must never quietly drop what the client asked for.
  A null field counts as absent."""
  known = CHAT_FIELDS if chat else COMPLETION_FIELDS
  for name, value in body.items():
    if value is None or name in known or _inert(name, value):
      continue
    message = REFUSED.get(name, f"'{name}' is not supported by serve-lite")
    raise ApiError(400, message, name, "unsupported_parameter")


def _inert(name: str, value: Any) -> bool:
  return name in INERT and type(value) is type(INERT[name]) and value == INERT[name]


# ---- field access --------------------------------------------------------------------------------

_KINDS = {
  int: "an integer",
  float: "a number",
  bool: "a boolean",
  str: "a string",
  dict: "an object",
  list: "an array",
  (str, list): "a string or an array of strings",
  (str, dict): "a string or an object",
}


def _get(body: dict, name: str, kind: type | tuple, default: Any = None, where: str = "") -> Any:
  """body[name] checked against a JSON type; absent or null gives the default. where: the param's prefix."""
  value = body.get(name)
  if value is None:
    return default
  accepted = (int, float) if kind is float else kind  # a JSON integer is a number too
  bool_as_number = isinstance(value, bool) and kind is not bool  # True is an int to Python, not to JSON
  if not isinstance(value, accepted) or bool_as_number:
    raise ApiError(400, f"'{where}{name}' must be {_KINDS[kind]}", where + name, "invalid_type")
  return value


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_json_object(raw: bytes) -> dict:
  try:
    body = json.loads(raw)
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    raise ApiError(400, f"the request body is not valid JSON ({one_line(e)})", code="invalid_json") from None
  if not isinstance(body, dict):
    raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
  return body


# ---- the request ---------------------------------------------------------------------------------


@dataclass
class ToolRequest:
  """The tools a chat request offers and how the reply may call them."""

  tools: list[dict]
  choice: str | dict  # auto, required, or {"type": "function", "function": {"name": ...}}
  parser: ToolParser  # the chat template's call format
  parallel: bool = True  # parallel_tool_calls: false keeps the first call


@dataclass
class Reply:
  """How a chat reply's text becomes the assistant's message: reasoning split off (templates with <think>), tool
  calls parsed out (requests with tools)."""

  reasoning: bool = False  # split <think>...</think> into reasoning_content
  reasoning_started: bool = False  # the prompt opened the think block: the reply starts inside it
  thinking_off: bool = False  # the prompt closed an empty think block (enable_thinking false): the reply has none
  tools: ToolRequest | None = None

  def message(self, text: str) -> tuple[dict, bool]:
    """The assistant message of a whole reply, and whether it calls tools."""
    reasoning, content = split_reasoning(text, self.reasoning_started) if self.reasoning else (None, text)
    content, calls = self.tools.parser.parse(content) if self.tools else (content, [])
    calls = calls if self.tools is None or self.tools.parallel else calls[:1]
    message = {"role": "assistant", "content": (content or None) if calls else content}
    message |= {"tool_calls": calls} if calls else {}
    return message | ({} if reasoning is None else {"reasoning_content": reasoning}), bool(calls)

  def grammar(self) -> str | None:
    """The grammar that forces a tool call (tool_choice required or a named function); None otherwise."""
    if self.tools is None:
      return None
    thinking = self.reasoning and not self.thinking_off
    try:
      return self.tools.parser.grammar(self.tools.tools, self.tools.choice, thinking, self.reasoning_started)
    except ValueError as e:
      raise ApiError(400, one_line(e), "tool_choice", "invalid_value") from None

  def streamer(self) -> ReplyStreamer:
    return ReplyStreamer(self)


class ReplyStreamer:
  """A chat reply's text deltas -> message deltas (reasoning_content, content, tool_calls), as Reply.message splits
  the whole reply."""

  def __init__(self, reply: Reply):
    self.splitter = ReasoningSplitter(reply.reasoning_started) if reply.reasoning else None
    self.tools = ToolStreamer(reply.tools.parser) if reply.tools else None
    self.max_calls = None if reply.tools is None or reply.tools.parallel else 1
    self.num_calls = 0

  @property
  def called(self) -> bool:
    return self.num_calls > 0

  def feed(self, text: str, final: bool) -> dict:
    reasoning, content = _fed(self.splitter, text, final) if self.splitter else ("", text)
    content, calls = _fed(self.tools, content, final) if self.tools else (content, [])
    calls = calls[: None if self.max_calls is None else self.max_calls - self.num_calls]
    indexed = [{"index": self.num_calls + k, **call} for k, call in enumerate(calls)]
    self.num_calls += len(calls)
    delta = {"reasoning_content": reasoning} if reasoning else {}
    return delta | ({"content": content} if content else {}) | ({"tool_calls": indexed} if indexed else {})


def _fed(streamer: Any, text: str, final: bool) -> tuple[Any, Any]:
  """A streamer's (first, second) output for a delta, and for what it held back when the reply ends."""
  first, second = streamer.feed(text)
  if final:
    tail = streamer.flush()
    first, second = first + tail[0], second + tail[1]
  return first, second


@dataclass
class GenerateRequest:
  prompt_ids: list[int]
  params: Any  # SamplingParams
  stream: bool
  include_usage: bool
  chat: bool
  n: int = 1
  reply: Reply = field(default_factory=Reply)


def parse_request(body: dict, engine: Any, model_name: str, chat: bool) -> GenerateRequest:
  check_fields(body, chat)
  _check_model(body, model_name)
  n = _get(body, "n", int, 1)
  if not 1 <= n <= MAX_N:
    raise ApiError(400, f"'n' must be in [1, {MAX_N}]", "n", "invalid_value")
  ids, reply = chat_prompt(body, engine) if chat else (completion_prompt(body, engine), Reply())
  check_prompt_ids(ids, engine)
  stream = _get(body, "stream", bool, False)
  include_usage = _get(_get(body, "stream_options", dict, {}), "include_usage", bool, False)
  params = sampling_params(body, engine, len(ids), chat, output_grammar(body, reply))
  return GenerateRequest(ids, params, stream, include_usage, chat, n, reply)


def _check_model(body: dict, served: str) -> None:
  model = _get(body, "model", str)
  if model is not None and model != served:
    message = f"the model '{model}' does not exist; this server serves '{served}'"
    raise ApiError(404, message, "model", "model_not_found")


def completion_prompt(body: dict, engine: Any) -> list[int]:
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of one prompt
  if isinstance(prompt, str):
    return engine.encode(prompt) if prompt else []
  if isinstance(prompt, list) and all(map(_is_int, prompt)):
    return list(prompt)
  if prompt is None:
    raise ApiError(400, "'prompt' is required", "prompt", "missing_field")
  message = "'prompt' must be a string or a list of token ids (one prompt per request)"
  raise ApiError(400, message, "prompt", "invalid_type")


def check_prompt_ids(ids: list[int], engine: Any) -> None:
  """The core's prompt rule (not empty, shorter than the context, ids in the vocabulary) as a 400 on 'prompt'."""
  from tinyvllm_core import check_prompt

  try:
    check_prompt(ids, engine.max_model_len, engine.model_config.vocab_size)
  except ValueError as e:
    code = "context_length_exceeded" if len(ids) >= engine.max_model_len else "invalid_value"
    raise ApiError(400, str(e), "prompt", code) from None


# ---- chat messages -------------------------------------------------------------------------------


def chat_prompt(body: dict, engine: Any) -> tuple[list[int], Reply]:
  """The messages rendered by the model's chat template, and how its reply is read back."""
  messages = body.get("messages")
  if messages is None:
    raise ApiError(400, "'messages' is required", "messages", "missing_field")
  if not isinstance(messages, list) or not messages:
    message = "'messages' must be a non-empty array of {role, content} objects"
    raise ApiError(400, message, "messages", "invalid_type")
  template = engine.files.chat_template
  tools = chat_tools(body, template)
  kwargs = _get(body, "chat_template_kwargs", dict, {}) | ({"tools": tools.tools} if tools else {})
  checked = normalize_tool_messages([_message(m, i) for i, m in enumerate(messages)])
  try:
    text = engine.apply_chat_template(checked, tokenize=False, add_generation_prompt=True, **kwargs)
  except (ValueError, TypeError) as e:
    raise ApiError(400, f"the chat template rejected the messages: {one_line(e)}", "messages") from None
  reasoning = has_reasoning(template)
  opened, closed = reasoning and prompt_opens_reasoning(text), reasoning and text.rstrip().endswith(THINK_CLOSE)
  return engine.encode(text, add_special_tokens=False), Reply(reasoning, opened, closed, tools)


def _message(m: Any, i: int) -> dict:
  """One message as the chat template reads it (OpenAI's 'developer' is the templates' 'system')."""
  param = f"messages[{i}]"
  if not isinstance(m, dict):
    raise ApiError(400, f"'{param}' must be an object with role and content", param, "invalid_type")
  role = _get(m, "role", str, where=f"{param}.")
  if role is None:
    raise ApiError(400, f"'{param}.role' is required", f"{param}.role", "missing_field")
  if role not in ROLES:
    raise ApiError(400, f"'{param}.role' must be one of {', '.join(ROLES)}", f"{param}.role", "invalid_value")
  content = _content(m.get("content"), f"{param}.content", role)
  return {"role": "system" if role == "developer" else role, "content": content} | _message_extras(m, param, role)


def _content(content: Any, param: str, role: str) -> str:
  if _is_text_parts(content):
    return "".join(part["text"] for part in content)
  if isinstance(content, str):
    return content
  if content is None and role == "assistant":
    return ""  # an assistant turn that only called tools
  if content is None:
    raise ApiError(400, f"'{param}' is required on a {role} message", param, "missing_field")
  raise ApiError(400, f"'{param}' must be a string or a list of text parts", param, "invalid_type")


def _is_text_parts(content: Any) -> bool:
  """OpenAI's list form of a message's content: [{"type": "text", "text": "..."}, ...]."""
  return isinstance(content, list) and all(map(_is_text_part, content))


def _is_text_part(part: Any) -> bool:
  return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _message_extras(m: dict, param: str, role: str) -> dict:
  """What templates read beside role and content: an assistant's tool calls and reasoning, a tool result's call id,
  a name."""
  where = f"{param}."
  extras = {
    k: v for k in ("name", "tool_call_id", "reasoning_content") if (v := _get(m, k, str, where=where)) is not None
  }
  calls = _get(m, "tool_calls", list, [], where=where) if role == "assistant" else []
  if calls:
    extras["tool_calls"] = [_history_call(call, f"{param}.tool_calls[{k}]") for k, call in enumerate(calls)]
  return extras


def _history_call(call: Any, param: str) -> dict:
  """An earlier tool call, checked (normalize_tool_messages hands its arguments to the template as an object)."""
  function = call.get("function") if isinstance(call, dict) else None
  if not isinstance(function, dict) or not isinstance(function.get("name"), str):
    raise ApiError(400, f"'{param}' must be {{id, type, function: {{name, arguments}}}}", param, "invalid_type")
  return call


# ---- tools ---------------------------------------------------------------------------------------


def chat_tools(body: dict, template: str | None) -> ToolRequest | None:
  """The request's tools, passed to the template and parsed out of the reply; None without tools or with
  tool_choice none (the template then gets no tools). A template that takes no tools is a 400."""
  tools = _tools(body)
  choice = _tool_choice(body, tools)
  if choice == "none":
    return None
  if (parser := tool_parser_for(template)) is None:
    message = "this model's chat template has no tool calling (or a call format serve-lite does not parse)"
    raise ApiError(400, message, "tools", "unsupported_value")
  return ToolRequest(tools, choice, parser, _get(body, "parallel_tool_calls", bool, True))


def _tools(body: dict) -> list[dict]:
  tools = _get(body, "tools", list, [])
  for i, tool in enumerate(tools):
    if not _is_function_tool(tool):
      message = f"'tools[{i}]' must be {{type: function, function: {{name, description, parameters}}}}"
      raise ApiError(400, message, f"tools[{i}]", "invalid_type")
  return tools


def _is_function_tool(tool: Any) -> bool:
  function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
  if not isinstance(function, dict):
    return False
  return isinstance(function.get("name"), str) and isinstance(function.get("parameters", {}), dict)


def _tool_choice(body: dict, tools: list[dict]) -> str | dict:
  """auto (the default with tools), none (without), required, or {"type": "function", "function": {"name"}}."""
  choice = _get(body, "tool_choice", (str, dict), "auto" if tools else "none")
  names = {tool["function"]["name"] for tool in tools}
  named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
  if choice not in ("auto", "none", "required") and named not in names:
    message = "'tool_choice' must be auto, none, required or {type: function, function: {name}} naming one of the tools"
    raise ApiError(400, message, "tool_choice", "invalid_value")
  if choice != "none" and not tools:
    raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
  return choice


# ---- sampling ------------------------------------------------------------------------------------


def sampling_params(body: dict, engine: Any, prompt_len: int, chat: bool, grammar: str | None = None) -> Any:
  """The model's default SamplingParams with the request's fields; a value SamplingParams rejects is a 400."""
  max_tokens = _max_tokens(body, engine.max_model_len, prompt_len, chat)
  fields = _sampling_overrides(body, engine.model_config.vocab_size)
  fields |= {"seed": _get(body, "seed", int), "max_tokens": max_tokens, "stop": _stop(body)}
  fields |= {"stop_token_ids": _stop_token_ids(body), "ignore_eos": _get(body, "ignore_eos", bool, False)}
  fields |= {"logit_bias": _logit_bias(body, engine.model_config.vocab_size), "logprobs": _logprobs(body, chat)}
  try:
    return dataclasses.replace(engine.default_params, grammar=grammar, **fields)
  except ValueError as e:
    raise ApiError(400, str(e).removeprefix("SamplingParams: "), None, "invalid_value") from None


def _max_tokens(body: dict, max_model_len: int, prompt_len: int, chat: bool) -> int:
  """max_completion_tokens or max_tokens; by default the room left for chat and 16 for completions (OpenAI's)."""
  room = max_model_len - prompt_len
  max_tokens = _get(body, "max_completion_tokens", int, _get(body, "max_tokens", int, room if chat else 16))
  param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  if max_tokens < 1:
    raise ApiError(400, f"'{param}' must be at least 1", param, "invalid_value")
  if max_tokens > room:
    message = (
      f"this model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len} "
      f"and {param} asks for {max_tokens} more (at most {room})"
    )
    raise ApiError(400, message, param, "context_length_exceeded")
  return max_tokens


def _sampling_overrides(body: dict, vocab_size: int) -> dict:
  """The sampling knobs the request sets; the absent ones keep the model's generation_config values."""
  top_k = _get(body, "top_k", int)
  if top_k and top_k >= vocab_size:
    top_k = 0  # every token: the same as no top-k
  overrides = {"temperature": _get(body, "temperature", float), "top_p": _get(body, "top_p", float)}
  overrides |= {"top_k": top_k, "min_p": _get(body, "min_p", float)}
  for penalty in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
    overrides[penalty] = _get(body, penalty, float)
  return {name: value for name, value in overrides.items() if value is not None}


def _stop(body: dict) -> list[str]:
  stop = _get(body, "stop", (str, list), [])
  stop = [stop] if isinstance(stop, str) else stop
  if not all(isinstance(s, str) and s for s in stop):
    raise ApiError(400, "'stop' must be a string or an array of non-empty strings", "stop", "invalid_type")
  return stop


def _stop_token_ids(body: dict) -> list[int]:
  ids = _get(body, "stop_token_ids", list, [])
  if not all(map(_is_int, ids)):
    raise ApiError(400, "'stop_token_ids' must be an array of integers", "stop_token_ids", "invalid_type")
  return ids


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
  """OpenAI's logit_bias: token ids as strings -> a bias in [-100, 100] added to that token's logit."""
  bias = {}
  for key, value in _get(body, "logit_bias", dict, {}).items():
    if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
      message = f"'logit_bias' keys must be token ids below {vocab_size} (as strings); got {key!r}"
      raise ApiError(400, message, "logit_bias", "invalid_value")
    if not (_is_number(value) and -100 <= value <= 100):
      raise ApiError(400, f"'logit_bias' values must be numbers in [-100, 100]; got {value!r}", "logit_bias")
    bias[int(key)] = float(value)
  return bias


def _logprobs(body: dict, chat: bool) -> int | None:
  """How many alternatives per token the request wants logprobs of (0: the chosen token's alone); None: no logprobs.
  Chat: logprobs (a boolean) and top_logprobs; completions: logprobs (the count)."""
  if not chat:
    return _logprob_count(body, "logprobs")
  top = _logprob_count(body, "top_logprobs")
  if _get(body, "logprobs", bool, False):
    return top or 0
  if top:
    raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
  return None


def _logprob_count(body: dict, name: str) -> int | None:
  k = _get(body, name, int)
  if k is not None and not 0 <= k <= MAX_LOGPROBS:
    raise ApiError(400, f"'{name}' must be in [0, {MAX_LOGPROBS}]", name, "invalid_value")
  return k


def choice_params(params: Any, index: int) -> Any:
  """Choice index's SamplingParams: its own seed (seed + index when the request gives one, else a random one)."""
  return dataclasses.replace(params, seed=None if params.seed is None else params.seed + index)


# ---- structured output ---------------------------------------------------------------------------


def output_grammar(body: dict, reply: Reply) -> str | None:
  """The request's one constraint on the output (response_format, a vLLM guided_* field, or a tool call that
  tool_choice forces) as an llguidance grammar, checked here so a bad one is a 400 naming its field."""
  from llguidance import LLMatcher

  asked = [(name, g) for name, build in GRAMMARS.items() if (g := _built(body, name, build)) is not None]
  asked += [("tool_choice", g)] if (g := reply.grammar()) is not None else []
  if len(asked) > 1:
    message = f"'{asked[0][0]}' and '{asked[1][0]}' both constrain the output; send one"
    raise ApiError(400, message, asked[1][0], "invalid_value")
  if not asked:
    return None
  name, grammar = asked[0]
  if error := LLMatcher.validate_grammar(grammar):
    raise ApiError(400, f"'{name}' is not a valid constraint: {one_line(error)[:300]}", name, "invalid_value")
  return grammar


def _built(body: dict, name: str, build: Any) -> str | None:
  return None if body.get(name) is None else build(body[name])


def _response_format(value: Any) -> str | None:
  """OpenAI's response_format: text (no constraint), json_object (any object), json_schema (its schema)."""
  kind = value.get("type") if isinstance(value, dict) else None
  if kind == "text":
    return None
  if kind == "json_object":
    return _schema_grammar({"type": "object"}, "response_format")
  if kind == "json_schema":
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return _schema_grammar(schema, "response_format.json_schema.schema")
  if not isinstance(kind, str):
    raise ApiError(400, "'response_format' must be an object with a type", "response_format", "invalid_type")
  message = f"'response_format' type {kind!r} is not supported (text, json_object, json_schema)"
  raise ApiError(400, message, "response_format", "unsupported_value")


def _guided_json(value: Any) -> str:
  """vLLM's guided_json: a JSON schema, as an object or as JSON text."""
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except ValueError:
      raise ApiError(400, "'guided_json' is not valid JSON", "guided_json", "invalid_value") from None
  return _schema_grammar(value, "guided_json")


def _schema_grammar(schema: Any, param: str) -> str:
  from llguidance import LLMatcher

  if not isinstance(schema, dict):
    raise ApiError(400, f"'{param}' must be a JSON schema object", param, "invalid_type")
  return LLMatcher.grammar_from_json_schema(schema)


def _text_grammar(param: str, build: str) -> Any:
  """A builder for a field that is grammar text (a regex, a Lark grammar)."""

  def built(value: Any) -> str:
    from llguidance import LLMatcher

    if not isinstance(value, str):
      raise ApiError(400, f"'{param}' must be a string", param, "invalid_type")
    return getattr(LLMatcher, build)(value)

  return built


GRAMMARS = {
  "response_format": _response_format,
  "guided_json": _guided_json,
  "guided_regex": _text_grammar("guided_regex", "grammar_from_regex"),
  "guided_grammar": _text_grammar("guided_grammar", "grammar_from_lark"),
}


# ---- responses -----------------------------------------------------------------------------------


class TokenText:
  """Token ids as the text and bytes OpenAI's logprobs show them (llguidance's byte view of the vocabulary)."""

  def __init__(self, engine: Any):
    import llguidance

    eos = sorted(engine.eos_token_ids)
    self._tokenizer = llguidance.LLTokenizer(engine.tokenizer.to_str(), engine.model_config.vocab_size, eos)

  def bytes(self, token_id: int) -> bytes:
    return self._tokenizer.decode_bytes([token_id])

  def text(self, token_id: int) -> str:
    return self.bytes(token_id).decode("utf-8", errors="replace")


def usage(outs: list[Any]) -> dict:
  """Token counts of the request: its prompt once, the completions of every choice."""
  prompt, completion = len(outs[0].prompt_token_ids), sum(len(out.token_ids) for out in outs)
  counts = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
  return counts | {"prompt_tokens_details": {"cached_tokens": outs[0].num_cached_tokens}}


def envelope(rid: str, model: str, kind: str) -> dict:
  return {"id": rid, "object": kind, "created": int(time.time()), "model": model}


def _chunk_kind(req: GenerateRequest) -> str:
  return "chat.completion.chunk" if req.chat else "text_completion"


def _finish_reason(reason: str | None, called: bool) -> str | None:
  return "tool_calls" if called and reason == "stop" else reason


def full_response(req: GenerateRequest, rid: str, model: str, outs: list[Any], tokens: TokenText | None) -> dict:
  choices = [_full_choice(req, i, out, tokens) for i, out in enumerate(outs)]
  kind = "chat.completion" if req.chat else "text_completion"
  return envelope(rid, model, kind) | {"choices": choices, "usage": usage(outs)}


def _full_choice(req: GenerateRequest, index: int, out: Any, tokens: TokenText | None) -> dict:
  logprobs = logprobs_body(req.chat, out.logprobs, tokens) if out.logprobs is not None else None
  if not req.chat:
    return {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}
  message, called = req.reply.message(out.text)
  finish_reason = _finish_reason(out.finish_reason, called)
  return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk(req: GenerateRequest, rid: str, model: str, choice: dict) -> dict:
  body = envelope(rid, model, _chunk_kind(req)) | {"choices": [choice]}
  return body | ({"usage": None} if req.include_usage else {})


def role_choice(index: int) -> dict:
  """The first event of a streamed chat choice."""
  return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def usage_chunk(req: GenerateRequest, rid: str, model: str, outs: list[Any]) -> dict:
  return envelope(rid, model, _chunk_kind(req)) | {"choices": [], "usage": usage(outs)}


class ChoiceStream:
  """One streamed choice: each output becomes its event's choice, with the text new since the last event (chat:
  split into reasoning and content) and the logprobs of the tokens new since then."""

  def __init__(self, req: GenerateRequest, index: int, tokens: TokenText | None):
    self.req, self.index, self.tokens = req, index, tokens
    self.reply = req.reply.streamer() if req.chat else None
    self.num_logprobs = 0  # tokens whose logprobs were sent
    self.text_offset = 0  # completions: where the next token's text starts

  def choice(self, out: Any) -> dict | None:
    """The choice of out's event; None when it brings nothing to send."""
    logprobs = self._new_logprobs(out)
    finish_reason = out.finish_reason if out.finished else None
    if not self.req.chat:
      if not (out.delta_text or logprobs or out.finished):
        return None
      return {"index": self.index, "text": out.delta_text, "logprobs": logprobs, "finish_reason": finish_reason}
    delta = self.reply.feed(out.delta_text, out.finished)
    if not (delta or logprobs or out.finished):
      return None
    finish_reason = _finish_reason(finish_reason, self.reply.called)
    return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

  def _new_logprobs(self, out: Any) -> dict | None:
    if out.logprobs is None or len(out.logprobs) == self.num_logprobs:
      return None
    new, self.num_logprobs = out.logprobs[self.num_logprobs :], len(out.logprobs)
    body = logprobs_body(self.req.chat, new, self.tokens, self.text_offset)
    if not self.req.chat:
      self.text_offset += sum(map(len, body["tokens"]))
    return body


# ---- logprobs ------------------------------------------------------------------------------------


def logprobs_body(chat: bool, entries: list[Any], tokens: TokenText, text_offset: int = 0) -> dict:
  """Logprobs in OpenAI's shape: chat {content: [{token, logprob, bytes, top_logprobs}]}, completions {tokens,
  token_logprobs, top_logprobs, text_offset}. Masked alternatives (-inf: a grammar forbade them) are left out."""
  if chat:
    return {"content": [_chat_logprob(entry, tokens) for entry in entries], "refusal": None}
  texts = [tokens.text(entry.token_id) for entry in entries]
  offsets = [text_offset + sum(map(len, texts[:i])) for i in range(len(texts))]
  top = [{tokens.text(t): lp for t, lp in entry.top if math.isfinite(lp)} for entry in entries]
  token_logprobs = [_finite(entry.logprob) for entry in entries]
  return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprob(entry: Any, tokens: TokenText) -> dict:
  top = [_token_logprob(t, lp, tokens) for t, lp in entry.top if math.isfinite(lp)]
  return _token_logprob(entry.token_id, entry.logprob, tokens) | {"top_logprobs": top}


def _token_logprob(token_id: int, logprob: float, tokens: TokenText) -> dict:
  raw = tokens.bytes(token_id)
  return {"token": raw.decode("utf-8", errors="replace"), "logprob": _finite(logprob), "bytes": list(raw)}


def _finite(logprob: float) -> float:
  return logprob if math.isfinite(logprob) else -9999.0  # OpenAI's stand-in for an impossible token


def failed_output(out: Any) -> ApiError:
  """The error an output that ended in abort or error answers with."""
  if out.finish_reason == "abort":
    message = "the request was aborted (the server is shutting down)"
    return ApiError(503, message, type="server_error", code="aborted")
  if (out.error or "").startswith("grammar:"):
    return ApiError(400, f"the output constraint was refused: {out.error}", code="invalid_grammar")
  return ApiError(500, f"generation failed: {out.error}", type="server_error", code="engine_error")
