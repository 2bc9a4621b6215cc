"""`tinyvllm bench latency`: the seed's table (000): one request, N one after another, N at once."""

from __future__ import annotations

import statistics
import timeit
from dataclasses import asdict, dataclass

from tinyvllm_cli.bench.common import PromptSource, Run, markdown_table, now, progress_bar, run_requests

TIMING_KEYS = ("prompt_tokens", "output_tokens", "arrival", "first_token", "finish")


@dataclass
class LatencyParams:
  num_requests: int = 5
  prompt_len: int = 16
  max_tokens: int = 20
  kv_cache_gb: float = 1.0
  seed: int = 0
  beam: int = 0


def ttft(r: dict) -> float:
  return r["first_token"] - r["arrival"]


def tpot(r: dict) -> float:
  return (r["finish"] - r["first_token"]) / max(r["output_tokens"] - 1, 1)


def run_row(engine, name: str, prompts: list[list[int]], params, concurrent: bool, advance) -> dict:
  """One row of the table, timed from its start."""
  t0 = now()
  if concurrent:
    timings = run_requests(engine, prompts, [params] * len(prompts), advance, t0)
  else:
    timings = [t for p in prompts for t in run_requests(engine, [p], [params], advance, t0)]
  duration = now() - t0
  output_tokens = sum(r["output_tokens"] for r in timings)
  return {
    "name": name,
    "num_requests": len(timings),
    "output_tokens": output_tokens,
    "duration_s": duration,
    "tokens_per_s": output_tokens / duration,
    "requests_per_s": len(timings) / duration,
    "mean_ttft_s": statistics.fmean(ttft(r) for r in timings),
    "mean_tpot_s": statistics.fmean(tpot(r) for r in timings),
    "requests": [{k: r[k] for k in TIMING_KEYS} | {"ttft": ttft(r), "tpot": tpot(r)} for r in timings],
  }


def run_latency(run: Run, p: LatencyParams) -> list[dict]:
  """Warm up with the same shapes (one request, then N at once), then time the three rows."""
  from tinyvllm_core import LLMEngine, SamplingParams

  engine = LLMEngine(run.model.files(run.device), device=run.device, kv_cache_gb=p.kv_cache_gb, beam=p.beam)
  params = SamplingParams(temperature=0.0, max_tokens=p.max_tokens, ignore_eos=True)
  prompts = PromptSource(engine.model_config.vocab_size, p.prompt_len, p.seed)
  n = p.num_requests
  rows = [("single_request", 1, False), (f"sequential_{n}", n, False), (f"concurrent_{n}", n, True)]
  with progress_bar(f"latency ({run.model.name}, {run.device})", p.max_tokens * (2 + 3 * n)) as advance:
    run_row(engine, "warmup_single", prompts.take(1), params, False, advance)
    run_row(engine, "warmup_concurrent", prompts.take(n), params, True, advance)
    results = [run_row(engine, name, prompts.take(k), params, concurrent, advance) for name, k, concurrent in rows]
  run.finished()
  return results


def decode_bound(run: Run) -> dict | None:
  """On CPU: every float32 weight read once per decode step at the host's memory bandwidth (one core's best copy)."""
  if run.device.split(":")[0] != "CPU":
    return None
  import numpy as np

  from tinyvllm_cli.bench.common import hf_config_from
  from tinyvllm_cli.models import estimate_params

  mc = run.model.model_config()
  params = estimate_params(run.model.hf_config or hf_config_from(mc)) or 0
  embeddings = 0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size  # one row read per token
  weight_bytes = (params - embeddings) * 4
  src = np.ones(256 * 2**20 // 4, dtype=np.float32)
  dst = np.empty_like(src)
  best = min(timeit.repeat(lambda: np.copyto(dst, src), number=1, repeat=5))
  bandwidth = 2 * src.nbytes / best / 1e9
  return {
    "weight_bytes_per_step": weight_bytes,
    "host_bandwidth_gb_s": bandwidth,
    "min_step_s": weight_bytes / (bandwidth * 1e9),
  }


def bound_line(bound: dict | None, single: dict) -> str:
  if bound is None:
    return "Decode bound: not computed (the memory bandwidth of this backend is not measured here)."
  step = bound["min_step_s"]
  tpot_s = single["mean_tpot_s"]
  return (
    f"Decode bound: {bound['weight_bytes_per_step'] / 1e6:,.0f} MB of float32 weights read per step at "
    f"{bound['host_bandwidth_gb_s']:.1f} GB/s (host memory copy, one core) = {step * 1e3:.1f} ms per step, at most "
    f"{1 / step:.1f} tok/s for one sequence; single_request measured {tpot_s * 1e3:.1f} ms per token, "
    f"{step / tpot_s:.0%} of the bound's speed."
  )


def latency_report(run: Run, p: LatencyParams, results: list[dict]) -> tuple[dict, str]:
  bound = decode_bound(run)
  speedup = results[2]["tokens_per_s"] / results[1]["tokens_per_s"]
  parameters = asdict(p) | {"temperature": 0.0, "ignore_eos": True, "prompts": "distinct random token ids"}
  data = run.data(
    "latency", parameters=parameters, results=results, concurrent_vs_sequential_speedup=speedup, decode_bound=bound
  )
  header = ["Benchmark", "Tokens/sec", "Requests/sec", "Mean TTFT (ms)", "Mean TPOT (ms)"]
  cells = [
    [r["name"], f"{r['tokens_per_s']:.1f}", f"{r['requests_per_s']:.2f}"]
    + [f"{r['mean_ttft_s'] * 1e3:.1f}", f"{r['mean_tpot_s'] * 1e3:.1f}"]
    for r in results
  ]
  config = "dim=64, n_layers=4, n_heads=4, vocab 1024 (the seed's toy)" if run.model.name == "toy" else run.weights()
  lines = [
    f"Config: {config}, max_tokens={p.max_tokens}, {p.num_requests} requests, prompts of {p.prompt_len} random token "
    f"ids, greedy, ignore_eos, kv_cache_gb={p.kv_cache_gb}",
    "",
    markdown_table(header, cells),
    "",
    f"Concurrent vs Sequential: **{speedup:.2f}x** speedup",
    "",
    bound_line(bound, results[0]),
    "",
    "TTFT: submission to first token. TPOT: mean time per output token after the first. Every batch shape is "
    "captured by the JIT in an untimed warm-up.",
  ]
  return data, run.markdown("latency", lines)
