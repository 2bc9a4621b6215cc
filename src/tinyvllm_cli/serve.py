"""`tinyvllm serve-lite`: an OpenAI-compatible HTTP server on the standard library. One thread per
connection parses the request and streams its own output; the engine loop batches all of them."""
from __future__ import annotations

import dataclasses
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from tinyvllm_cli import models
from tinyvllm_cli.engine_options import DTYPE_HELP, DTYPE_METAVAR, check_dtype, check_dtype_compiles
from tinyvllm_cli.ui import err, fail, one_line, say

MAX_BODY_BYTES = 4 << 20
DRAIN_LIMIT_BYTES = 16 << 20  # an oversized body up to this size is read and dropped so the client sees the 413
SOCKET_TIMEOUT_S = 30.0
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ApiError(Exception):
  """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error"):
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
        if value <= bound: self.counts[i] += 1

  def lines(self, name: str, labels: str) -> list[str]:
    with self._lock:
      out = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
      return out + [f'{name}_bucket{{{labels},le="+Inf"}} {self.count}', f"{name}_sum{{{labels}}} {self.sum}",
                    f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
  """What the engine's stats do not hold: latency histograms and finished requests by reason."""
  def __init__(self):
    self.ttft, self.itl, self.e2e = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)
    self.finished: Counter[str] = Counter()
    self._lock = threading.Lock()

  def count_finished(self, reason: str) -> None:
    with self._lock: self.finished[reason] += 1


# ---- server state: the engine loads in the background --------------------------------------------

class ServerState:
  """The engine loop once loaded, the settings the handlers need, and the requests in flight."""
  def __init__(self, engine_factory: Callable[[], Any], model_name: str, api_key: str | None, max_body_bytes: int):
    self.model_name, self.api_key, self.max_body_bytes = model_name, api_key, max_body_bytes
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
  def ready(self) -> bool: return self.loop is not None and not self._closed

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
      if active: self.active.add(request_id)
      else: self.active.discard(request_id)

  def close(self, grace_s: float = 2.0) -> None:
    """Abort what is in flight, give the handlers a moment to answer, stop the engine loop."""
    if self._closed or self.loop is None:
      self._closed = True
      return
    self._closed = True
    with self._lock: running = list(self.active)
    for request_id in running: self.loop.abort(request_id)
    deadline = time.monotonic() + grace_s
    while self.active and time.monotonic() < deadline: time.sleep(0.02)
    self.loop.shutdown()


# ---- request parsing -----------------------------------------------------------------------------

_KINDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", dict: "an object", list: "an array",
          (str, list): "a string or an array of strings"}


def _get(body: dict, name: str, kind: type, default: Any = None) -> Any:
  """body[name] checked against a JSON type; absent or null gives the default."""
  value = body.get(name)
  if value is None: return default
  ok = isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool))
  if not ok: raise ApiError(400, f"'{name}' must be {_KINDS[kind]}", name, "invalid_type")
  return value


@dataclass
class GenerateRequest:
  prompt_ids: list[int]
  params: Any  # SamplingParams
  stream: bool
  include_usage: bool
  chat: bool


def parse_request(body: dict, state: ServerState, chat: bool) -> GenerateRequest:
  model = _get(body, "model", str)
  if model is not None and model != state.model_name:
    raise ApiError(404, f"the model '{model}' does not exist; this server serves '{state.model_name}'", "model", "model_not_found")
  if _get(body, "n", int, 1) != 1: raise ApiError(400, "only n=1 is supported", "n", "unsupported_value")
  ids = chat_prompt(body, state.engine) if chat else completion_prompt(body, state.engine)
  check_prompt(ids, state.engine)
  stream = _get(body, "stream", bool, False)
  include_usage = _get(_get(body, "stream_options", dict, {}), "include_usage", bool, False)
  return GenerateRequest(ids, sampling_params(body, state.engine, len(ids), chat), stream, include_usage, chat)


