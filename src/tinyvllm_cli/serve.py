"""`tinyvllm serve-lite`: an OpenAI-compatible HTTP server on the standard library. One thread per
connection parses the request and streams its own output; the engine loop batches all of them."""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import secrets
import select
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import typer

from tinyvllm_cli import models
from tinyvllm_cli.engine_options import (
  BeamOption,
  DeviceOption,
  DtypeOption,
  KvCacheGbOption,
  MaxModelLenOption,
  ModelOption,
  QuantizeOption,
  check_dtype,
  check_dtype_compiles,
  quantize_setting,
)
from tinyvllm_cli.ui import err, fail, one_line, say

MAX_BODY_BYTES = 4 << 20
DRAIN_LIMIT_BYTES = 16 << 20  # an oversized body up to this size is read and dropped so the client sees the 413
SOCKET_TIMEOUT_S = 30.0
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Transfer-Encoding": "chunked"}
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
  """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

  def __init__(
    self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = INVALID_REQUEST
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- metrics -----------------------------------------------------------------------------------


class Histogram:
  def __init__(self, buckets: tuple[float, ...]):
    self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0
    self._lock = threading.Lock()

  def observe(self, value: float) -> None:
    with self._lock:
      self.sum, self.count = self.sum + value, self.count + 1
      for i, bound in enumerate(self.buckets):
        if value <= bound:
          self.counts[i] += 1

  def lines(self, name: str, labels: str) -> list[str]:
    with self._lock:
      buckets = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
      everything = f'{name}_bucket{{{labels},le="+Inf"}} {self.count}'
      return buckets + [everything, f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
  """What the engine's stats do not hold: latency histograms and finished requests by reason."""

  def __init__(self):
    self.ttft, self.itl, self.e2e = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)
    self.finished: Counter[str] = Counter()
    self._lock = threading.Lock()

  def count_finished(self, reason: str) -> None:
    with self._lock:
      self.finished[reason] += 1


# ---- server state: the engine loads in the background --------------------------------------------


class ServerState:
  """The engine loop once loaded, the settings the handlers need, and the requests in flight."""

  def __init__(self, engine_factory: Callable[[], Any], model_name: str, api_key: str | None):
    self.model_name, self.api_key = model_name, api_key
    self.engine: Any = None
    self.loop: Any = None
    self.load_error: str | None = None
    self.loaded = threading.Event()  # set when loading ended, well or not
    self.created = int(time.time())
    self.metrics = Metrics()
    self.active: set[str] = set()
    self._lock = threading.Lock()
    self._closed = False
    threading.Thread(target=self._load, args=(engine_factory,), name="tinyvllm-load", daemon=True).start()

  @property
  def ready(self) -> bool:
    return self.loop is not None and not self._closed

  def _load(self, engine_factory: Callable[[], Any]) -> None:
    try:
      from tinyvllm_core import EngineLoop

      engine = engine_factory()
      self.engine, self.loop = engine, EngineLoop(engine)
    except Exception as e:  # shown by /health and by the CLI
      self.load_error = one_line(e) or repr(e)
    finally:
      self.loaded.set()

  def wait_ready(self, timeout: float | None = None) -> bool:
    return self.loaded.wait(timeout) and self.loop is not None

  def track(self, request_id: str, active: bool) -> None:
    with self._lock:
      if active:
        self.active.add(request_id)
      else:
        self.active.discard(request_id)

  def close(self, grace_s: float = 2.0) -> None:
    """Abort what is in flight, give the handlers a moment to answer, stop the engine loop."""
    if self._closed or self.loop is None:
      self._closed = True
      return
    self._closed = True
    with self._lock:
      running = list(self.active)
    for request_id in running:
      self.loop.abort(request_id)
    deadline = time.monotonic() + grace_s
    while self.active and time.monotonic() < deadline:
      time.sleep(0.02)
    self.loop.shutdown()


# ---- request parsing -----------------------------------------------------------------------------

_KINDS = {
  int: "an integer",
  float: "a number",
  bool: "a boolean",
  str: "a string",
  dict: "an object",
  list: "an array",
  (str, list): "a string or an array of strings",
}


