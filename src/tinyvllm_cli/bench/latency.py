"""`tinyvllm bench latency`: the seed's table (000): one request, N requests one after another, and the
same N requests at once through continuous batching; tokens/s, requests/s, mean TTFT and time per output token."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from tinyvllm_cli.bench.common import PromptSource, Run, machine_line, markdown_table, now, progress_bar, run_requests

TIMING_KEYS = ("prompt_tokens", "output_tokens", "arrival", "first_token", "finish")


@dataclass
class LatencyParams:
  num_requests: int = 5
  prompt_len: int = 16
  max_tokens: int = 20
  kv_cache_gb: float = 1.0
  seed: int = 0
  beam: int = 0  # tinygrad BEAM width while capturing (searched once, cached on disk)


@dataclass
class LatencyRow:
  name: str
  duration: float
  requests: list[dict]  # run_requests' timings, relative to the start of the row

  @property
  def tokens_per_s(self) -> float:
    return sum(r["output_tokens"] for r in self.requests) / self.duration

  @property
  def mean_ttft(self) -> float:
    return statistics.fmean(ttft(r) for r in self.requests)

  @property
  def mean_tpot(self) -> float:
    return statistics.fmean(tpot(r) for r in self.requests)

  def summary(self) -> dict:
    requests = [{k: r[k] for k in TIMING_KEYS} | {"ttft": ttft(r), "tpot": tpot(r)} for r in self.requests]
    return {
      "name": self.name,
      "num_requests": len(self.requests),
      "output_tokens": sum(r["output_tokens"] for r in self.requests),
      "duration_s": self.duration,
      "tokens_per_s": self.tokens_per_s,
      "requests_per_s": len(self.requests) / self.duration,
      "mean_ttft_s": self.mean_ttft,
      "mean_tpot_s": self.mean_tpot,
      "requests": requests,
    }


def ttft(r: dict) -> float:
  return r["first_token"] - r["arrival"]


def tpot(r: dict) -> float:
  return (r["finish"] - r["first_token"]) / max(r["output_tokens"] - 1, 1)


def run_row(engine, name: str, prompts: list[list[int]], params, concurrent: bool, advance) -> LatencyRow:
  t0 = now()
  if concurrent:
    timings = run_requests(engine, prompts, [params] * len(prompts), advance, t0)
  else:
    timings = [t for p in prompts for t in run_requests(engine, [p], [params], advance, t0)]
  return LatencyRow(name, now() - t0, timings)


def run_latency(run: Run, p: LatencyParams) -> list[LatencyRow]:
  """Warm up with the same shapes (one request, then N at once), then time the three rows."""
  from tinyvllm_core import LLMEngine, SamplingParams

  engine = LLMEngine(run.model.files(run.device), device=run.device, kv_cache_gb=p.kv_cache_gb, beam=p.beam)
  params = SamplingParams(temperature=0.0, max_tokens=p.max_tokens, ignore_eos=True)
  prompts = PromptSource(engine.model_config.vocab_size, p.prompt_len, p.seed)
  n = p.num_requests
  total = p.max_tokens * (2 + 3 * n)  # two warm-up rows, then the three timed ones
  with progress_bar(f"latency ({run.model.name}, {run.device})", total) as advance:
    run_row(engine, "warmup_single", prompts.take(1), params, False, advance)
    run_row(engine, "warmup_concurrent", prompts.take(n), params, True, advance)
    single = run_row(engine, "single_request", prompts.take(1), params, False, advance)
    sequential = run_row(engine, f"sequential_{n}", prompts.take(n), params, False, advance)
    concurrent = run_row(engine, f"concurrent_{n}", prompts.take(n), params, True, advance)
  run.finished()
  return [single, sequential, concurrent]


def host_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
  """Host memory bandwidth seen by one core: the best of a few large copies (read + write)."""
  import numpy as np

  src = np.ones(mib * 2**20 // 4, dtype=np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(repeats):
    t0 = now()
    np.copyto(dst, src)
    best = min(best, now() - t0)
  return 2 * src.nbytes / best / 1e9


def decode_bound(run: Run) -> dict | None:
  """The physical limit of a decode step on CPU: every weight read once (float32, as the engine keeps them there)
  at the host's memory bandwidth. Other backends: unknown bandwidth, no bound."""
  if run.device != "CPU":
    return None
  from tinyvllm_cli.bench.common import hf_config_from
  from tinyvllm_cli.models import estimate_params

  mc = run.model.model_config()
  params = estimate_params(run.model.hf_config or hf_config_from(mc)) or 0
  embeddings = 0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size  # one row read per token
  weight_bytes = (params - embeddings) * 4
  bandwidth = host_bandwidth_gbs()
  return {
    "weight_bytes_per_step": weight_bytes,
    "host_bandwidth_gb_s": bandwidth,
    "min_step_s": weight_bytes / (bandwidth * 1e9),
  }


def bound_line(bound: dict | None, rows: list[LatencyRow]) -> str:
  if bound is None:
    return "Decode bound: not computed (the memory bandwidth of this backend is not measured here)."
  step, tpot_s = bound["min_step_s"], rows[0].mean_tpot
  return (
    f"Decode bound: {bound['weight_bytes_per_step'] / 1e6:,.0f} MB of float32 weights read per step at "
    f"{bound['host_bandwidth_gb_s']:.1f} GB/s (host memory copy, one core) = {step * 1e3:.1f} ms per step, at most "
    f"{1 / step:.1f} tok/s for one sequence; single_request measured {tpot_s * 1e3:.1f} ms per token, "
    f"{step / tpot_s:.0%} of the bound's speed."
  )


def latency_report(run: Run, p: LatencyParams, rows: list[LatencyRow]) -> tuple[dict, str]:
  bound = decode_bound(run)
  speedup = rows[2].tokens_per_s / rows[1].tokens_per_s
  parameters = asdict(p) | {"temperature": 0.0, "ignore_eos": True, "prompts": "distinct random token ids"}
  results = [r.summary() for r in rows]
  data = run.data(
    "latency", parameters=parameters, results=results, concurrent_vs_sequential_speedup=speedup, decode_bound=bound
  )
  header = ["Benchmark", "Tokens/sec", "Requests/sec", "Mean TTFT (ms)", "Mean TPOT (ms)"]
  cells = [
    [r["name"], f"{r['tokens_per_s']:.1f}", f"{r['requests_per_s']:.2f}"]
    + [f"{r['mean_ttft_s'] * 1e3:.1f}", f"{r['mean_tpot_s'] * 1e3:.1f}"]
    for r in results
  ]
  weights = "random weights" if run.model.random_weights else "real weights"
  config = "dim=64, n_layers=4, n_heads=4, vocab 1024 (the seed's toy)" if run.model.name == "toy" else weights
  lines = [
    f"Config: {config}, max_tokens={p.max_tokens}, {p.num_requests} requests, prompts of {p.prompt_len} random token "
    f"ids, greedy, ignore_eos, kv_cache_gb={p.kv_cache_gb}",
    "",
    f"Machine: {machine_line(run.machine)}",
    "",
    markdown_table(header, cells),
    "",
    f"Concurrent vs Sequential: **{speedup:.2f}x** speedup",
    "",
    bound_line(bound, rows),
    "",
    "TTFT: time from a request's submission to its first token. TPOT: mean time per output token after the first. "
    "Warm-up (untimed): one request, then the concurrent batch, so every batch shape is captured by the JIT "
    "before timing.",
  ]
  return data, run.markdown(f"latency: {run.model.name} on {run.device}", lines)
