"""`tinyvllm bench serve`: streaming requests from a thread pool at each concurrency level, as `vllm bench serve`."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from tinyvllm_cli.bench.common import BenchError, markdown_table, now, progress_bar
from tinyvllm_cli.ui import one_line

TOPICS = [
  *("the ocean", "a lighthouse keeper", "the history of bread", "how rainbows form", "a robot learning to paint"),
  *("the first day of school", "volcanoes", "a city at night", "the life of a honeybee", "chess openings"),
  *("a long train journey", "the moon landing", "how compilers work", "a forgotten library", "winter in the mountains"),
  "the speed of light",
]


@dataclass
class Result:
  ok: bool
  prompt_tokens: int = 0
  output_tokens: int = 0
  ttft: float = 0.0
  latency: float = 0.0
  itl: list[float] = field(default_factory=list)
  error: str = ""


class Target:
  """Where requests go: base URL, endpoint and headers."""

  def __init__(self, url: str, endpoint: str, api_key: str | None, timeout: float):
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
      raise BenchError(f"{url!r} is not an http(s) URL")
    self.url = url
    self.parts = parts
    self.base = parts.path.rstrip("/").removesuffix("/v1")
    self.path = self.base + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
    self.endpoint = endpoint
    self.timeout = timeout
    self.headers = {"Content-Type": "application/json"}
    if api_key:
      self.headers["Authorization"] = f"Bearer {api_key}"

  def connect(self) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
    return cls(self.parts.hostname, self.parts.port, timeout=self.timeout)

  def get(self, path: str) -> tuple[int, Any]:
    conn = self.connect()
    try:
      conn.request("GET", self.base + path, headers=self.headers)
      resp = conn.getresponse()
      data = resp.read()
    finally:
      conn.close()
    try:
      return resp.status, json.loads(data)
    except ValueError:
      return resp.status, data.decode(errors="replace")

  def wait_ready(self) -> str:
    """Wait for /health, then return the served model id from /v1/models."""
    deadline = time.monotonic() + self.timeout
    while True:
      try:
        status, _ = self.get("/health")
      except OSError as e:
        why = e.strerror or e
        raise BenchError(f"cannot reach {self.url}: {why}; start a server with `tinyvllm serve-lite`") from None
      if status == 200:
        break
      if time.monotonic() > deadline:
        raise BenchError(f"{self.url}/health still answers {status} after {self.timeout:.0f} s")
      time.sleep(1)
    status, models = self.get("/v1/models")
    if status != 200:
      raise BenchError(f"{self.url}/v1/models answered {status}: {models}")
    return models["data"][0]["id"]

  def stream(self, body: dict) -> Result:
    """One streaming request, timed."""
    conn = self.connect()
    start = now()
    try:
      conn.request("POST", self.path, json.dumps(body), self.headers)
      resp = conn.getresponse()
      if resp.status != 200:
        return Result(False, error=f"HTTP {resp.status}: {error_message(resp.read())}")
      return read_events(resp, start)
    except (OSError, http.client.HTTPException, ValueError) as e:
      return Result(False, error=one_line(f"{type(e).__name__}: {e}"))
    finally:
      conn.close()


def read_dataset(path: Path | None) -> list[str] | None:
  if path is None:
    return None
  try:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise BenchError(f"cannot read --dataset {path}: {e}") from None
  if not lines:
    raise BenchError(f"--dataset {path} has no prompts (one per line)")
  return lines


def read_schema(path: Path | None) -> dict | None:
  if path is None:
    return None
  try:
    schema = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise BenchError(f"cannot read --json-schema {path}: {one_line(e)}") from None
  if not isinstance(schema, dict):
    raise BenchError(f"--json-schema {path}: a JSON schema is an object")
  return schema


def read_events(resp: http.client.HTTPResponse, start: float) -> Result:
  res = Result(True)
  last = None
  for line in resp:
    data = line[6:].strip()
    if not line.startswith(b"data: ") or data == b"[DONE]":  # read on to the end so the connection closes cleanly
      continue
    event = json.loads(data)
    if "error" in event:
      return Result(False, error=one_line(event["error"].get("message", event["error"])))
    if event.get("usage"):
      res.prompt_tokens = event["usage"]["prompt_tokens"]
      res.output_tokens = event["usage"]["completion_tokens"]
    choice = (event.get("choices") or [{}])[0]
    if choice.get("text") or (choice.get("delta") or {}).get("content"):
      t = now()
      if last is None:
        res.ttft = t - start
      else:
        res.itl.append(t - last)
      last = t
  res.latency = now() - start
  if last is None and res.output_tokens == 0:
    return Result(False, error="the stream ended without output")
  res.ttft = res.ttft or res.latency
  return res


def error_message(data: bytes) -> str:
  try:
    return one_line(json.loads(data)["error"]["message"])
  except (ValueError, KeyError, TypeError):
    return one_line(data.decode(errors="replace"))[:200]


def stats(values: list[float], prefix: str) -> dict:
  ms = np.asarray(values or [0.0]) * 1000
  return {
    f"mean_{prefix}_ms": float(ms.mean()),
    f"median_{prefix}_ms": float(np.median(ms)),
    f"p99_{prefix}_ms": float(np.percentile(ms, 99)),
  }


def run_level(target: Target, bodies: list[dict], concurrency: int, title: str) -> dict:
  """N requests, C at a time, and their summary."""
  start = now()
  results = []
  with progress_bar(title, len(bodies), unit="requests") as advance, ThreadPoolExecutor(concurrency) as pool:
    for f in as_completed([pool.submit(target.stream, b) for b in bodies]):
      results.append(f.result())
      advance()
  duration = now() - start
  ok = [r for r in results if r.ok]
  prompt = sum(r.prompt_tokens for r in ok)
  output = sum(r.output_tokens for r in ok)
  tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
  return {
    "concurrency": concurrency,
    "num_prompts": len(results),
    "completed": len(ok),
    "failed": len(results) - len(ok),
    "duration_s": duration,
    "total_input_tokens": prompt,
    "total_output_tokens": output,
    "request_throughput": len(ok) / duration,
    "output_throughput": output / duration,
    "total_token_throughput": (prompt + output) / duration,
    **stats([r.ttft for r in ok], "ttft"),
    **stats(tpot, "tpot"),
    **stats([x for r in ok for x in r.itl], "itl"),
    "mean_e2el_ms": stats([r.latency for r in ok], "e2el")["mean_e2el_ms"],
    "errors": sorted({r.error for r in results if not r.ok})[:5],
  }


def run_levels(target: Target, model: str, config: dict, dataset: list[str] | None) -> list[dict]:
  levels = []
  for c in config["concurrency"]:
    n = config["num_prompts"] or max(8, 4 * c)

    def bodies(first: int) -> list[dict]:
      """n prompts: the dataset's lines in turn, else short story requests on varied topics."""
      out = []
      for i in range(first, first + n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = dataset[i % len(dataset)] if dataset else f"Request {i}: write a short story about {topic}."
        payload = (
          {"messages": [{"role": "user", "content": prompt}]} if target.endpoint == "chat" else {"prompt": prompt}
        )
        options = {"max_tokens": config["max_tokens"], "temperature": 0, "ignore_eos": config["ignore_eos"]}
        if config.get("json_schema"):
          spec = {"name": "bench", "schema": config["json_schema"]}
          options["response_format"] = {"type": "json_schema", "json_schema": spec}
        out.append({"model": model, **payload, **options, "stream": True, "stream_options": {"include_usage": True}})
      return out

    if config["warmup"]:  # the same mix of prompt lengths once, untimed: the server captures its new batch shapes here
      run_level(target, bodies(10_000), c, f"warm-up   c={c}")
    level = run_level(target, bodies(0), c, f"measuring c={c}")
    first = levels[0]["output_throughput"] if levels else 0.0
    level["speedup"] = level["output_throughput"] / first if first else 1.0
    levels.append(level)
  return levels


ROWS = [
  ("num_prompts", "requests", "{:d}"),
  ("completed", "successful", "{:d}"),
  ("failed", "failed", "{:d}"),
  ("duration_s", "duration (s)", "{:.1f}"),
  ("request_throughput", "requests/s", "{:.2f}"),
  ("output_throughput", "output tok/s", "{:.1f}"),
  ("total_token_throughput", "total tok/s", "{:.1f}"),
  ("speedup", "output tok/s vs first level", "{:.2f}x"),
  *((f"{s}_ttft_ms", f"TTFT {s} (ms)", "{:.0f}") for s in ("mean", "median", "p99")),
  *((f"{s}_tpot_ms", f"TPOT {s} (ms)", "{:.1f}") for s in ("mean", "median", "p99")),
  *((f"{s}_itl_ms", f"ITL {s} (ms)", "{:.1f}") for s in ("mean", "median", "p99")),
  ("mean_e2el_ms", "latency mean (ms)", "{:.0f}"),
]


def markdown(report: dict) -> str:
  c = report["config"]
  levels = report["levels"]
  header = ["metric", *(f"concurrency {lv['concurrency']}" for lv in levels)]
  rows = [[title, *(fmt.format(lv[key]) for lv in levels)] for key, title, fmt in ROWS]
  path = "chat/completions" if c["endpoint"] == "chat" else "completions"
  ignore_eos = ", ignore_eos" if c["ignore_eos"] else ""
  schema = f", output constrained to the JSON schema {c['json_schema_file']}" if c.get("json_schema") else ""
  errors = [f"- concurrency {lv['concurrency']}: {e}" for lv in levels for e in lv["errors"]]
  lines = [
    f"# tinyvllm bench serve — {report['timestamp']}",
    "",
    f"Server {c['url']}, model `{report['model']}`, endpoint /v1/{path}, greedy, max_tokens {c['max_tokens']}"
    f"{ignore_eos}{schema}, warm-up {'on' if c['warmup'] else 'off'}.",
    "",
    markdown_table(header, rows),
    *(["", "Errors:", *errors] if errors else []),
  ]
  return "\n".join(lines)
