"""`tinyvllm serve-lite`: an OpenAI-compatible HTTP server on the standard library. One thread per
connection parses the request and streams its own output; the engine loop batches all of them."""

from __future__ import annotations

import functools
import hmac
import json
import queue
import secrets
import select
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
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
  SpeculativeOption,
  check_dtype,
  check_dtype_compiles,
  quantize_setting,
)
from tinyvllm_cli.openai_api import (
  ApiError,
  ChoiceStream,
  GenerateRequest,
  TokenText,
  choice_params,
  chunk,
  failed_output,
  full_response,
  parse_json_object,
  parse_request,
  role_choice,
  usage,
  usage_chunk,
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


# ---- server state: the engine loads, then warms up, in the background ------------------------------

RESUME_AFTER_IDLE_S = 1.0  # the warm-up starts, and resumes, once no request has been in flight this long


class ServerState:
  """The engine loop once loaded, the settings the handlers need, the requests in flight, and the background warm-up
  (held while requests are in flight: warm-up work only fills idle time)."""

  def __init__(
    self, engine_factory: Callable[[], Any], model_name: str, api_key: str | None, warmup: bool = False
  ) -> None:
    self.model_name, self.api_key = model_name, api_key
    self.engine: Any = None
    self.loop: Any = None
    self.warmup: Any = None  # a BackgroundWarmUp, when asked for
    self.load_error: str | None = None
    self.loaded = threading.Event()  # set when loading ended, well or not
    self.created = int(time.time())
    self.metrics = Metrics()
    self.active: set[str] = set()
    self._lock = threading.Lock()
    self._closed = False
    self._resume_timer: threading.Timer | None = None
    args = (engine_factory, warmup)
    threading.Thread(target=self._load, args=args, name="tinyvllm-load", daemon=True).start()

  @property
  def ready(self) -> bool:
    return self.loop is not None and not self._closed

  def _load(self, engine_factory: Callable[[], Any], warmup: bool) -> None:
    try:
      from tinyvllm_core import EngineLoop

      engine = engine_factory()
      loop = EngineLoop(engine)
      if warmup:  # before the loop is published: no request can come before the warm-up is there to yield
        self.warmup = _background_warm_up(loop)
        with self._lock:
          self._hold_warmup()  # a first request sent as /health turns 200 finds no warm-up step in its way
      self.engine, self.loop = engine, loop
    except Exception as e:  # shown by /health and by the CLI
      self.load_error = one_line(e) or repr(e)
    finally:
      self.loaded.set()

  def wait_ready(self, timeout: float | None = None) -> bool:
    return self.loaded.wait(timeout) and self.loop is not None

  @functools.cached_property
  def token_text(self) -> TokenText:
    """Token ids as logprobs show them; built on the first request that asks (~0.2 s for a 49k vocabulary)."""
    return TokenText(self.engine)

  def track(self, request_ids: list[str], active: bool) -> None:
    """Count requests in and out; the first one in pauses the warm-up, the last one out lets it resume later."""
    with self._lock:
      if active:
        self.active.update(request_ids)
      else:
        self.active.difference_update(request_ids)
      if self.warmup is not None and not self.warmup.finished:
        self._hold_warmup()

  def _hold_warmup(self) -> None:
    """Pause the warm-up while requests are in flight; resume it RESUME_AFTER_IDLE_S after the last one (a client
    sending one request after another keeps it paused). Called under the lock."""
    if self._resume_timer is not None:
      self._resume_timer.cancel()
      self._resume_timer = None
    if self.active:
      self.warmup.pause()
      return
    self._resume_timer = threading.Timer(RESUME_AFTER_IDLE_S, self._resume_if_idle)
    self._resume_timer.daemon = True
    self._resume_timer.start()

  def _resume_if_idle(self) -> None:
    with self._lock:
      if not self.active and not self._closed:
        self.warmup.resume()

  def close(self, grace_s: float = 2.0) -> None:
    """Stop the warm-up, abort what is in flight, give the handlers a moment to answer, stop the engine loop."""
    with self._lock:
      already, self._closed = self._closed, True
      if self._resume_timer is not None:
        self._resume_timer.cancel()
      running = list(self.active)
    if already or self.loop is None:
      return
    if self.warmup is not None:
      self.warmup.stop()
    for request_id in running:
      self.loop.abort(request_id)
    deadline = time.monotonic() + grace_s
    while self.active and time.monotonic() < deadline:
      time.sleep(0.02)
    self.loop.shutdown()


def _background_warm_up(loop: Any) -> Any:
  """The warm-up plan on `loop`, started paused (ServerState resumes it): the rounds of a first chat request at the
  model's sampling defaults first, then the other heads and prompt buckets, then batches up to max_num_seqs."""
  from tinyvllm_cli.warmup import BackgroundWarmUp, first_prompt_len

  engine = loop.engine
  params, max_num_seqs = engine.default_params, engine.config.max_num_seqs
  warmup = BackgroundWarmUp(loop, params, first_prompt_len(engine), max_num_seqs)
  warmup.pause()
  return warmup.start()


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
  ("spec_decode_num_draft_tokens_total", "counter", "Prompt-lookup draft tokens verified.", "num_draft_tokens"),
  ("spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.", "num_accepted_drafts"),
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
  allowed_origins: frozenset[str] = frozenset()  # make_server sets it: origins whose pages may call ("*": any)
  status = 0  # the status of the response sent

  def log_message(self, format: str, *args: Any) -> None:
    pass  # the standard library's log: Handler writes its own line per request

  def send_response(self, code: int, message: str | None = None) -> None:
    self.status = code
    super().send_response(code, message)

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
    headers = {"Content-Type": content_type, "Content-Length": str(len(data)), **self._cors(), **(headers or {})}
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
    for name, value in (SSE_HEADERS | self._cors()).items():
      self.send_header(name, value)
    self.end_headers()

  def _cors(self) -> dict[str, str]:
    """The CORS header that lets a page from the request's Origin read the response, when that origin is allowed."""
    origin = self._origin()
    if origin is None or not self._origin_allowed(origin):
      return {}
    return {"Access-Control-Allow-Origin": "*" if "*" in self.allowed_origins else origin, "Vary": "Origin"}

  def _origin(self) -> str | None:
    headers = getattr(self, "headers", None)  # absent when the request line itself was bad
    return headers.get("Origin") if headers is not None else None

  def _origin_allowed(self, origin: str) -> bool:
    return "*" in self.allowed_origins or origin in self.allowed_origins

  def _event(self, obj: dict) -> None:
    if self._client_gone():
      raise ConnectionResetError("client went away")
    self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

  def _write_chunk(self, data: bytes) -> None:
    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


class Handler(JsonHandler):
  """The OpenAI routes: each request is parsed, submitted to the engine loop and answered from its stream."""

  server_version = "tinyvllm-serve-lite"
  state: ServerState  # make_server sets it, and access_log
  access_log = False  # one line per request on stderr
  tokens: tuple[int, int] | None = None  # the request's prompt and completion tokens, for the log line
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
    path, self.body_read, self.status, self.tokens = urlsplit(self.path).path.rstrip("/") or "/", False, 0, None
    start = time.perf_counter()
    try:
      self._serve(path)
    except ApiError as e:
      self._answer_error(e)
    except (ConnectionError, TimeoutError):
      self.close_connection = True
    except Exception:  # a bug, never bad input: answer 500 and keep serving
      self._answer_bug()
    finally:
      self._log(path, time.perf_counter() - start)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

  def _log(self, path: str, seconds: float) -> None:
    """The access log line: method, path, status (0: none sent), prompt and completion tokens, duration."""
    if self.access_log:
      prompt, completion = self.tokens or ("-", "-")
      line = f"{self.command} {path} {self.status} prompt={prompt} completion={completion} {seconds:.3f}s\n"
      sys.stderr.write(line)

  def _serve(self, path: str) -> None:
    if self.command == "OPTIONS":
      return self._preflight(path)  # before the key check: browsers send no key with a preflight
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

  def _preflight(self, path: str) -> None:
    """Answer OPTIONS (a browser's CORS preflight): the methods and headers a page from an allowed origin may send."""
    methods = {method for method, p in self.routes if p == path}
    if not methods and not path.startswith("/v1/models/"):
      raise ApiError(404, f"no route {path}", code="not_found")
    origin = self._origin()
    if origin is not None and not self._origin_allowed(origin):
      message = f"the origin {origin} is not allowed; start serve-lite with --allowed-origins"
      raise ApiError(403, message, code="origin_not_allowed")
    allow = ", ".join(sorted(methods or {"GET"}) + ["OPTIONS"])
    asked = self.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type")
    headers = {"Allow": allow, "Access-Control-Allow-Methods": allow, "Access-Control-Allow-Headers": asked}
    self._send(204, b"", "text/plain", headers | {"Access-Control-Max-Age": "600"})

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
      warmup = self.state.warmup  # its progress, when serve-lite warms up: done == rounds once it finished
      progress = {"warmup": {"done": warmup.done, "rounds": len(warmup.rounds)}} if warmup is not None else {}
      self._send_json(200, {"status": "ok", **progress})
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
    req = parse_request(body, self.state.engine, self.state.model_name, chat)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    rids = [rid] if req.n == 1 else [f"{rid}-{i}" for i in range(req.n)]
    self.state.track(rids, True)
    try:
      outputs = self._submit(req, rids)
      (self._stream if req.stream else self._respond)(req, rid, rids, outputs)
    finally:
      self.state.track(rids, False)

  def _submit(self, req: GenerateRequest, rids: list[str]) -> Iterator[tuple[int, Any]]:
    """Submit the request's choices; their outputs as (choice index, output). With n > 1 the first choice goes
    alone and the others once it has its first token: its prompt is then in the prefix cache, whose KV blocks they
    share."""
    loop = self.state.loop
    streams = [loop.submit(req.prompt_ids, req.params, request_id=rids[0])]
    sources: list[Iterable[Any]] = [streams[0]]
    if len(rids) > 1:
      sources[0] = _after(streams[0].get(), streams[0])
    for i, rid in enumerate(rids[1:], 1):
      streams.append(loop.submit(req.prompt_ids, choice_params(req.params, i), request_id=rid))
    return self._timed(streams, merged(sources + streams[1:]))

  def _respond(self, req: GenerateRequest, rid: str, rids: list[str], outputs: Iterator[tuple[int, Any]]) -> None:
    """Answer with the whole completion once every choice is finished."""
    outs = self._final_outputs(rids, outputs)
    if failed := next((out for out in outs if out.finish_reason not in ("stop", "length")), None):
      raise failed_output(failed)
    self._count_tokens(outs)
    self._send_json(200, full_response(req, rid, self.state.model_name, outs, self._token_text(req)))

  def _final_outputs(self, rids: list[str], outputs: Iterator[tuple[int, Any]]) -> list[Any]:
    """Each choice's last output; a client that hangs up meanwhile aborts the request and gets no answer."""
    finals, gone = {}, False
    for i, out in outputs:
      if not gone and self._client_gone():
        gone = True
        for rid in rids:
          self.state.loop.abort(rid)
      if out.finished:
        finals[i] = out
    if gone:
      raise ConnectionResetError("client went away")
    return [finals[i] for i in range(len(rids))]

  def _stream(self, req: GenerateRequest, rid: str, rids: list[str], outputs: Iterator[tuple[int, Any]]) -> None:
    """Answer with server-sent events as the text grows; a client that hangs up aborts the request."""
    finals: dict[int, Any] = {}
    try:
      self._start_events()
      self._send_events(req, rid, outputs, finals)
      self._end_events(req, rid, finals)
    finally:
      for i, choice_rid in enumerate(rids):  # a client gone, or an error that ended the stream early
        if i not in finals:
          self._abort(choice_rid)

  def _send_events(
    self, req: GenerateRequest, rid: str, outputs: Iterator[tuple[int, Any]], finals: dict[int, Any]
  ) -> None:
    """An event per output that brings something (text, logprobs, the end); an error ends the stream."""
    model, choices = self.state.model_name, [ChoiceStream(req, i, self._token_text(req)) for i in range(req.n)]
    for i in range(req.n if req.chat else 0):
      self._event(chunk(req, rid, model, role_choice(i)))
    for i, out in outputs:  # delta_text: the engine holds back what may still become a stop string
      if out.finished:
        finals[i] = out
      if out.finish_reason in ("abort", "error"):
        return self._event(failed_output(out).body())
      if (choice := choices[i].choice(out)) is not None:
        self._event(chunk(req, rid, model, choice))

  def _end_events(self, req: GenerateRequest, rid: str, finals: dict[int, Any]) -> None:
    if len(finals) == req.n:
      outs = [finals[i] for i in range(req.n)]
      self._count_tokens(outs)
      if req.include_usage:
        self._event(usage_chunk(req, rid, self.state.model_name, outs))
    self._write_chunk(b"data: [DONE]\n\n")
    self._write_chunk(b"")  # the last chunk of a chunked body

  def _token_text(self, req: GenerateRequest) -> TokenText | None:
    return self.state.token_text if req.params.logprobs is not None else None

  def _count_tokens(self, outs: list[Any]) -> None:
    counts = usage(outs)
    self.tokens = counts["prompt_tokens"], counts["completion_tokens"]

  def _abort(self, rid: str) -> None:
    self.state.loop.abort(rid)
    self.state.metrics.count_finished("abort")

  def _timed(self, streams: list[Any], outputs: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """The outputs, recording latency metrics as they arrive."""
    last: dict[int, float] = {}
    for i, out in outputs:
      now = time.perf_counter()
      if out.delta_token_ids:
        if i in last:
          self.state.metrics.itl.observe(now - last[i])
        last[i] = now
      if out.finished:
        self._record_finish(streams[i], out)
      yield i, out

  def _record_finish(self, stream: Any, out: Any) -> None:
    metrics = self.state.metrics
    metrics.count_finished(out.finish_reason)
    if stream.ttft is not None:
      metrics.ttft.observe(stream.ttft)
    if stream.finish_time is not None:
      metrics.e2e.observe(stream.finish_time - stream.arrival_time)


def _after(first: Any, stream: Iterable[Any]) -> Iterator[Any]:
  """A stream whose first output was already taken from it."""
  yield first
  if not first.finished:
    yield from stream


def merged(sources: list[Iterable[Any]]) -> Iterator[tuple[int, Any]]:
  """Several requests' outputs as (source index, output) in the order they come (a forwarding thread per source
  when there is more than one)."""
  if len(sources) == 1:
    yield from ((0, out) for out in sources[0])
    return
  outputs: queue.Queue = queue.Queue()
  for i, source in enumerate(sources):
    threading.Thread(target=_forward, args=(i, source, outputs), name="tinyvllm-choice", daemon=True).start()
  left = len(sources)
  while left:
    i, out = outputs.get()
    left -= out.finished
    yield i, out


def _forward(index: int, source: Iterable[Any], outputs: queue.Queue) -> None:
  for out in source:
    outputs.put((index, out))


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
  allowed_origins: Iterable[str] = (),
  access_log: bool = False,
  warmup: bool = False,
) -> tuple[Server, ServerState]:
  """Bind host:port now and load the engine in the background; call serve_forever() on the server.
  allowed_origins: the origins ("*": any) whose web pages may call the server (CORS); access_log: a line per request
  on stderr; warmup: capture the common batch shapes once loaded, in the background, yielding to requests."""
  settings = {"timeout": timeout_s, "max_body_bytes": max_body_bytes, "access_log": access_log}
  handler = type("BoundHandler", (Handler,), settings | {"allowed_origins": frozenset(allowed_origins)})
  server = (Server6 if ":" in host else Server)((host, port), handler)
  handler.state = ServerState(engine_factory, model_name, api_key, warmup)
  return server, handler.state


# ---- the command ---------------------------------------------------------------------------------

HOST_HELP = "Address to listen on; 0.0.0.0 exposes the server to the network."
API_KEY_HELP = "Require 'Authorization: Bearer KEY' on every endpoint but /health."
SERVED_NAME_HELP = "Model id clients send (default: the --model value)."
TIMEOUT_HELP = "Seconds a stalled client may keep its connection idle."
WARMUP_HELP = (
  "Capture the common batch shapes in the background once the model is loaded (/health answers 200 at once; "
  "requests come first)."
)
ORIGINS_HELP = "Origins whose web pages may call the server (CORS): a comma list, or * for any. Default: none."
QUIET_HELP = "No log line per request on stderr."


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
  num_speculative_tokens: SpeculativeOption = 0,
  warmup: Annotated[bool, typer.Option(help=WARMUP_HELP)] = True,
  allowed_origins: Annotated[str, typer.Option(help=ORIGINS_HELP, show_default=False)] = "",
  quiet: Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)] = False,
) -> None:
  """Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health,
  /metrics."""
  path = _checked_model_path(model, device, dtype)
  engine_kwargs = dict(device=device, kv_cache_gb=kv_cache_gb, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
  engine_kwargs |= dict(quantize=quantize_setting(quantize), dtype=dtype, beam=beam)
  engine_kwargs |= dict(num_speculative_tokens=num_speculative_tokens)
  load = functools.partial(_load_engine, path, engine_kwargs)
  name = served_model_name or _default_name(model, path)
  origins = [origin.strip() for origin in allowed_origins.split(",") if origin.strip()]
  settings = dict(timeout_s=timeout, allowed_origins=origins, access_log=not quiet, warmup=warmup)
  server, state = _listen(load, host, port, api_key, name, settings)
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


def _load_engine(path: Path, engine_kwargs: dict) -> Any:
  """The engine (runs on the loading thread)."""
  from tinyvllm_core import LLMEngine

  return LLMEngine(path, **engine_kwargs)


def _listen(load: Callable[[], Any], host: str, port: int, api_key: str | None, name: str, settings: dict):
  try:
    server, state = make_server(load, host, port, api_key, name, **settings)
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
  warmup = state.warmup
  if warmup is not None:
    beam = f" with BEAM={engine.config.beam} search" if engine.config.beam else ""
    say(f"warming up in the background: capturing the common batch shapes{beam} (requests come first)")
  while thread.is_alive():
    thread.join(0.5)
    if warmup is not None and warmup.elapsed_s is not None:
      say(f"warm-up done: {len(warmup.rounds)} rounds in {warmup.elapsed_s:.1f} s")
      warmup = None
