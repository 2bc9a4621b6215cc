"""Tool calls in the format the model's chat template teaches: parsed from its reply (whole or streamed) into
OpenAI `tool_calls`, and forced by an llguidance grammar for `tool_choice` "required" or a named function.

Two formats, chosen from the template text: Hermes / Qwen2.5 / Qwen3 (`<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>`, one or more, anywhere in the reply) and Llama 3.1 / 3.2 JSON (the whole reply is
`{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`, calls separated by `;`). Text that looks like
a call but does not parse as one stays content."""

from __future__ import annotations

import json
import re
import secrets
from abc import ABC, abstractmethod

from tinyvllm_cli.reasoning import THINK_CLOSE, THINK_OPEN

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# The separators json.dumps and jinja's tojson write: what the templates show the model, so what it writes.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def make_call(name: str, arguments: dict) -> dict:
  """An OpenAI tool call object (arguments as a JSON string)."""
  function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
  return {"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": function}


def _call_from(obj: object, arguments_keys: tuple[str, ...]) -> dict | None:
  """The call a decoded JSON object stands for: a string name and a dict of arguments (absent: none)."""
  if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
    return None
  arguments = next((obj[k] for k in arguments_keys if k in obj), {})
  return make_call(obj["name"], arguments) if isinstance(arguments, dict) else None


def _partial(text: str, marker: str) -> int:
  """How many trailing characters of text could still grow into marker."""
  return next((n for n in range(len(marker) - 1, 0, -1) if text.endswith(marker[:n])), 0)


# ---- grammars --------------------------------------------------------------------------------------


def _functions(tools: list[dict], tool_choice: object) -> list[dict] | None:
  """The functions tool_choice lets the model call (None: the reply is free); ValueError for a bad choice."""
  if tool_choice in (None, "auto", "none"):
    return None
  functions = [
    t.get("function") for t in tools or [] if isinstance(t, dict) and t.get("type", "function") == "function"
  ]
  if not functions or not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in functions):
    raise ValueError("tools must be a non-empty list of {type: function, function: {name, parameters}}")
  if tool_choice == "required":
    return functions
  function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
  if not isinstance(name := isinstance(function, dict) and function.get("name"), str):
    raise ValueError(f"tool_choice must be auto, none, required or a named function, not {tool_choice!r}")
  if not (chosen := [f for f in functions if f["name"] == name]):
    raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
  return chosen[:1]


def _call_schema(function: dict, arguments_key: str) -> dict:
  """A JSON schema of one call to function: its name, then its arguments valid against its parameters."""
  properties = {"name": {"const": function["name"]}, arguments_key: function.get("parameters") or NO_PARAMETERS}
  return {
    "type": "object",
    "properties": properties,
    "required": ["name", arguments_key],
    "additionalProperties": False,
    "x-guidance": JSON_STYLE,
  }


THOUGHT = ["thought: thought_text /[ \\t\\n]*/", f'thought_text[suffix="{THINK_CLOSE}"]: /(?s:.*)/']


def _think_rules(reasoning: bool, started: bool) -> tuple[str, list[str]]:
  """(what the start rule begins with, the rules it needs): a think block before the calls, optional, or
  required without its opening tag when the prompt opened it."""
  if started:
    return "thought ", THOUGHT
  if reasoning:
    return "think? ", [f'think: "{THINK_OPEN}" thought', *THOUGHT]
  return "", []


def _lark(start: str, call: str, functions: list[dict], arguments_key: str, think: tuple[str, list[str]]) -> str:
  """A Lark grammar: `start` over `call` rules, whose `fn` is a call to one of the functions as JSON."""
  rules = [
    f"start: {think[0]}{start}",
    *think[1],
    f"call: {call}",
    "fn: " + " | ".join(f"fn_{i}" for i in range(len(functions))),
  ]
  rules += [f"fn_{i}: %json {json.dumps(_call_schema(f, arguments_key))}" for i, f in enumerate(functions)]
  return "\n".join(rules) + "\n"


# ---- parsers -------------------------------------------------------------------------------------


