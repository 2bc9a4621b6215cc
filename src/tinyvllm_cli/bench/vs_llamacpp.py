"""`tinyvllm bench vs-llamacpp`: issue 19's side-by-side table. tinyvllm (its default settings) against llama.cpp
built from source (llama-bench, llama-batched-bench, llama-server) on the same GGUF file and thread count: one-sequence
and batched decode, prefill, serving output tok/s through each server with `bench serve`'s client, and the time from
a server's start to its first /health 200. Beside each row: tinyvllm / llama.cpp and the bound that reading the
weights once per decode step at the measured memory bandwidth sets."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np

from tinyvllm_cli import ui
from tinyvllm_cli.bench.common import PromptSource, Run, markdown_table, now

TOOLS = ("llama-bench", "llama-batched-bench", "llama-server")
TG = 128  # llama-bench's one-sequence decode test (tg128)
PREFILL_SEQS = 8
DECODE_PROMPT = 32  # bench profile's prompt length; llama-batched-bench gets the same
LLAMA = "llama.cpp"
SPECULATIVE_NOTE = (
  "tinyvllm runs without speculative decoding (off by default); `tinyvllm bench speculative` measures it apart."
)


class PeerFailed(Exception):
  """A llama.cpp tool or a server failed; the message is one line."""


@dataclass
class VsParams:
  gguf: Path
  threads: int
  quantize: str | None = None  # the --quantize given (None: tinyvllm's default)
  batch_sizes: tuple[int, ...] = (1, 8, 32)
  concurrency: tuple[int, ...] = (1, 4, 16)
  num_prompts: int = 32
  max_tokens: int = 64
  prefill_len: int = 512
  timeout: float = 600.0


def find_tools(bin_dir: Path | None) -> tuple[dict[str, str], str | None]:
  """The llama.cpp binaries' paths, or a one-line reason why they cannot run."""
  found = {t: shutil.which(t, path=str(bin_dir) if bin_dir else None) for t in TOOLS}
  missing = [t for t, path in found.items() if path is None]
  if not missing:
    return found, None
  where = f"in {bin_dir}" if bin_dir else "on PATH (--llamacpp-bin DIR names their folder)"
  return {}, f"{', '.join(missing)} not found {where}"


def parse_llama_bench(text: str) -> dict[str, dict]:
  """llama-bench `-o json` -> {"pp512": {"tok_s", "stddev"}, "tg128": ...}."""
  tests = {}
  for t in json.loads(text):
    name = "+".join(f"{k}{t[f'n_{n}']}" for k, n in (("pp", "prompt"), ("tg", "gen")) if t[f"n_{n}"])
    tests[name] = {"tok_s": t["avg_ts"], "stddev": t["stddev_ts"], "model_size": t.get("model_size")}
  return tests


def parse_batched_bench(text: str) -> list[dict[str, float]]:
  """llama-batched-bench's markdown table -> one dict per row, keyed by its header (PP, TG, B, S_TG t/s, ...)."""
  rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
  if len(rows) < 3:
    raise PeerFailed("llama-batched-bench printed no result table")
  return [dict(zip(rows[0], map(float, r))) for r in rows[2:]]


def run_tool(args: list[str], timeout: float) -> str:
  """A llama.cpp tool's stdout; a failure is one line."""
  name = Path(args[0]).name
  try:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    raise PeerFailed(f"{name} ran over {timeout:.0f} s") from None
  if proc.returncode:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise PeerFailed(f"{name} exited with {proc.returncode}: {ui.one_line(last)[:200]}")
  return proc.stdout


