"""`tinyvllm bench latency`: the seed's table (000): one request, N requests one after another, and the
same N requests at once through continuous batching; tokens/s, requests/s, mean TTFT and time per output token."""
from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass

from tinyvllm_cli.bench_common import BenchModel, Report, machine_line, markdown_table, now, progress_bar, timestamp


@dataclass
class LatencyParams:
  num_requests: int = 5
  prompt_len: int = 16
  max_tokens: int = 20
  kv_cache_gb: float = 1.0
  seed: int = 0
  beam: int = 0  # tinygrad BEAM width while capturing (searched once, cached on disk)


@dataclass
class RequestTiming:
  """One request's timeline in seconds, relative to the start of its row."""
  prompt_tokens: int
  output_tokens: int
  arrival: float
  first_token: float
  finish: float

  @property
  def ttft(self) -> float: return self.first_token - self.arrival
  @property
  def tpot(self) -> float: return (self.finish - self.first_token) / max(self.output_tokens - 1, 1)


@dataclass
class LatencyRow:
  name: str
  duration: float
  requests: list[RequestTiming]

  @property
  def output_tokens(self) -> int: return sum(r.output_tokens for r in self.requests)
  @property
  def tokens_per_s(self) -> float: return self.output_tokens / self.duration
  @property
  def requests_per_s(self) -> float: return len(self.requests) / self.duration
  @property
  def mean_ttft(self) -> float: return statistics.fmean(r.ttft for r in self.requests)
  @property
  def mean_tpot(self) -> float: return statistics.fmean(r.tpot for r in self.requests)

  def summary(self) -> dict:
    return {"name": self.name, "num_requests": len(self.requests), "output_tokens": self.output_tokens, "duration_s": self.duration,
            "tokens_per_s": self.tokens_per_s, "requests_per_s": self.requests_per_s, "mean_ttft_s": self.mean_ttft,
            "mean_tpot_s": self.mean_tpot, "requests": [asdict(r) | {"ttft": r.ttft, "tpot": r.tpot} for r in self.requests]}


class PromptSource:
  """Distinct random token-id prompts (no two share a block, so the prefix cache never helps)."""
  def __init__(self, vocab_size: int, length: int, seed: int):
    self.rng, self.vocab_size, self.length = random.Random(seed), vocab_size, length

  def take(self, n: int) -> list[list[int]]:
    return [[self.rng.randrange(self.vocab_size) for _ in range(self.length)] for _ in range(n)]


def run_together(engine, prompts: list[list[int]], params, t0: float, advance) -> list[RequestTiming]:
  """Submit all prompts at once and step the engine until they finish; timings relative to t0."""
  arrivals, first, done = {}, {}, {}
  for p in prompts:
    rid = engine.add_request(p, params)
    arrivals[rid] = now() - t0
  while engine.has_unfinished_requests():
    for out in engine.step():
      if out.request_id not in arrivals: continue
      t = now() - t0
      first.setdefault(out.request_id, t)
      advance(len(out.delta_token_ids))
      if out.finished: done[out.request_id] = (t, len(out.token_ids), len(out.prompt_token_ids))
  return [RequestTiming(done[r][2], done[r][1], arrivals[r], first[r], done[r][0]) for r in arrivals]


def run_row(engine, name: str, prompts: list[list[int]], params, concurrent: bool, advance) -> LatencyRow:
  t0 = now()
  if concurrent: timings = run_together(engine, prompts, params, t0, advance)
  else: timings = [t for p in prompts for t in run_together(engine, [p], params, t0, advance)]
  return LatencyRow(name, now() - t0, timings)


def run_latency(model: BenchModel, device: str, p: LatencyParams) -> list[LatencyRow]:
  """Warm up with the same shapes (one request, then N at once), then time the three rows."""
  from tinyvllm_core import LLMEngine, SamplingParams
  engine = LLMEngine(model.files(device), device=device, kv_cache_gb=p.kv_cache_gb, beam=p.beam)
  params = SamplingParams(temperature=0.0, max_tokens=p.max_tokens, ignore_eos=True)
  prompts = PromptSource(engine.model_config.vocab_size, p.prompt_len, p.seed)
  n = p.num_requests
  total = p.max_tokens * (2 + 3 * n)  # two warm-up rows, then the three timed ones
  with progress_bar(f"latency ({model.name}, {device})", total) as advance:
    run_row(engine, "warmup_single", prompts.take(1), params, False, advance)
    run_row(engine, "warmup_concurrent", prompts.take(n), params, True, advance)
    return [run_row(engine, "single_request", prompts.take(1), params, False, advance),
            run_row(engine, f"sequential_{n}", prompts.take(n), params, False, advance),
            run_row(engine, f"concurrent_{n}", prompts.take(n), params, True, advance)]