def completion_prompt(body: dict, engine: Any) -> list[int]:
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)): prompt = prompt[0]
  if isinstance(prompt, str): return engine.encode(prompt) if prompt else []
  if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt): return list(prompt)
  if prompt is None: raise ApiError(400, "'prompt' is required", "prompt", "missing_field")
  raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt", "invalid_type")


def chat_prompt(body: dict, engine: Any) -> list[int]:
  messages = body.get("messages")
  if messages is None: raise ApiError(400, "'messages' is required", "messages", "missing_field")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", "messages", "invalid_type")
  kwargs = _get(body, "chat_template_kwargs", dict, {})
  try: return engine.apply_chat_template([_message(m, i) for i, m in enumerate(messages)], tokenize=True,
                                         add_generation_prompt=True, **kwargs)
  except (ValueError, TypeError) as e:
    raise ApiError(400, f"the chat template rejected the messages: {one_line(e)}", "messages") from None


def _message(m: Any, i: int) -> dict:
  param = f"messages[{i}]"
  if not isinstance(m, dict): raise ApiError(400, f"'{param}' must be an object with role and content", param, "invalid_type")
  role, content = _get(m, "role", str), m.get("content")
  if role is None: raise ApiError(400, f"'{param}.role' is required", f"{param}.role", "missing_field")
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
    content = "".join(p["text"] for p in content)
  if content is not None and not isinstance(content, str):
    raise ApiError(400, f"'{param}.content' must be a string or a list of text parts", f"{param}.content", "invalid_type")
  return {"role": role, "content": content or ""}


def check_prompt(ids: list[int], engine: Any) -> None:
  if not ids: raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
  if len(ids) >= engine.max_model_len:
    raise ApiError(400, f"this model's maximum context length is {engine.max_model_len} tokens, but the prompt has "
                        f"{len(ids)} tokens; shorten it", "prompt", "context_length_exceeded")
  vocab = engine.model_config.vocab_size
  if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
    raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt", "invalid_value")


def sampling_params(body: dict, engine: Any, prompt_len: int, chat: bool) -> Any:
  room = engine.max_model_len - prompt_len
  max_tokens = _get(body, "max_completion_tokens", int, _get(body, "max_tokens", int, room if chat else 16))
  param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  if max_tokens < 1: raise ApiError(400, f"'{param}' must be at least 1", param, "invalid_value")
  if max_tokens > room:
    raise ApiError(400, f"this model's maximum context length is {engine.max_model_len} tokens; the prompt has {prompt_len} "
                        f"and {param} asks for {max_tokens} more (at most {room})", param, "context_length_exceeded")
  top_k = _get(body, "top_k", int)
  overrides = {"temperature": _get(body, "temperature", float), "top_p": _get(body, "top_p", float),
               "top_k": 0 if top_k and top_k >= engine.model_config.vocab_size else top_k, "min_p": _get(body, "min_p", float)}
  try:
    return dataclasses.replace(engine.default_params, **{k: v for k, v in overrides.items() if v is not None},
                               seed=_get(body, "seed", int), max_tokens=max_tokens, stop=_stop(body),
                               stop_token_ids=_stop_token_ids(body), ignore_eos=_get(body, "ignore_eos", bool, False))
  except ValueError as e:
    raise ApiError(400, str(e).removeprefix("SamplingParams: "), None, "invalid_value") from None


def _stop(body: dict) -> list[str]:
  stop = _get(body, "stop", (str, list), [])
  stop = [stop] if isinstance(stop, str) else stop
  if not all(isinstance(s, str) and s for s in stop):
    raise ApiError(400, "'stop' must be a string or an array of non-empty strings", "stop", "invalid_type")
  return stop


def _stop_token_ids(body: dict) -> list[int]:
  ids = _get(body, "stop_token_ids", list, [])
  if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
    raise ApiError(400, "'stop_token_ids' must be an array of integers", "stop_token_ids", "invalid_type")
  return ids


# ---- responses ---------------------------------------------------------------------------------