class ToolParser(ABC):
  """One template's tool-call format: parse replies, stream them (ToolStreamer), constrain them (grammar)."""

  name: str

  @abstractmethod
  def parse(self, text: str) -> tuple[str, list[dict]]:
    """(content without the calls, OpenAI tool call objects)."""

  @abstractmethod
  def grammar(
    self, tools: list[dict], tool_choice: object, reasoning: bool = False, started: bool = False
  ) -> str | None:
    """An llguidance grammar that makes the reply one call (a named tool_choice) or one or more ("required"), the
    arguments valid against the function's parameters; None for "auto" and "none". `reasoning`: a think block may
    come first; `started`: the prompt opened one, which the reply closes first."""

  @abstractmethod
  def stream(self) -> _Stream:
    """A fresh streaming state (see ToolStreamer)."""


class _Stream(ABC):
  @abstractmethod
  def feed(self, delta: str) -> tuple[str, list[dict]]: ...

  @abstractmethod
  def flush(self) -> tuple[str, list[dict]]: ...


class HermesToolParser(ToolParser):
  """Qwen2.5 / Qwen3 (Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number.
  The whitespace between a call and the content around it is dropped; a block that is not a call stays as text."""

  name = "hermes"
  _block = re.compile(f"{re.escape(TOOL_CALL_OPEN)}(.*?)(?:{re.escape(TOOL_CALL_CLOSE)}|\\Z)", re.S)

  @staticmethod
  def call(body: str) -> dict | None:
    try:
      return _call_from(json.loads(body), ("arguments", "parameters"))
    except json.JSONDecodeError:
      return None

  def parse(self, text: str) -> tuple[str, list[dict]]:
    content, calls, pos, after_call = [], [], 0, False
    for m in self._block.finditer(text):
      piece, call = text[pos : m.start()], self.call(m.group(1))
      piece = piece.lstrip() if after_call else piece
      content.append(piece.rstrip() if call else piece + m.group(0))
      calls += [call] if call else []
      pos, after_call = m.end(), call is not None
    tail = text[pos:]
    content.append(tail.lstrip() if after_call else tail)
    return "".join(content), calls

  def grammar(
    self, tools: list[dict], tool_choice: object, reasoning: bool = False, started: bool = False
  ) -> str | None:
    if (functions := _functions(tools, tool_choice)) is None:
      return None
    start = 'call ("\\n" call)*' if tool_choice == "required" else "call"
    call = f'"{TOOL_CALL_OPEN}\\n" fn "\\n{TOOL_CALL_CLOSE}"'
    return _lark(start, call, functions, "arguments", _think_rules(reasoning, started))

  def stream(self) -> _Stream:
    return _HermesStream(self)


class _HermesStream(_Stream):
  """Content streams until `<tool_call>`; the block is held until `</tool_call>` (or the end) and then becomes
  a call, or text again. Trailing whitespace is held too: it is dropped when a call follows."""

  def __init__(self, parser: HermesToolParser) -> None:
    self.parser, self.held, self.in_call = parser, "", False
    self.space = ""  # whitespace before the open block, dropped if it is a call
    self.after_call = False  # drop the whitespace that follows a call

  def feed(self, delta: str) -> tuple[str, list[dict]]:
    text, self.held = self.held + delta, ""
    content, calls = "", []
    while text:
      if self.in_call:
        body, closed, text = text.partition(TOOL_CALL_CLOSE)
        if not closed:
          self.held = body
          break
        piece, call = self._end_call(body, TOOL_CALL_CLOSE)
        content, calls = content + piece, calls + ([call] if call else [])
      else:
        piece, text = self._content(text)
        content += piece
    return content, calls

  def flush(self) -> tuple[str, list[dict]]:
    held, self.held = self.held, ""
    if self.in_call:
      piece, call = self._end_call(held, "")
      return piece, [call] if call else []
    return held, []

  def _content(self, text: str) -> tuple[str, str]:
    """(content to emit, the call text after an opening tag)."""
    if self.after_call:
      text = text.lstrip()
      self.after_call = not text
    head, opened, rest = text.partition(TOOL_CALL_OPEN)
    if opened:
      piece = head.rstrip()
      self.space, self.in_call = head[len(piece) :], True
      return piece, rest
    cut = len(head) - _partial(head, TOOL_CALL_OPEN)
    piece = head[:cut].rstrip()
    self.held = head[len(piece) :]
    return piece, ""

  def _end_call(self, body: str, close: str) -> tuple[str, dict | None]:
    """(content, call) once a block ends: a call, or the block as text with the whitespace before it."""
    self.in_call, space, self.space = False, self.space, ""
    call = self.parser.call(body)
    self.after_call = call is not None
    return ("", call) if call else (space + TOOL_CALL_OPEN + body + close, None)