def host_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
  """Host memory bandwidth seen by one core: the best of a few large copies (read + write)."""
  import numpy as np
  src = np.ones(mib * 2**20 // 4, dtype=np.float32)
  dst, best = np.empty_like(src), float("inf")
  for _ in range(repeats):
    t0 = now()
    np.copyto(dst, src)
    best = min(best, now() - t0)
  return 2 * src.nbytes / best / 1e9


def decode_bound(model: BenchModel, device: str) -> dict | None:
  """The physical limit of a decode step on CPU: every weight read once (float32, as the engine keeps them there)
  at the host's memory bandwidth. Other backends: unknown bandwidth, no bound."""
  if device != "CPU": return None
  from tinyvllm_cli.bench_common import hf_config_from
  from tinyvllm_cli.models import estimate_params
  mc = model.model_config()
  params = estimate_params(model.hf_config or hf_config_from(mc)) or 0
  read = params - (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size)  # embeddings: one row per token
  bandwidth = host_bandwidth_gbs()
  return {"weight_bytes_per_step": read * 4, "host_bandwidth_gb_s": bandwidth, "min_step_s": read * 4 / (bandwidth * 1e9)}


def bound_line(bound: dict | None, rows: list[LatencyRow]) -> str:
  if bound is None: return "Decode bound: not computed (the memory bandwidth of this backend is not measured here)."
  step, tpot = bound["min_step_s"], rows[0].mean_tpot
  return (f"Decode bound: {bound['weight_bytes_per_step'] / 1e6:,.0f} MB of float32 weights read per step at "
          f"{bound['host_bandwidth_gb_s']:.1f} GB/s (host memory copy, one core) = {step * 1e3:.1f} ms per step, at most "
          f"{1 / step:.1f} tok/s for one sequence; single_request measured {tpot * 1e3:.1f} ms per token, {step / tpot:.0%} of the bound's speed.")


def speedup(rows: list[LatencyRow]) -> float:
  return rows[2].tokens_per_s / rows[1].tokens_per_s


def latency_report(model: BenchModel, device: str, p: LatencyParams, rows: list[LatencyRow], command: str, notes: list[str],
                   machine: dict) -> Report:
  bound = decode_bound(model, device)
  data = {"preset": "latency", "command": command, "timestamp": timestamp(), "model": model.describe(), "device": device,
          "parameters": asdict(p) | {"temperature": 0.0, "ignore_eos": True, "prompts": "distinct random token ids"},
          "machine": machine, "results": [r.summary() for r in rows], "concurrent_vs_sequential_speedup": speedup(rows),
          "decode_bound": bound, "notes": notes}
  return Report("latency", model.slug, device, data, latency_markdown(model, device, p, rows, command, machine, bound, notes))


def latency_markdown(model: BenchModel, device: str, p: LatencyParams, rows: list[LatencyRow], command: str,
                     machine: dict, bound: dict | None, notes: list[str]) -> str:
  header = ["Benchmark", "Tokens/sec", "Requests/sec", "Mean TTFT (ms)", "Mean TPOT (ms)"]
  table = markdown_table(header, [[r.name, f"{r.tokens_per_s:.1f}", f"{r.requests_per_s:.2f}", f"{r.mean_ttft * 1e3:.1f}",
                                   f"{r.mean_tpot * 1e3:.1f}"] for r in rows])
  weights = "random weights" if model.random_weights else "real weights"
  config = ("dim=64, n_layers=4, n_heads=4, vocab 1024 (the seed's toy)" if model.name == "toy" else weights)
  lines = [f"# tinyvllm bench latency: {model.name} on {device}", "", f"`{command}`", "",
           f"Config: {config}, max_tokens={p.max_tokens}, {p.num_requests} requests, prompts of {p.prompt_len} random token ids, "
           f"greedy, ignore_eos, kv_cache_gb={p.kv_cache_gb}", "",
           f"Machine: {machine_line(machine)}", "", table, "",
           f"Concurrent vs Sequential: **{speedup(rows):.2f}x** speedup", "", bound_line(bound, rows), "",
           "TTFT: time from a request's submission to its first token. TPOT: mean time per output token after the first. "
           "Warm-up (untimed): one request, then the concurrent batch, so every batch shape is captured by the JIT "
           "before timing."]
  return "\n".join(lines + [f"\nNote: {n}" for n in notes])