def usage(out: Any) -> dict:
  prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
          "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def full_response(req: GenerateRequest, rid: str, model: str, out: Any) -> dict:
  choice = {"index": 0, "logprobs": None, "finish_reason": out.finish_reason}
  if req.chat: choice["message"] = {"role": "assistant", "content": out.text}
  else: choice["text"] = out.text
  return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
          "model": model, "choices": [choice], "usage": usage(out)}


def chunk(req: GenerateRequest, rid: str, model: str, text: str | None, finish_reason: str | None,
          role: bool = False) -> dict:
  if req.chat:
    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
  else:
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
  body = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": int(time.time()),
          "model": model, "choices": [choice]}
  return body | ({"usage": None} if req.include_usage else {})


def usage_chunk(req: GenerateRequest, rid: str, model: str, out: Any) -> dict:
  return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": int(time.time()),
          "model": model, "choices": [], "usage": usage(out)}


def text_deltas(outputs: Iterable[Any], stop: list[str]) -> Iterator[tuple[Any, str]]:
  """(output, new text) pairs that add up to the final text: the tail that may still become a stop string
  (which the final text leaves out) is held back until it cannot."""
  holdback, sent = max(map(len, stop), default=1) - 1, 0
  for out in outputs:
    end = len(out.text) if out.finished else max(sent, len(out.text) - holdback)
    yield out, out.text[sent:end]
    sent = end


def failed_output(out: Any) -> ApiError:
  if out.finish_reason == "abort": return ApiError(503, "the request was aborted (the server is shutting down)", type="server_error", code="aborted")
  return ApiError(500, f"generation failed: {out.error}", type="server_error", code="engine_error")


# ---- metrics text --------------------------------------------------------------------------------