def _get(body: dict, name: str, kind: type, default: Any = None) -> Any:
  """body[name] checked against a JSON type; absent or null gives the default."""
  value = body.get(name)
  if value is None:
    return default
  accepted = (int, float) if kind is float else kind  # a JSON integer is a number too
  bool_as_number = isinstance(value, bool) and kind is not bool  # True is an int to Python, not to JSON
  if not isinstance(value, accepted) or bool_as_number:
    raise ApiError(400, f"'{name}' must be {_KINDS[kind]}", name, "invalid_type")
  return value


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def parse_json_object(raw: bytes) -> dict:
  try:
    body = json.loads(raw)
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    raise ApiError(400, f"the request body is not valid JSON ({one_line(e)})", code="invalid_json") from None
  if not isinstance(body, dict):
    raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
  return body


@dataclass
class GenerateRequest:
  prompt_ids: list[int]
  params: Any  # SamplingParams
  stream: bool
  include_usage: bool
  chat: bool


def parse_request(body: dict, state: ServerState, chat: bool) -> GenerateRequest:
  _check_model(body, state.model_name)
  if _get(body, "n", int, 1) != 1:
    raise ApiError(400, "only n=1 is supported", "n", "unsupported_value")
  ids = chat_prompt(body, state.engine) if chat else completion_prompt(body, state.engine)
  check_prompt_ids(ids, state.engine)
  stream = _get(body, "stream", bool, False)
  include_usage = _get(_get(body, "stream_options", dict, {}), "include_usage", bool, False)
  params = sampling_params(body, state.engine, len(ids), chat)
  return GenerateRequest(ids, params, stream, include_usage, chat)


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


def chat_prompt(body: dict, engine: Any) -> list[int]:
  messages = body.get("messages")
  if messages is None:
    raise ApiError(400, "'messages' is required", "messages", "missing_field")
  if not isinstance(messages, list) or not messages:
    message = "'messages' must be a non-empty array of {role, content} objects"
    raise ApiError(400, message, "messages", "invalid_type")
  kwargs = _get(body, "chat_template_kwargs", dict, {})
  checked = [_message(m, i) for i, m in enumerate(messages)]
  try:
    return engine.apply_chat_template(checked, tokenize=True, add_generation_prompt=True, **kwargs)
  except (ValueError, TypeError) as e:
    raise ApiError(400, f"the chat template rejected the messages: {one_line(e)}", "messages") from None


def _message(m: Any, i: int) -> dict:
  param = f"messages[{i}]"
  if not isinstance(m, dict):
    raise ApiError(400, f"'{param}' must be an object with role and content", param, "invalid_type")
  role, content = _get(m, "role", str), m.get("content")
  if role is None:
    raise ApiError(400, f"'{param}.role' is required", f"{param}.role", "missing_field")
  if _is_text_parts(content):
    content = "".join(part["text"] for part in content)
  if content is not None and not isinstance(content, str):
    message = f"'{param}.content' must be a string or a list of text parts"
    raise ApiError(400, message, f"{param}.content", "invalid_type")
  return {"role": role, "content": content or ""}


def _is_text_parts(content: Any) -> bool:
  """OpenAI's list form of a message's content: [{"type": "text", "text": "..."}, ...]."""
  return isinstance(content, list) and all(map(_is_text_part, content))


def _is_text_part(part: Any) -> bool:
  return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def check_prompt_ids(ids: list[int], engine: Any) -> None:
  """The core's prompt rule (not empty, shorter than the context, ids in the vocabulary) as a 400 on 'prompt'."""
  from tinyvllm_core import check_prompt

  try:
    check_prompt(ids, engine.max_model_len, engine.model_config.vocab_size)
  except ValueError as e:
    code = "context_length_exceeded" if len(ids) >= engine.max_model_len else "invalid_value"
    raise ApiError(400, str(e), "prompt", code) from None


def sampling_params(body: dict, engine: Any, prompt_len: int, chat: bool) -> Any:
  """The model's default SamplingParams with the request's fields; a value SamplingParams rejects is a 400."""
  max_tokens = _max_tokens(body, engine.max_model_len, prompt_len, chat)
  fields = _sampling_overrides(body, engine.model_config.vocab_size)
  fields |= {"seed": _get(body, "seed", int), "max_tokens": max_tokens, "stop": _stop(body)}
  fields |= {"stop_token_ids": _stop_token_ids(body), "ignore_eos": _get(body, "ignore_eos", bool, False)}
  try:
    return dataclasses.replace(engine.default_params, **fields)
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