class Llama3JsonToolParser(ToolParser):
  """Llama 3.1 / 3.2 JSON calls: a reply that is `{"name": ..., "parameters": {...}}` (maybe after
  `<|python_tag|>`, several separated by `;`) is calls; any other reply, all content. Its grammar forces one call
  even for "required": the Llama 3 templates take one call per assistant turn."""

  name = "llama3_json"

  @staticmethod
  def starts_call(text: str) -> bool:
    body = text.lstrip()
    return body.startswith("{") or body.startswith(PYTHON_TAG)

  def parse(self, text: str) -> tuple[str, list[dict]]:
    calls = self._calls(text.lstrip().removeprefix(PYTHON_TAG)) if self.starts_call(text) else None
    return ("", calls) if calls else (text, [])

  @staticmethod
  def _calls(text: str) -> list[dict] | None:
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while (pos := len(text) - len(text[pos:].lstrip())) < len(text):
      try:
        obj, pos = decoder.raw_decode(text, pos)
      except json.JSONDecodeError:
        return None
      if (call := _call_from(obj, ("parameters", "arguments"))) is None:
        return None
      calls.append(call)
      rest = text[pos:].lstrip()
      pos = len(text) - len(rest) + rest.startswith(";")
    return calls

  def grammar(
    self, tools: list[dict], tool_choice: object, reasoning: bool = False, started: bool = False
  ) -> str | None:
    if (functions := _functions(tools, tool_choice)) is None:
      return None
    return _lark("call", "fn", functions, "parameters", _think_rules(reasoning, started))

  def stream(self) -> _Stream:
    return _Llama3Stream(self)


class _Llama3Stream(_Stream):
  """A reply that starts like a call is held whole and parsed at the end; any other streams as it comes."""

  def __init__(self, parser: Llama3JsonToolParser) -> None:
    self.parser, self.held, self.mode = parser, "", "start"

  def feed(self, delta: str) -> tuple[str, list[dict]]:
    text = self.held + delta
    if self.mode == "start":
      body = text.lstrip()
      undecided = PYTHON_TAG.startswith(body) and body != PYTHON_TAG
      self.mode = "start" if undecided else "call" if self.parser.starts_call(body) else "content"
    if self.mode == "content":
      self.held = ""
      return text, []
    self.held = text
    return "", []

  def flush(self) -> tuple[str, list[dict]]:
    held, self.held = self.held, ""
    return self.parser.parse(held) if self.mode == "call" else (held, [])


class ToolStreamer:
  """Streamed reply text -> (content delta, calls completed in this delta): content streams until a call's
  start (a partial marker is held back); a call is emitted once whole. All deltas joined equal parser.parse."""

  def __init__(self, parser: ToolParser) -> None:
    self._stream = parser.stream()

  def feed(self, delta: str) -> tuple[str, list[dict]]:
    return self._stream.feed(delta)

  def flush(self) -> tuple[str, list[dict]]:
    return self._stream.flush()


def tool_parser_for(chat_template: str | None) -> ToolParser | None:
  """The parser for the template's tool-call format; None when the template takes no `tools` or writes calls in
  a format not parsed here."""
  if not chat_template or not re.search(r"\btools\b", chat_template):
    return None
  if TOOL_CALL_OPEN in chat_template:
    return HermesToolParser()
  if '"parameters"' in chat_template:
    return Llama3JsonToolParser()
  return None


def normalize_tool_messages(messages: list[dict]) -> list[dict]:
  """Messages as templates expect them (as vLLM hands them over): an assistant message's tool call arguments as a
  dict rather than OpenAI's JSON string, its null content as "", and no empty tool_calls."""
  return [_normalize(m) if m.get("role") == "assistant" else m for m in messages]


def _normalize(message: dict) -> dict:
  message = dict(message)
  if calls := message.pop("tool_calls", None):  # templates test `'tool_calls' in message`: no empty list or null
    message["tool_calls"] = [_parsed_arguments(c) for c in calls]
  if message.get("content") is None:
    message["content"] = ""
  return message


def _parsed_arguments(call: dict) -> dict:
  function = call.get("function") if isinstance(call, dict) else None
  if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
    return call
  try:
    arguments = json.loads(function["arguments"])
  except json.JSONDecodeError:
    return call
  return {**call, "function": {**function, "arguments": arguments}}
