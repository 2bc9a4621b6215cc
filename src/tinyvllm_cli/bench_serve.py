"""`tinyvllm bench serve`: load an OpenAI-compatible server the way `vllm bench serve` does: streaming
requests from a thread pool at each concurrency level; throughput, TTFT, TPOT and ITL per level."""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tinyvllm_cli.ui import err, fail, one_line, out, say

TOPICS = ["the ocean", "a lighthouse keeper", "the history of bread", "how rainbows form", "a robot learning to paint",
          "the first day of school", "volcanoes", "a city at night", "the life of a honeybee", "chess openings",
          "a long train journey", "the moon landing", "how compilers work", "a forgotten library", "winter in the mountains",
          "the speed of light"]


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
  """Where requests go: base URL, endpoint, model and headers."""
  def __init__(self, url: str, endpoint: str, api_key: str | None, timeout: float):
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname: raise ValueError(f"{url!r} is not an http(s) URL")
    self.url, self.scheme, self.host, self.port = url, parts.scheme, parts.hostname, parts.port
    self.base = parts.path.rstrip("/").removesuffix("/v1")
    self.endpoint, self.timeout = endpoint, timeout
    self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

  def connect(self) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
    return cls(self.host, self.port, timeout=self.timeout)

  def get(self, path: str) -> tuple[int, Any]:
    conn = self.connect()
    try:
      conn.request("GET", self.base + path, headers=self.headers)
      resp = conn.getresponse()
      data = resp.read()
      try: return resp.status, json.loads(data)
      except ValueError: return resp.status, data.decode(errors="replace")
    finally:
      conn.close()

  def body(self, model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    payload = {"messages": [{"role": "user", "content": prompt}]} if self.endpoint == "chat" else {"prompt": prompt}
    return {"model": model, **payload, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}


def make_prompts(n: int, first: int = 0, dataset: list[str] | None = None) -> list[str]:
  """n prompts: the dataset's lines in turn, else short story requests on varied topics."""
  if dataset: return [dataset[i % len(dataset)] for i in range(first, first + n)]
  return [f"Request {i}: write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(first, first + n)]


def read_dataset(path: Path | None) -> list[str] | None:
  if path is None: return None
  try: lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError) as e: fail(f"cannot read --dataset {path}: {e}")
  if not lines: fail(f"--dataset {path} has no prompts (one per line)")
  return lines


# ---- one streaming request -----------------------------------------------------------------------

def stream_request(target: Target, body: dict) -> Result:
  path = target.base + ("/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions")
  conn, start = target.connect(), time.perf_counter()
  try:
    conn.request("POST", path, json.dumps(body), target.headers)
    resp = conn.getresponse()
    if resp.status != 200: return Result(False, error=f"HTTP {resp.status}: {_error_message(resp.read())}")
    return _read_events(resp, start)
  except (OSError, http.client.HTTPException, ValueError) as e:
    return Result(False, error=one_line(f"{type(e).__name__}: {e}"))
  finally:
    conn.close()


def _read_events(resp: http.client.HTTPResponse, start: float) -> Result:
  res, first, last = Result(True), None, None
  for line in resp:
    if not line.startswith(b"data: "): continue
    data = line[6:].strip()
    if data == b"[DONE]": continue  # read on to the end of the body so the connection closes cleanly
    event = json.loads(data)
    if "error" in event: return Result(False, error=one_line(event["error"].get("message", event["error"])))
    if event.get("usage"): res.prompt_tokens, res.output_tokens = event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"]
    choice = (event.get("choices") or [{}])[0]
    if choice.get("text") or (choice.get("delta") or {}).get("content"):
      now = time.perf_counter()
      if first is None: first = now
      else: res.itl.append(now - last)
      last = now
  res.latency = time.perf_counter() - start
  res.ttft = (first or time.perf_counter()) - start
  if first is None and res.output_tokens == 0: return Result(False, error="the stream ended without output")
  return res


def _error_message(data: bytes) -> str:
  try: return one_line(json.loads(data)["error"]["message"])
  except (ValueError, KeyError, TypeError): return one_line(data.decode(errors="replace"))[:200]


# ---- a level: N requests, C at a time ------------------------------------------------------------

def run_level(target: Target, bodies: list[dict], concurrency: int, advance: Callable[[], None]) -> tuple[list[Result], float]:
  start = time.perf_counter()
  with ThreadPoolExecutor(concurrency) as pool:
    futures = [pool.submit(stream_request, target, b) for b in bodies]
    results = []
    for f in as_completed(futures):
      results.append(f.result())
      advance()
  return results, time.perf_counter() - start


def _stats(values: list[float], prefix: str) -> dict:
  ms = np.asarray(values or [0.0]) * 1000
  return {f"mean_{prefix}_ms": float(ms.mean()), f"median_{prefix}_ms": float(np.median(ms)), f"p99_{prefix}_ms": float(np.percentile(ms, 99))}


def summarize(results: list[Result], duration: float, concurrency: int) -> dict:
  ok = [r for r in results if r.ok]
  prompt, output = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
  tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
  errors = sorted({r.error for r in results if not r.ok})
  return {"concurrency": concurrency, "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
          "duration_s": duration, "total_input_tokens": prompt, "total_output_tokens": output,
          "request_throughput": len(ok) / duration, "output_throughput": output / duration,
          "total_token_throughput": (prompt + output) / duration,
          **_stats([r.ttft for r in ok], "ttft"), **_stats(tpot, "tpot"), **_stats([x for r in ok for x in r.itl], "itl"),
          "mean_e2el_ms": _stats([r.latency for r in ok], "e2el")["mean_e2el_ms"], "errors": errors[:5]}


# ---- output --------------------------------------------------------------------------------------

ROWS = [("num_prompts", "requests", "{:d}"), ("completed", "successful", "{:d}"), ("failed", "failed", "{:d}"),
        ("duration_s", "duration (s)", "{:.1f}"), ("request_throughput", "requests/s", "{:.2f}"),
        ("output_throughput", "output tok/s", "{:.1f}"), ("total_token_throughput", "total tok/s", "{:.1f}"),
        ("speedup", "output tok/s vs first level", "{:.2f}x"), ("mean_ttft_ms", "TTFT mean (ms)", "{:.0f}"),
        ("median_ttft_ms", "TTFT median (ms)", "{:.0f}"), ("p99_ttft_ms", "TTFT p99 (ms)", "{:.0f}"),
        ("mean_tpot_ms", "TPOT mean (ms)", "{:.1f}"), ("median_tpot_ms", "TPOT median (ms)", "{:.1f}"),
        ("p99_tpot_ms", "TPOT p99 (ms)", "{:.1f}"), ("mean_itl_ms", "ITL mean (ms)", "{:.1f}"),
        ("median_itl_ms", "ITL median (ms)", "{:.1f}"), ("p99_itl_ms", "ITL p99 (ms)", "{:.1f}"),
        ("mean_e2el_ms", "latency mean (ms)", "{:.0f}")]


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
  """A column per concurrency level, a row per metric."""
  header = ["metric", *(f"concurrency {lv['concurrency']}" for lv in report["levels"])]
  return header, [[title, *(fmt.format(lv[key]) for lv in report["levels"])] for key, title, fmt in ROWS]


def markdown(report: dict) -> str:
  c, (header, rows) = report["config"], _rows(report)
  lines = [f"# tinyvllm bench serve — {report['timestamp']}", "",
           f"Server {c['url']}, model `{report['model']}`, endpoint /v1/{'chat/' if c['endpoint'] == 'chat' else ''}completions, "
           f"greedy, max_tokens {c['max_tokens']}{', ignore_eos' if c['ignore_eos'] else ''}, "
           f"warm-up {'on' if c['warmup'] else 'off'}.", "",
           "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
           *("| " + " | ".join(row) + " |" for row in rows)]
  errors = [f"- concurrency {lv['concurrency']}: {e}" for lv in report["levels"] for e in lv["errors"]]
  return "\n".join(lines + (["", "Errors:", *errors] if errors else [])) + "\n"


def print_table(report: dict) -> None:
  header, rows = _rows(report)
  table = Table(title=f"bench serve: {report['model']} at {report['config']['url']}")
  for i, name in enumerate(header): table.add_column(name, justify="left" if i == 0 else "right")
  for row in rows: table.add_row(*row)
  out.print(table)


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
  output_dir.mkdir(parents=True, exist_ok=True)
  stem = output_dir / f"serve-{report['timestamp']}"
  json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
  json_path.write_text(json.dumps(report, indent=2) + "\n")
  md_path.write_text(markdown(report))
  return json_path, md_path


# ---- the command ---------------------------------------------------------------------------------

def _levels(concurrency: str) -> list[int]:
  try: levels = [int(c) for c in concurrency.split(",") if c.strip()]
  except ValueError: levels = []
  if not levels or min(levels) < 1: fail(f"--concurrency {concurrency!r}: expected positive integers like 1,4,16")
  return levels


def _wait_ready(target: Target, timeout: float) -> str:
  """Wait for /health, then return the served model id from /v1/models."""
  deadline = time.monotonic() + timeout
  while True:
    try: status, _ = target.get("/health")
    except OSError as e: fail(f"cannot reach {target.url}: {e.strerror or e}; start a server with `tinyvllm serve-lite`")
    if status == 200: break
    if time.monotonic() > deadline: fail(f"{target.url}/health still answers {status} after {timeout:.0f} s")
    time.sleep(1)
  status, models = target.get("/v1/models")
  if status != 200: fail(f"{target.url}/v1/models answered {status}: {models}")
  return models["data"][0]["id"]


def run_benchmark(target: Target, model: str, levels: list[int], num_prompts: int, max_tokens: int, ignore_eos: bool,
                  warmup: bool, quiet: bool, dataset: list[str] | None = None) -> list[dict]:
  results = []
  with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=err, disable=quiet, transient=False) as progress:
    for c in levels:
      n = num_prompts or max(8, 4 * c)
      if warmup:  # the same mix of prompt lengths once, untimed: the server captures its new batch shapes here
        task = progress.add_task(f"warm-up   c={c}", total=n)
        run_level(target, [target.body(model, p, max_tokens, ignore_eos) for p in make_prompts(n, 10_000, dataset)], c,
                  lambda: progress.advance(task))
      task = progress.add_task(f"measuring c={c}", total=n)
      bodies = [target.body(model, p, max_tokens, ignore_eos) for p in make_prompts(n, 0, dataset)]
      level = summarize(*run_level(target, bodies, c, lambda: progress.advance(task)), c)
      level["speedup"] = level["output_throughput"] / results[0]["output_throughput"] if results and results[0]["output_throughput"] else 1.0
      results.append(level)
  return results