# ---- responses ---------------------------------------------------------------------------------


def usage(out: Any) -> dict:
  prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
  counts = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
  return counts | {"prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def _envelope(rid: str, model: str, kind: str) -> dict:
  return {"id": rid, "object": kind, "created": int(time.time()), "model": model}


def _chunk_kind(req: GenerateRequest) -> str:
  return "chat.completion.chunk" if req.chat else "text_completion"


def full_response(req: GenerateRequest, rid: str, model: str, out: Any) -> dict:
  choice = {"index": 0, "logprobs": None, "finish_reason": out.finish_reason}
  if req.chat:
    choice["message"] = {"role": "assistant", "content": out.text}
  else:
    choice["text"] = out.text
  kind = "chat.completion" if req.chat else "text_completion"
  return _envelope(rid, model, kind) | {"choices": [choice], "usage": usage(out)}


def chunk(
  req: GenerateRequest, rid: str, model: str, text: str | None, finish_reason: str | None, role: bool = False
) -> dict:
  if req.chat:
    choice = {"index": 0, "delta": _delta(text, role), "logprobs": None, "finish_reason": finish_reason}
  else:
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
  body = _envelope(rid, model, _chunk_kind(req)) | {"choices": [choice]}
  return body | ({"usage": None} if req.include_usage else {})


def _delta(text: str | None, role: bool) -> dict:
  if role:
    return {"role": "assistant", "content": ""}
  return {"content": text} if text else {}


def usage_chunk(req: GenerateRequest, rid: str, model: str, out: Any) -> dict:
  return _envelope(rid, model, _chunk_kind(req)) | {"choices": [], "usage": usage(out)}


def failed_output(out: Any) -> ApiError:
  if out.finish_reason == "abort":
    message = "the request was aborted (the server is shutting down)"
    return ApiError(503, message, type="server_error", code="aborted")
  return ApiError(500, f"generation failed: {out.error}", type="server_error", code="engine_error")


# ---- metrics text --------------------------------------------------------------------------------

HIT_RATE_HELP = "Prompt tokens found in the prefix cache / prompt tokens looked up."
# (metric, kind, help, key of the engine loop's stats)
SCALAR_METRICS = [
  ("num_requests_running", "gauge", "Requests in the running batch.", "num_running"),
  ("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", "num_waiting"),
  ("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (0-1).", "kv_cache_usage"),
  ("num_kv_blocks_free", "gauge", "Free KV cache blocks (cached prefixes count as free).", "num_free_blocks"),
  ("num_kv_blocks_total", "gauge", "KV cache blocks in the pool.", "num_total_blocks"),
  ("prefix_cache_hit_rate", "gauge", HIT_RATE_HELP, "prefix_cache_hit_rate"),
  ("prompt_tokens_total", "counter", "Prompt tokens received.", "num_prompt_tokens"),
  ("generation_tokens_total", "counter", "Tokens generated.", "num_generated_tokens"),
  ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.", "num_cached_tokens"),
]
# (metric, help, Metrics attribute)
HISTOGRAM_METRICS = [
  ("time_to_first_token_seconds", "Time to first token.", "ttft"),
  ("inter_token_latency_seconds", "Time between two output tokens of a request.", "itl"),
  ("e2e_request_latency_seconds", "Request latency, arrival to last token.", "e2e"),
]


def _escape(value: str) -> str:
  return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_header(name: str, kind: str, doc: str) -> list[str]:
  return [f"# HELP tinyvllm:{name} {doc}", f"# TYPE tinyvllm:{name} {kind}"]


def render_metrics(state: ServerState) -> str:
  stats, label = state.loop.stats(), f'model_name="{_escape(state.model_name)}"'
  lines = []
  for name, kind, doc, key in SCALAR_METRICS:
    lines += _metric_header(name, kind, doc) + [f"tinyvllm:{name}{{{label}}} {stats[key]}"]
  lines += _metric_header("request_finished_total", "counter", "Finished requests by reason.")
  for reason, n in sorted(state.metrics.finished.items()):
    lines.append(f'tinyvllm:request_finished_total{{{label},finished_reason="{reason}"}} {n}')
  for name, doc, attribute in HISTOGRAM_METRICS:
    histogram: Histogram = getattr(state.metrics, attribute)
    lines += _metric_header(name, "histogram", doc) + histogram.lines(f"tinyvllm:{name}", label)
  return "\n".join(lines) + "\n"


# ---- the HTTP handler ----------------------------------------------------------------------------


class JsonHandler(BaseHTTPRequestHandler):
  """HTTP/1.1 plumbing: a JSON request body in; JSON, text or server-sent events out; errors in OpenAI's shape."""

  protocol_version = default_request_version = "HTTP/1.1"
  max_body_bytes = MAX_BODY_BYTES  # make_server sets it, and `timeout` (the socket timeout that ends stalled clients)
  body_read = False  # whether this request's body was read: after an error without it, the connection is closed

  def log_message(self, format: str, *args: Any) -> None:
    pass  # no access log

  def handle_one_request(self) -> None:
    try:
      super().handle_one_request()
    except ConnectionError:
      self.close_connection = True  # the client went away between requests

  def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
    """The standard library's own errors (bad request line, headers too large...) in OpenAI's shape too."""
    self.close_connection = True
    self._send_json(code, ApiError(code, message or HTTPStatus(code).phrase).body())

  # ---- in ----
  def _read_json(self) -> dict:
    n = self._content_length()
    raw = self.rfile.read(n)
    if len(raw) < n:
      raise ConnectionResetError("the client closed the connection mid-body")
    self.body_read = True
    return parse_json_object(raw)

  def _content_length(self) -> int:
    """The body's declared length; refused when it is chunked, missing, not a number or over the limit."""
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      self._refuse(411, "chunked request bodies are not supported; send Content-Length", "length_required")
    length = self.headers.get("Content-Length")
    if length is None:
      self._refuse(411, "a request body with Content-Length is required", "length_required")
    if not length.strip().isdigit():
      self._refuse(400, f"Content-Length {length!r} is not a length", "invalid_request")
    n, limit = int(length), self.max_body_bytes
    if n > limit:
      self._drain(n)
      raise ApiError(413, f"the request body has {n} bytes; the limit is {limit}", code="request_too_large")
    return n

  def _refuse(self, status: int, message: str, code: str) -> NoReturn:
    """An error after which the connection is closed: where the body ends is unknown."""
    self.close_connection = True
    raise ApiError(status, message, code=code)

  def _drain(self, n: int) -> None:
    """Read and drop an oversized body (so the client can read the 413), or close if it is huge."""
    self.close_connection = True
    while 0 < n <= DRAIN_LIMIT_BYTES and (data := self.rfile.read(min(n, 1 << 16))):
      n -= len(data)

  def _client_gone(self) -> bool:
    try:
      readable, _, _ = select.select([self.connection], [], [], 0)
      return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
      return True

  # ---- out ----
  def _send_json(self, status: int, obj: dict) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    self._send(status, json.dumps(obj).encode(), "application/json", headers)

  def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
    headers = {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}
    try:
      self.send_response(status)
      for name, value in headers.items():
        self.send_header(name, value)
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(data)
    except (ConnectionError, TimeoutError):
      self.close_connection = True

  def _start_events(self) -> None:
    self.send_response(200)
    for name, value in SSE_HEADERS.items():
      self.send_header(name, value)
    self.end_headers()

  def _event(self, obj: dict) -> None:
    if self._client_gone():
      raise ConnectionResetError("client went away")
    self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

  def _write_chunk(self, data: bytes) -> None:
    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


class Handler(JsonHandler):
  """The OpenAI routes: each request is parsed, submitted to the engine loop and answered from its stream."""

  server_version = "tinyvllm-serve-lite"
  state: ServerState  # make_server sets it
  routes = {
    ("GET", "/health"): "_health",
    ("GET", "/v1/models"): "_models",
    ("GET", "/metrics"): "_metrics",
    ("POST", "/v1/completions"): "_completions",
    ("POST", "/v1/chat/completions"): "_chat",
  }

  # ---- dispatch ----
  def _dispatch(self) -> None:
    """Answer one request; every failure becomes an error in OpenAI's shape."""
    path, self.body_read = urlsplit(self.path).path.rstrip("/") or "/", False
    try:
      self._serve(path)
    except ApiError as e:
      self._answer_error(e)
    except (ConnectionError, TimeoutError):
      self.close_connection = True
    except Exception:  # a bug, never bad input: answer 500 and keep serving
      self._answer_bug()

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

  def _serve(self, path: str) -> None:
    route = self._route(path)
    if path != "/health":
      self._authorize()
    route()

  def _route(self, path: str) -> Callable[[], None]:
    if self.command == "GET" and path.startswith("/v1/models/"):
      return functools.partial(self._models, path.removeprefix("/v1/models/"))
    if name := self.routes.get((self.command, path)):
      return getattr(self, name)
    if any(p == path for _, p in self.routes):
      raise ApiError(405, f"{self.command} is not allowed on {path}", code="method_not_allowed")
    raise ApiError(404, f"no route {path}", code="not_found")

  def _authorize(self) -> None:
    key = self.state.api_key
    if not key:
      return
    sent, expected = self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()
    if not hmac.compare_digest(sent, expected):
      raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

  def _require_ready(self) -> None:
    if self.state.ready:
      return
    if self.state.load_error:
      message = f"the model failed to load: {self.state.load_error}"
      raise ApiError(503, message, type="server_error", code="load_failed")
    message = "the model is still loading; retry when /health answers 200"
    raise ApiError(503, message, type="server_error", code="model_loading")

  def _answer_error(self, e: ApiError) -> None:
    if self.command != "GET" and not self.body_read:
      self.close_connection = True  # its unread body would poison the next request
    self._send_json(e.status, e.body())

  def _answer_bug(self) -> None:
    traceback.print_exc(file=sys.stderr)
    self.close_connection = True
    self._send_json(500, ApiError(500, "internal server error", type="server_error").body())

  # ---- GET ----
  def _health(self) -> None:
    if self.state.ready:
      self._send_json(200, {"status": "ok"})
    elif self.state.load_error:
      self._send_json(503, {"status": "error", "error": self.state.load_error})
    else:
      self._send_json(503, {"status": "loading"})

  def _models(self, model_id: str | None = None) -> None:
    self._require_ready()
    if model_id is None:
      return self._send_json(200, {"object": "list", "data": [self._model_card()]})
    if model_id != self.state.model_name:
      raise ApiError(404, f"the model '{model_id}' does not exist", "model", "model_not_found")
    self._send_json(200, self._model_card())

  def _model_card(self) -> dict:
    state = self.state
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "tinyvllm"}
    return card | {"max_model_len": state.engine.max_model_len}

  def _metrics(self) -> None:
    self._require_ready()
    self._send(200, render_metrics(self.state).encode(), PROMETHEUS_TEXT)

  # ---- POST ----
  def _completions(self) -> None:
    self._generate(chat=False)

  def _chat(self) -> None:
    self._generate(chat=True)

  def _generate(self, chat: bool) -> None:
    body = self._read_json()
    self._require_ready()
    req = parse_request(body, self.state, chat)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    self.state.track(rid, True)
    try:
      stream = self.state.loop.submit(req.prompt_ids, req.params, request_id=rid)
      if req.stream:
        self._stream(req, rid, stream)
      else:
        self._respond(req, rid, stream)
    finally:
      self.state.track(rid, False)

  def _respond(self, req: GenerateRequest, rid: str, stream: Any) -> None:
    """Answer with the whole completion once it is finished."""
    out = self._final_output(rid, stream)
    if out.finish_reason not in ("stop", "length"):
      raise failed_output(out)
    self._send_json(200, full_response(req, rid, self.state.model_name, out))

  def _final_output(self, rid: str, stream: Any) -> Any:
    """The stream's last output; a client that hangs up meanwhile aborts the request and gets no answer."""
    gone, out = False, None
    for out in self._timed(stream):
      if not gone and self._client_gone():
        gone = True
        self.state.loop.abort(rid)
    if gone:
      raise ConnectionResetError("client went away")
    return out

  def _stream(self, req: GenerateRequest, rid: str, stream: Any) -> None:
    """Answer with server-sent events as the text grows; a client that hangs up aborts the request."""
    self._start_events()
    out = None
    try:
      if req.chat:
        self._event(chunk(req, rid, self.state.model_name, None, None, role=True))
      for out in self._timed(stream):  # delta_text: the engine holds back what may still become a stop string
        if not self._send_delta(req, rid, out, out.delta_text):
          break
      self._end_events(req, rid, out)
    except (ConnectionError, TimeoutError):
      if out is None or not out.finished:
        self._abort(rid)
      raise

  def _send_delta(self, req: GenerateRequest, rid: str, out: Any, text: str) -> bool:
    """The event for one output: its new text, or the error that ended it (then False: no more events)."""
    if out.finish_reason in ("abort", "error"):
      self._event(failed_output(out).body())
      return False
    if text or out.finished:
      self._event(chunk(req, rid, self.state.model_name, text, out.finish_reason))
    return True

  def _end_events(self, req: GenerateRequest, rid: str, out: Any) -> None:
    if req.include_usage and out is not None:
      self._event(usage_chunk(req, rid, self.state.model_name, out))
    self._write_chunk(b"data: [DONE]\n\n")
    self._write_chunk(b"")  # the last chunk of a chunked body

  def _abort(self, rid: str) -> None:
    self.state.loop.abort(rid)
    self.state.metrics.count_finished("abort")

  def _timed(self, stream: Any) -> Iterator[Any]:
    """The stream's outputs, recording latency metrics as they arrive."""
    last, out = None, None
    for out in stream:
      now = time.perf_counter()
      if out.delta_token_ids:
        if last is not None:
          self.state.metrics.itl.observe(now - last)
        last = now
      yield out
    self._record_finish(stream, out)

  def _record_finish(self, stream: Any, out: Any) -> None:
    metrics = self.state.metrics
    metrics.count_finished(out.finish_reason)
    if stream.ttft is not None:
      metrics.ttft.observe(stream.ttft)
    if stream.finish_time is not None:
      metrics.e2e.observe(stream.finish_time - stream.arrival_time)