def copy_bandwidth(threads: int, nbytes: int = 256 << 20, repeats: int = 5) -> float:
  """Bytes per second read + written by numpy copies of `nbytes` split over 1 or `threads` threads (the best)."""
  a, b = np.ones(nbytes // 8), np.empty(nbytes // 8)
  best = float("inf")
  for n in sorted({1, threads}):
    with ThreadPoolExecutor(n) as pool:
      for _ in range(repeats):
        t0 = now()
        list(pool.map(np.copyto, np.array_split(b, n), np.array_split(a, n)))
        best = min(best, now() - t0)
  return 2 * nbytes / best


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def last_line(log: IO[bytes]) -> str:
  log.seek(0)
  lines = log.read().decode(errors="replace").strip().splitlines()
  return ui.one_line(lines[-1])[:200] if lines else "no output"


def wait_healthy(target, proc: subprocess.Popen, log: IO[bytes], started: float, timeout: float) -> float:
  """Seconds from `started` until /health answers 200."""
  while now() - started < timeout:
    if proc.poll() is not None:
      raise PeerFailed(f"exited with {proc.returncode} before /health answered 200: {last_line(log)}")
    try:
      if target.get("/health")[0] == 200:
        return now() - started
    except (OSError, http.client.HTTPException):
      pass
    time.sleep(0.1)
  raise PeerFailed(f"/health did not answer 200 within {timeout:.0f} s")


def wait_warmed_up(target, proc: subprocess.Popen, started: float, timeout: float) -> float | None:
  """Seconds from `started` until /health says the server's background warm-up finished (serve-lite's
  {"warmup": {"done", "rounds"}}), polling for at most `timeout` s from now; None when /health reports no warm-up
  (llama-server, serve-lite --no-warmup) or it did not finish in time (then the levels run anyway, said on stderr)."""
  deadline = now() + timeout
  while True:
    if proc.poll() is not None:
      raise PeerFailed(f"exited with {proc.returncode} while warming up")
    try:
      status, body = target.get("/health")
    except (OSError, http.client.HTTPException):
      status, body = None, None
    warmup = body.get("warmup") if status == 200 and isinstance(body, dict) else None
    if status == 200 and warmup is None:
      return None
    if warmup is not None and warmup["done"] >= warmup["rounds"]:
      return now() - started
    if now() > deadline:
      progress = f"{warmup['done']}/{warmup['rounds']} rounds" if warmup else f"/health answers {status}"
      ui.err.print(f"the warm-up did not finish within {timeout:.0f} s ({progress}); serving levels run anyway")
      return None
    time.sleep(0.2)


def serve_levels(command: list[str], p: VsParams, wait_warmup: bool = False) -> dict:
  """Start a server, time its start to /health 200 and to its first completion, run `bench serve`'s levels against
  it, stop it. wait_warmup (serve-lite): after the first completion, wait until /health says the background warm-up
  finished (at most p.timeout s), so the levels compare steady states rather than TinyJit captures of new shapes."""
  from tinyvllm_cli.bench.serve import Target, run_levels

  port = free_port()
  target = Target(f"http://127.0.0.1:{port}", "completions", None, p.timeout)
  config = {"concurrency": list(p.concurrency), "num_prompts": p.num_prompts, "max_tokens": p.max_tokens}
  config |= {"ignore_eos": True, "warmup": True, "endpoint": "completions"}
  with tempfile.TemporaryFile() as log:
    started = now()
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
      start_s = wait_healthy(target, proc, log, started, p.timeout)
      model = target.wait_ready()
      first = target.stream(first_request(model, p.max_tokens))
      first_s = now() - started
      if not first.ok:
        raise PeerFailed(f"the first completion failed: {first.error}")
      warmup_s = wait_warmed_up(target, proc, started, p.timeout) if wait_warmup else None
      levels = run_levels(target, model, config, None)
    finally:
      proc.terminate()
      try:
        proc.wait(30)
      except subprocess.TimeoutExpired:
        proc.kill()
  failed = [lv for lv in levels if lv["failed"]]
  if failed:
    lv = failed[0]
    raise PeerFailed(
      f"{lv['failed']} of {lv['num_prompts']} failed at concurrency {lv['concurrency']}: {lv['errors'][0]}"
    )
  times = {"start_s": start_s, "first_s": first_s} | ({"warmup_s": warmup_s} if warmup_s is not None else {})
  return {"command": [*command, "--port", str(port)], **times, "config": config, "levels": levels}


def first_request(model: str, max_tokens: int) -> dict:
  """A request of the serving workload's kind (a prompt none of its levels sends), alone once /health answers 200."""
  from tinyvllm_cli.bench.serve import TOPICS

  prompt = f"Request 20000: write a short story about {TOPICS[0]}."
  options = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
  return {"model": model, "prompt": prompt, **options, "stream_options": {"include_usage": True}}


def serve_metrics(served: dict) -> dict[str, float]:
  levels = {f"serve_{lv['concurrency']}": lv["output_throughput"] for lv in served["levels"]}
  times = {k: served[k] for k in ("start_s", "first_s", "warmup_s") if k in served}
  return {**times, **levels}


def llamacpp_side(tools: dict[str, str], p: VsParams, skipped: dict[str, str]) -> tuple[dict, dict]:
  """llama-bench (pp / tg128), llama-batched-bench and llama-server: the metrics and what each tool said; a tool
  that fails is skipped with its one-line reason."""
  model, threads = str(p.gguf), str(p.threads)
  metrics, raw = {}, {}

  def bench() -> None:
    version = subprocess.run([tools["llama-bench"], "--version"], capture_output=True, text=True, timeout=60)
    raw["version"] = next((s for s in (version.stdout + version.stderr).splitlines() if "version" in s), None)
    args = [tools["llama-bench"], "-m", model, "-t", threads, "-p", str(p.prefill_len), "-n", str(TG), "-o", "json"]
    raw["llama-bench"] = tests = parse_llama_bench(run_tool(args, p.timeout))
    metrics.update(prefill=tests[f"pp{p.prefill_len}"]["tok_s"], decode_1=tests[f"tg{TG}"]["tok_s"])

  def batched() -> None:
    sizes = [b for b in p.batch_sizes if b > 1]
    if sizes:
      args = [tools["llama-batched-bench"], "-m", model, "-t", threads, "-tb", threads, "-npp", str(DECODE_PROMPT)]
      args += ["-ntg", str(TG), "-npl", ",".join(map(str, sizes)), "-c", str(max(sizes) * (DECODE_PROMPT + TG))]
      raw["llama-batched-bench"] = rows = parse_batched_bench(run_tool(args, p.timeout))
      metrics.update({f"decode_{int(r['B'])}": r["S_TG t/s"] for r in rows})

  def server() -> None:
    slots = max(p.concurrency)
    args = [tools["llama-server"], "-m", model, "-t", threads, "-np", str(slots)]
    args += ["-c", str(slots * (p.max_tokens + 256)), "--host", "127.0.0.1"]
    raw["llama-server"] = served = serve_levels(args, p)
    metrics.update(serve_metrics(served))

  for name, part in (("llama-bench", bench), ("llama-batched-bench", batched), ("llama-server", server)):
    attempt(f"{LLAMA} {name}", part, skipped)
  return metrics, raw


def attempt(name: str, part: Callable[[], None], skipped: dict[str, str]) -> None:
  try:
    part()
  except (PeerFailed, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
    skipped[name] = ui.one_line(e)
    ui.err.print(f"{name}: {skipped[name]}; skipped", soft_wrap=True, highlight=False, markup=False)


def tinyvllm_side(run: Run, p: VsParams) -> tuple[dict, dict]:
  """bench profile at each batch size, PREFILL_SEQS prompts of prefill_len tokens (1 generated) through
  run_tinyvllm, and serve-lite in a process of its own."""
  from tinyvllm_cli.bench.profile import ProfileParams, run_profile
  from tinyvllm_cli.bench.throughput import BackendOptions, Workload, run_tinyvllm
  from tinyvllm_cli.engine_options import quantize_setting

  engine_quantize = quantize_setting(p.quantize)
  params = ProfileParams(list(p.batch_sizes), steps=TG, prompt_len=DECODE_PROMPT, quantize=engine_quantize)
  profile = run_profile(run, params)  # as many timed steps as tg128 has tokens: a median over 10 steps swung 15%
  prompts = PromptSource(run.model.model_config().vocab_size, p.prefill_len, 0).take(PREFILL_SEQS)
  prefill = run_tinyvllm(
    run.model, run.device, Workload(prompts, [1] * PREFILL_SEQS), BackendOptions(quantize=engine_quantize)
  )
  command = [
    sys.executable,
    "-m",
    "tinyvllm_cli",
    "serve-lite",
    "--model",
    str(p.gguf),
    "--device",
    run.device,
    "--quiet",
  ]
  command += ["--quantize", p.quantize] if p.quantize else []
  served = serve_levels(command, p, wait_warmup=True)
  metrics = {f"decode_{r['batch_size']}": r["tokens_per_s"] for r in profile}
  metrics |= {"prefill": prefill.input_tokens / prefill.duration, **serve_metrics(served)}
  raw = {"profile": profile, "prefill": prefill.summary(), "serve-lite": served}
  return metrics, raw


def rows(p: VsParams) -> list[tuple[str, str]]:
  """(metric key, what the row compares)."""
  decode = [
    (f"decode_{b}", f"decode tok/s at {b} sequences (llama-batched-bench / `bench profile` B={b})")
    if b > 1
    else ("decode_1", f"one sequence, decode tok/s (llama-bench tg{TG} / `bench profile` B=1)")
    for b in p.batch_sizes
  ]
  prefill = (
    "prefill",
    f"prefill tok/s (llama-bench pp{p.prefill_len} / {PREFILL_SEQS} x {p.prefill_len}-token prompts)",
  )
  serve = [
    (f"serve_{c}", f"serving, output tok/s at concurrency {c} (`bench serve`: llama-server / serve-lite)")
    for c in p.concurrency
  ]
  start = [
    ("start_s", "time from start to /health 200, s (lower is better)"),
    ("first_s", f"time from start to the first completion ({p.max_tokens} tokens), s (lower is better)"),
    ("warmup_s", "time from start to warm-up done, s (serve-lite's background warm-up, before the serving levels)"),
  ]
  return [*decode, prefill, *serve, *start]


def bound(key: str, bandwidth: float, weight_bytes: int) -> float | None:
  """Decode and serving: sequences x bandwidth / the weight bytes read per step; None for the other rows."""
  head, _, n = key.partition("_")
  return int(n) * bandwidth / weight_bytes if head in ("decode", "serve") else None


def vs_report(run: Run, p: VsParams, results: dict, skipped: dict, bandwidth: float) -> tuple[dict, str]:
  """results: {"llama.cpp": {"metrics", "raw"}, "tinyvllm": {...}} (llama.cpp may be missing or partial)."""
  weight_bytes = p.gguf.stat().st_size
  ours, theirs = results["tinyvllm"]["metrics"], results.get(LLAMA, {}).get("metrics", {})

  def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"

  table = []
  for key, title in rows(p):
    a, b, limit = theirs.get(key), ours.get(key), bound(key, bandwidth, weight_bytes)
    ratio = f"{b / a:.2f}x" if a and b is not None else "-"
    table.append([title, cell(a), cell(b), ratio, cell(limit)])
  header = ["", LLAMA, "tinyvllm", "tinyvllm / llama.cpp", "weight-read bound"]
  quantize = f"--quantize {p.quantize}" if p.quantize else "default settings (the GGUF's blocks kept packed)"
  lines = [
    f"Same GGUF ({p.gguf.name}, {weight_bytes / 1e6:.1f} MB), {p.threads} threads each; tinyvllm with {quantize}. "
    f"Serving: `tinyvllm bench serve`'s client, {p.num_prompts} prompts x {p.max_tokens} tokens (ignore_eos, greedy, "
    f"each level run once untimed first) against llama-server -np {max(p.concurrency)} and serve-lite (its levels "
    "once /health says its background warm-up finished: steady states, not captures of new batch shapes).",
    "",
    markdown_table(header, table),
    "",
    f"Weight-read bound: sequences x {bandwidth / 1e9:.1f} GB/s (numpy copy, read + write, best of 5) / the file's "
    f"{weight_bytes / 1e6:.1f} MB, read once per decode step (KV and compute not counted).",
    "",
    SPECULATIVE_NOTE,
    *(f"\nSkipped {name}: {why}" for name, why in skipped.items()),
  ]
  fields = {"parameters": asdict(p) | {"gguf": str(p.gguf)}, "bandwidth_bytes_s": bandwidth}
  fields |= {"weight_bytes": weight_bytes, "results": results, "skipped": skipped}
  return run.data("vs-llamacpp", **fields), run.markdown("vs-llamacpp", lines)


def run_vs_llamacpp(run: Run, p: VsParams, bin_dir: Path | None) -> tuple[dict, str]:
  """llama.cpp's side first (no tinyvllm engine alive in this process meanwhile), then tinyvllm's."""
  skipped = {}
  tools, why = find_tools(bin_dir)
  results = {}
  if why:
    skipped[LLAMA] = why
    ui.err.print(f"{LLAMA}: {why}; its column is skipped", soft_wrap=True, highlight=False, markup=False)
  else:
    metrics, raw = llamacpp_side(tools, p, skipped)
    results[LLAMA] = {"metrics": metrics, "raw": raw}
  metrics, raw = tinyvllm_side(run, p)
  results["tinyvllm"] = {"metrics": metrics, "raw": raw}
  bandwidth = copy_bandwidth(p.threads)
  run.finished()
  return vs_report(run, p, results, skipped, bandwidth)