def bench_serve(
  url: Annotated[str, typer.Option("--url", help="Server base URL, e.g. http://127.0.0.1:8000.")] = "http://127.0.0.1:8000",
  concurrency: Annotated[str, typer.Option("--concurrency", "-c", help="Comma-separated concurrency levels.")] = "1,4,16",
  num_prompts: Annotated[int, typer.Option("--num-prompts", "-n", min=0, help="Requests per level (0: max(8, 4 x concurrency)).")] = 0,
  max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request.")] = 32,
  endpoint: Annotated[str, typer.Option(help="completions or chat.")] = "completions",
  dataset: Annotated[Path | None, typer.Option(show_default=False, help="Text file of prompts, one per line (default: built-in story requests).")] = None,
  ignore_eos: Annotated[bool, typer.Option(help="Generate exactly max_tokens tokens per request.")] = True,
  warmup: Annotated[bool, typer.Option(help="Run each level once untimed first, so JIT capture of new batch shapes is not timed.")] = True,
  api_key: Annotated[str | None, typer.Option(envvar="TINYVLLM_API_KEY", show_default=False, help="Bearer key for the server.")] = None,
  output_dir: Annotated[Path, typer.Option("--output", "-o", help="Where serve-<timestamp>.json and .md go.")] = Path("bench_results"),
  json_output: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
  timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the server and for each request.")] = 600.0,
) -> dict:
  """Benchmark a running server (tinyvllm serve-lite or any OpenAI-compatible one) at several concurrency levels."""
  if endpoint not in ("completions", "chat"): fail(f"--endpoint {endpoint!r}: expected completions or chat")
  levels = _levels(concurrency)
  try: target = Target(url, endpoint, api_key, timeout)
  except ValueError as e: fail(e)
  model = _wait_ready(target, timeout)
  started = datetime.now()
  levels_out = run_benchmark(target, model, levels, num_prompts, max_tokens, ignore_eos, warmup, json_output, read_dataset(dataset))
  report = {"timestamp": started.strftime("%Y%m%d-%H%M%S"), "model": model,
            "config": {"url": url, "endpoint": endpoint, "dataset": str(dataset) if dataset else None, "concurrency": levels, "num_prompts": num_prompts,
                       "max_tokens": max_tokens, "ignore_eos": ignore_eos, "warmup": warmup}, "levels": levels_out}
  json_path, md_path = write_report(report, output_dir)
  if json_output: print(json.dumps(report, indent=2))
  else:
    print_table(report)
    say(f"wrote {json_path} and {md_path}")
  return report