def _escape(value: str) -> str: return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(state: ServerState) -> str:
  s, label = state.loop.stats(), f'model_name="{_escape(state.model_name)}"'
  scalars = [("num_requests_running", "gauge", "Requests in the running batch.", s["num_running"]),
             ("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", s["num_waiting"]),
             ("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (0-1).", s["kv_cache_usage"]),
             ("num_kv_blocks_free", "gauge", "Free KV cache blocks (cached prefixes count as free).", s["num_free_blocks"]),
             ("num_kv_blocks_total", "gauge", "KV cache blocks in the pool.", s["num_total_blocks"]),
             ("prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache / prompt tokens looked up.", s["prefix_cache_hit_rate"]),
             ("prompt_tokens_total", "counter", "Prompt tokens received.", s["num_prompt_tokens"]),
             ("generation_tokens_total", "counter", "Tokens generated.", s["num_generated_tokens"]),
             ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.", s["num_cached_tokens"])]
  lines = []
  for name, kind, doc, value in scalars:
    lines += [f"# HELP tinyvllm:{name} {doc}", f"# TYPE tinyvllm:{name} {kind}", f"tinyvllm:{name}{{{label}}} {value}"]
  lines += ["# HELP tinyvllm:request_finished_total Finished requests by reason.", "# TYPE tinyvllm:request_finished_total counter"]
  lines += [f'tinyvllm:request_finished_total{{{label},finished_reason="{r}"}} {n}' for r, n in sorted(state.metrics.finished.items())]
  for name, doc, hist in [("time_to_first_token_seconds", "Time to first token.", state.metrics.ttft),
                          ("inter_token_latency_seconds", "Time between two output tokens of a request.", state.metrics.itl),
                          ("e2e_request_latency_seconds", "Request latency, arrival to last token.", state.metrics.e2e)]:
    lines += [f"# HELP tinyvllm:{name} {doc}", f"# TYPE tinyvllm:{name} histogram", *hist.lines(f"tinyvllm:{name}", label)]
  return "\n".join(lines) + "\n"


# ---- the HTTP handler ----------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
  protocol_version = default_request_version = "HTTP/1.1"
  server_version = "tinyvllm-serve-lite"
  state: ServerState  # make_server sets it, and `timeout` (the socket timeout that ends stalled clients)
  routes = {("GET", "/health"): "_health", ("GET", "/v1/models"): "_models", ("GET", "/metrics"): "_metrics",
            ("POST", "/v1/completions"): "_completions", ("POST", "/v1/chat/completions"): "_chat"}

  def log_message(self, format: str, *args: Any) -> None: pass

  def handle_one_request(self) -> None:
    try: super().handle_one_request()
    except ConnectionError: self.close_connection = True  # the client went away between requests

  def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
    """The standard library's own errors (bad request line, headers too large...) in OpenAI's shape too."""
    self.close_connection = True
    self._send_json(code, ApiError(code, message or HTTPStatus(code).phrase).body())

  def _dispatch(self) -> None:
    path, self.body_read = urlsplit(self.path).path.rstrip("/") or "/", False
    try:
      route = self._route(path)
      if path != "/health": self._authorize()
      route()
    except ApiError as e:
      if self.command != "GET" and not self.body_read: self.close_connection = True  # its unread body would poison the next request
      self._send_json(e.status, e.body())
    except (ConnectionError, TimeoutError):
      self.close_connection = True
    except Exception:  # a bug, never bad input: answer 500 and keep serving
      traceback.print_exc(file=sys.stderr)
      self.close_connection = True
      self._send_json(500, ApiError(500, "internal server error", type="server_error").body())

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

  def _route(self, path: str) -> Callable[[], None]:
    if self.command == "GET" and path.startswith("/v1/models/"): return lambda: self._models(path.removeprefix("/v1/models/"))
    if (name := self.routes.get((self.command, path))): return getattr(self, name)
    if any(p == path for _, p in self.routes): raise ApiError(405, f"{self.command} is not allowed on {path}", code="method_not_allowed")
    raise ApiError(404, f"no route {path}", code="not_found")

  def _authorize(self) -> None:
    key = self.state.api_key
    if key and not hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
      raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

  def _require_ready(self) -> None:
    if self.state.ready: return
    if self.state.load_error: raise ApiError(503, f"the model failed to load: {self.state.load_error}", type="server_error", code="load_failed")
    raise ApiError(503, "the model is still loading; retry when /health answers 200", type="server_error", code="model_loading")

  # ---- GET ----
  def _health(self) -> None:
    if self.state.ready: self._send_json(200, {"status": "ok"})
    elif self.state.load_error: self._send_json(503, {"status": "error", "error": self.state.load_error})
    else: self._send_json(503, {"status": "loading"})

  def _models(self, model_id: str | None = None) -> None:
    self._require_ready()
    card = {"id": self.state.model_name, "object": "model", "created": self.state.created, "owned_by": "tinyvllm",
            "max_model_len": self.state.engine.max_model_len}
    if model_id is None: return self._send_json(200, {"object": "list", "data": [card]})
    if model_id != self.state.model_name: raise ApiError(404, f"the model '{model_id}' does not exist", "model", "model_not_found")
    self._send_json(200, card)

  def _metrics(self) -> None:
    self._require_ready()
    self._send(200, render_metrics(self.state).encode(), "text/plain; version=0.0.4; charset=utf-8")

  # ---- POST ----
  def _completions(self) -> None: self._generate(chat=False)
  def _chat(self) -> None: self._generate(chat=True)

  def _generate(self, chat: bool) -> None:
    body = self._read_json()
    self._require_ready()
    req = parse_request(body, self.state, chat)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    self.state.track(rid, True)
    try:
      stream = self.state.loop.submit(req.prompt_ids, req.params, request_id=rid)
      if req.stream: self._stream(req, rid, stream)
      else: self._respond(req, rid, stream)
    finally:
      self.state.track(rid, False)

  def _respond(self, req: GenerateRequest, rid: str, stream: Any) -> None:
    gone, out = False, None
    for out in self._timed(stream):
      if not gone and self._client_gone():
        gone = True
        self.state.loop.abort(rid)
    if gone: raise ConnectionResetError("client went away")
    if out.finish_reason not in ("stop", "length"): raise failed_output(out)
    self._send_json(200, full_response(req, rid, self.state.model_name, out))

  def _stream(self, req: GenerateRequest, rid: str, stream: Any) -> None:
    self.send_response(200)
    for k, v in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked")):
      self.send_header(k, v)
    self.end_headers()
    model, out = self.state.model_name, None
    try:
      if req.chat: self._event(chunk(req, rid, model, None, None, role=True))
      for out, text in text_deltas(self._timed(stream), req.params.stop):
        if out.finish_reason in ("abort", "error"):
          self._event(failed_output(out).body())
          break
        if text or out.finished: self._event(chunk(req, rid, model, text, out.finish_reason))
      if req.include_usage and out is not None: self._event(usage_chunk(req, rid, model, out))
      self._write_chunk(b"data: [DONE]\n\n")
      self._write_chunk(b"")
    except (ConnectionError, TimeoutError):
      if out is None or not out.finished:
        self.state.loop.abort(rid)
        self.state.metrics.count_finished("abort")
      raise

  def _timed(self, stream: Any):
    """The stream's outputs, recording latency metrics as they arrive."""
    last, out = None, None
    for out in stream:
      now = time.perf_counter()
      if last is not None and out.delta_token_ids: self.state.metrics.itl.observe(now - last)
      if out.delta_token_ids: last = now
      yield out
    self.state.metrics.count_finished(out.finish_reason)
    if stream.ttft is not None: self.state.metrics.ttft.observe(stream.ttft)
    if stream.finish_time is not None: self.state.metrics.e2e.observe(stream.finish_time - stream.arrival_time)

  # ---- I/O ----
  def _read_json(self) -> dict:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      self.close_connection = True
      raise ApiError(411, "chunked request bodies are not supported; send Content-Length", code="length_required")
    length = self.headers.get("Content-Length")
    if length is None:
      self.close_connection = True
      raise ApiError(411, "a request body with Content-Length is required", code="length_required")
    if not length.strip().isdigit():
      self.close_connection = True
      raise ApiError(400, f"Content-Length {length!r} is not a length", code="invalid_request")
    n, limit = int(length), self.state.max_body_bytes
    if n > limit:
      self._drain(n)
      raise ApiError(413, f"the request body has {n} bytes; the limit is {limit}", code="request_too_large")
    raw = self.rfile.read(n)
    if len(raw) < n: raise ConnectionResetError("the client closed the connection mid-body")
    self.body_read = True
    try: body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
      raise ApiError(400, f"the request body is not valid JSON ({one_line(e)})", code="invalid_json") from None
    if not isinstance(body, dict): raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body

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

  def _send_json(self, status: int, obj: dict) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    self._send(status, json.dumps(obj).encode(), "application/json", headers)

  def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
    try:
      self.send_response(status)
      for k, v in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items(): self.send_header(k, v)
      if self.close_connection: self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(data)
    except (ConnectionError, TimeoutError):
      self.close_connection = True

  def _event(self, obj: dict) -> None:
    if self._client_gone(): raise ConnectionResetError("client went away")
    self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

  def _write_chunk(self, data: bytes) -> None:
    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


class Server(ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 1024  # listen backlog: the default 5 overflows when many clients connect at once


class Server6(Server):
  address_family = socket.AF_INET6


def make_server(engine_factory: Callable[[], Any], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                model_name: str = "model", max_body_bytes: int = MAX_BODY_BYTES,
                timeout_s: float = SOCKET_TIMEOUT_S) -> tuple[Server, ServerState]:
  """Bind host:port now and load the engine in the background; call serve_forever() on the server."""
  handler = type("BoundHandler", (Handler,), {"timeout": timeout_s})
  server = (Server6 if ":" in host else Server)((host, port), handler)
  handler.state = ServerState(engine_factory, model_name, api_key, max_body_bytes)
  return server, handler.state


# ---- the command ---------------------------------------------------------------------------------

def _default_name(model: str | None, path: Path) -> str:
  if model: return model
  if (pulled := models.last_pulled()) and pulled[1] == path: return pulled[0]
  return models.EMBEDDED_ALIAS if path == models.embedded_model_path() else path.name


def _wait(state: ServerState, thread: threading.Thread) -> None:
  while not state.loaded.wait(0.5): pass
  if state.load_error: return
  engine = state.engine
  say(f"ready: {state.model_name} on {engine.device}, context {engine.max_model_len} tokens, "
      f"up to {engine.config.max_num_seqs} sequences at once (Ctrl+C stops)")
  while thread.is_alive(): thread.join(0.5)


def serve_lite(
  model: Annotated[str | None, typer.Option("--model", "-m", show_default=False,
                   help="Model folder, .gguf file or pulled repo id (default: the last pulled model, else the embedded SmolLM2).")] = None,
  device: Annotated[str | None, typer.Option(help="tinygrad backend: CPU, METAL, CUDA, AMD... (default: DEV or tinygrad's choice).",
                    show_default=False)] = None,
  host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
  port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
  api_key: Annotated[str | None, typer.Option(envvar="TINYVLLM_API_KEY", show_default=False,
                     help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")] = None,
  max_num_seqs: Annotated[int, typer.Option(min=1, help="Most sequences in the running batch.")] = 32,
  max_model_len: Annotated[int | None, typer.Option(min=2, show_default=False, help="Context length cap (default: the model's).")] = None,
  kv_cache_gb: Annotated[float, typer.Option(min=0.001, help="Memory for the paged KV cache, in GiB.")] = 1.0,
  served_model_name: Annotated[str | None, typer.Option(show_default=False, help="Model id clients send (default: the --model value).")] = None,
  timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a stalled client may keep its connection idle.")] = SOCKET_TIMEOUT_S,
  quantize: Annotated[str | None, typer.Option(show_default=False, help="int8: matmul weights as int8 with one scale per 32 (about 1/4 of float32 memory); gguf: keep a GGUF's Q8_0/Q4_0/Q4_1 blocks as stored (Q4: about 1/5).")] = None,
  dtype: Annotated[str, typer.Option(metavar=DTYPE_METAVAR, help=DTYPE_HELP)] = "auto",
  beam: Annotated[int, typer.Option(min=0, help="Search kernel optimizations (tinygrad BEAM) of this width while capturing (cached on disk; 0 = off).")] = 0,
  warmup: Annotated[bool, typer.Option(help="Capture the common batch shapes before answering /health with 200.")] = True,
) -> None:
  """Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
  try:
    check_dtype(dtype)  # before the port is bound or the model loads
    path = models.resolve_model(model)
    check_dtype_compiles(dtype, device)  # here in the main thread: it briefly redirects stderr
  except (ValueError, models.ModelNotFoundError) as e: fail(e)

  def load():
    from tinyvllm_core import LLMEngine
    from tinyvllm_cli.warmup import warm_up
    engine = LLMEngine(path, device=device, kv_cache_gb=kv_cache_gb, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                       quantize=quantize, dtype=dtype, beam=beam)
    if warmup:
      say(f"warming up: capturing the common batch shapes{f' with BEAM={beam} search' if beam else ''} ...")
      warm_up(engine, max_num_seqs)
    return engine

  name = served_model_name or _default_name(model, path)
  try: server, state = make_server(load, host, port, api_key, name, timeout_s=timeout)
  except OSError as e: fail(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host")
  if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
    err.print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model", soft_wrap=True)
  thread = threading.Thread(target=server.serve_forever, name="tinyvllm-http", daemon=True)
  thread.start()
  say(f"serve-lite: http://{host}:{server.server_address[1]}/v1 serving {name}; loading {path} (/health answers 503 until ready)")
  try: _wait(state, thread)
  except KeyboardInterrupt: pass
  finally:
    server.shutdown()
    server.server_close()
    state.close()
  if state.load_error: fail(f"could not load {path}: {state.load_error}")
  say(f"serve-lite stopped ({sum(state.metrics.finished.values())} requests served)")