class Server(ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 1024  # listen backlog: the default 5 overflows when many clients connect at once


class Server6(Server):
  address_family = socket.AF_INET6


def make_server(
  engine_factory: Callable[[], Any],
  host: str = "127.0.0.1",
  port: int = 8000,
  api_key: str | None = None,
  model_name: str = "model",
  max_body_bytes: int = MAX_BODY_BYTES,
  timeout_s: float = SOCKET_TIMEOUT_S,
) -> tuple[Server, ServerState]:
  """Bind host:port now and load the engine in the background; call serve_forever() on the server."""
  handler = type("BoundHandler", (Handler,), {"timeout": timeout_s, "max_body_bytes": max_body_bytes})
  server = (Server6 if ":" in host else Server)((host, port), handler)
  handler.state = ServerState(engine_factory, model_name, api_key)
  return server, handler.state


# ---- the command ---------------------------------------------------------------------------------

HOST_HELP = "Address to listen on; 0.0.0.0 exposes the server to the network."
API_KEY_HELP = "Require 'Authorization: Bearer KEY' on every endpoint but /health."
SERVED_NAME_HELP = "Model id clients send (default: the --model value)."
TIMEOUT_HELP = "Seconds a stalled client may keep its connection idle."
WARMUP_HELP = "Capture the common batch shapes before answering /health with 200."


def serve_lite(
  model: ModelOption = None,
  device: DeviceOption = None,
  host: Annotated[str, typer.Option(help=HOST_HELP)] = "127.0.0.1",
  port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
  api_key: Annotated[str | None, typer.Option(envvar="TINYVLLM_API_KEY", show_default=False, help=API_KEY_HELP)] = None,
  max_num_seqs: Annotated[int, typer.Option(min=1, help="Most sequences in the running batch.")] = 32,
  max_model_len: MaxModelLenOption = None,
  kv_cache_gb: KvCacheGbOption = 1.0,
  served_model_name: Annotated[str | None, typer.Option(show_default=False, help=SERVED_NAME_HELP)] = None,
  timeout: Annotated[float, typer.Option(min=0.1, help=TIMEOUT_HELP)] = SOCKET_TIMEOUT_S,
  quantize: QuantizeOption = None,
  dtype: DtypeOption = "auto",
  beam: BeamOption = 0,
  warmup: Annotated[bool, typer.Option(help=WARMUP_HELP)] = True,
) -> None:
  """Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health,
  /metrics."""
  path = _checked_model_path(model, device, dtype)
  engine_kwargs = dict(device=device, kv_cache_gb=kv_cache_gb, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
  engine_kwargs |= dict(quantize=quantize_setting(quantize), dtype=dtype, beam=beam)
  load = functools.partial(_load_engine, path, engine_kwargs, warmup)
  name = served_model_name or _default_name(model, path)
  server, state = _listen(load, host, port, api_key, name, timeout)
  thread = threading.Thread(target=server.serve_forever, name="tinyvllm-http", daemon=True)
  thread.start()
  url = f"http://{host}:{server.server_address[1]}/v1"
  say(f"serve-lite: {url} serving {name}; loading {path} (/health answers 503 until ready)")
  _serve_until_stopped(server, state, thread)
  if state.load_error:
    fail(f"could not load {path}: {state.load_error}")
  say(f"serve-lite stopped ({sum(state.metrics.finished.values())} requests served)")


def _checked_model_path(model: str | None, device: str | None, dtype: str) -> Path:
  """The model's path, after the checks that can fail before the port is bound or the model loads."""
  try:
    check_dtype(dtype)
    path = models.resolve_model(model)
    check_dtype_compiles(dtype, device)  # here in the main thread: it briefly redirects stderr
  except (ValueError, models.ModelNotFoundError) as e:
    fail(e)
  return path


def _default_name(model: str | None, path: Path) -> str:
  if model:
    return model
  if (pulled := models.last_pulled()) and pulled[1] == path:
    return pulled[0]
  return models.EMBEDDED_ALIAS if path == models.embedded_model_path() else path.name


def _load_engine(path: Path, engine_kwargs: dict, warmup: bool) -> Any:
  """The engine, with the common batch shapes captured when asked (runs on the loading thread)."""
  from tinyvllm_core import LLMEngine

  from tinyvllm_cli.warmup import warm_up

  engine = LLMEngine(path, **engine_kwargs)
  if warmup:
    beam = engine_kwargs["beam"]
    say(f"warming up: capturing the common batch shapes{f' with BEAM={beam} search' if beam else ''} ...")
    warm_up(engine, engine_kwargs["max_num_seqs"])
  return engine


def _listen(load: Callable[[], Any], host: str, port: int, api_key: str | None, name: str, timeout: float):
  try:
    server, state = make_server(load, host, port, api_key, name, timeout_s=timeout)
  except OSError as e:
    fail(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host")
  if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
    warning = f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model"
    err.print(warning, soft_wrap=True)
  return server, state


def _serve_until_stopped(server: Server, state: ServerState, thread: threading.Thread) -> None:
  """Serve until Ctrl+C (or until the model fails to load), then stop the server and the engine loop."""
  try:
    _wait(state, thread)
  except KeyboardInterrupt:
    pass
  finally:
    server.shutdown()
    server.server_close()
    state.close()


def _wait(state: ServerState, thread: threading.Thread) -> None:
  while not state.loaded.wait(0.5):
    pass
  if state.load_error:
    return
  engine = state.engine
  say(
    f"ready: {state.model_name} on {engine.device}, context {engine.max_model_len} tokens, "
    f"up to {engine.config.max_num_seqs} sequences at once (Ctrl+C stops)"
  )
  p = engine.default_params
  say(
    f"sampling defaults (requests may override): temperature {p.temperature}, top_p {p.top_p}, top_k {p.top_k}, "
    f"min_p {p.min_p}, repetition_penalty {p.repetition_penalty}; from {engine.default_params_source}"
  )
  for note in engine.files.notes:  # what was dequantized at load, a context the KV budget capped
    say(note)
  while thread.is_alive():
    thread.join(0.5)
