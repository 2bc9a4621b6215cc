"""`tinyvllm bench throughput`: the seed's table (001) on nano-vllm's workload, for tinyvllm and its peers.

nano-vllm's bench.py: random.seed(0); 256 prompts of randint(100, 1024) token ids randint(0, 10000);
max_tokens randint(100, 1024) each; temperature 0.6, ignore_eos; one warm-up request, then only the
generate call is timed. Every backend gets the same workload, one after the other. nano-vllm captures its
CUDA graphs at start-up; tinygrad captures a JIT per new batch shape on first sight, so tinyvllm's default
warm-up runs the workload once untimed (`--warmup one` is nano-vllm's single request)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from tinyvllm_cli.bench.common import BenchModel, Run, machine_line, markdown_table, now, progress_bar, run_requests


@dataclass
class Workload:
  prompts: list[list[int]]
  output_lens: list[int]
  temperature: float = 0.6

  @property
  def input_tokens(self) -> int:
    return sum(map(len, self.prompts))

  @property
  def gen_tokens(self) -> int:
    return sum(self.output_lens)

  @staticmethod
  def nano_vllm(num_seqs: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int, seed: int = 0):
    """nano-vllm's generator, call for call (token ids are capped by a smaller vocabulary)."""
    rng, top = random.Random(seed), min(10000, vocab_size - 1)
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(*input_len))] for _ in range(num_seqs)]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(num_seqs)])

  def other_tokens(self) -> Workload:
    """The same lengths with every token id changed (no block in common with this workload)."""
    top = max(max(p) for p in self.prompts) + 1
    return Workload([[(t + 1) % top for t in p] for p in self.prompts], self.output_lens, self.temperature)

  def max_len(self) -> int:
    return max(len(p) + n for p, n in zip(self.prompts, self.output_lens))


@dataclass
class EngineOptions:
  kv_cache_gb: float = 1.0
  max_num_seqs: int = 32
  max_num_batched_tokens: int = 512
  quantize: str | None = None  # int8 or gguf weights
  beam: int = 0  # tinygrad BEAM width while capturing
  dtype: str = "auto"  # float32 | float16 | bfloat16; auto = float32 on CPU, float16 elsewhere

  @property
  def label(self) -> str:
    dtype = f" {self.dtype}" if self.dtype != "auto" else ""
    quantize = f" {self.quantize}" if self.quantize else ""
    return f"tinyvllm{dtype}{quantize}"


@dataclass
class BackendResult:
  backend: str
  num_seqs: int
  input_tokens: int
  gen_tokens: int
  duration: float
  requests: list[dict] = field(default_factory=list)  # raw per-request timings (s, relative to the timed start)
  info: dict = field(default_factory=dict)

  @property
  def gen_throughput(self) -> float:
    return self.gen_tokens / self.duration

  @property
  def total_throughput(self) -> float:
    return (self.input_tokens + self.gen_tokens) / self.duration

  def summary(self) -> dict:
    return asdict(self) | {"gen_throughput": self.gen_throughput, "total_throughput": self.total_throughput}


def run_tinyvllm(model: BenchModel, device: str, workload: Workload, opts: EngineOptions, warmup: str) -> BackendResult:
  """warmup "full": the workload once untimed, with other token ids (so the prefix cache cannot help) and the
  same lengths, so the scheduler builds the same batches and every JIT capture happens before timing;
  "one": nano-vllm's single warm-up request (JIT captures of new batch shapes are then timed)."""
  from tinyvllm_core import LLMEngine, SamplingParams, resolve_dtype

  engine = LLMEngine(model.files(device), device=device, **asdict(opts))
  temperature = workload.temperature
  params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
  where = f"({model.name}, {device})"
  if warmup == "full":
    with progress_bar(f"{opts.label} warm-up {where}", workload.gen_tokens) as advance:
      run_requests(engine, workload.other_tokens().prompts, params, advance, now())
  else:
    prompt = engine.encode("Benchmark: ") if engine.tokenizer else workload.prompts[0][:8]
    one = SamplingParams(temperature=temperature, max_tokens=16, ignore_eos=True)
    run_requests(engine, [prompt], [one], lambda n: None, now())
  with progress_bar(f"{opts.label} {where}", workload.gen_tokens) as advance:
    t0 = now()
    requests = run_requests(engine, workload.prompts, params, advance, t0)
    duration = now() - t0
  info = {
    "engine": asdict(opts),
    "dtype": resolve_dtype(opts.dtype, device),
    "warmup": warmup,
    "max_model_len": engine.max_model_len,
    "stats": engine.stats(),
  }
  input_tokens = sum(r["prompt_tokens"] for r in requests)
  gen_tokens = sum(r["output_tokens"] for r in requests)
  return BackendResult(opts.label, len(requests), input_tokens, gen_tokens, duration, requests, info)


# ---- the table -------------------------------------------------------------------------------

METRICS = [
  ("Total Sequences", "num_seqs", "{:,}"),
  ("Total Input Tokens", "input_tokens", "{:,}"),
  ("Total Gen Tokens", "gen_tokens", "{:,}"),
  ("Total Duration", "duration", "{:.2f} s"),
  ("Gen Throughput", "gen_throughput", "{:,.2f} tok/s"),
  ("Total Throughput", "total_throughput", "{:,.2f} tok/s"),
]
WARMUP_TEXT = {
  "one": "Warm-up: one request per backend (tinyvllm's JIT captures of new batch shapes are timed).",
  "full": "Warm-up: tinyvllm runs the workload once untimed with other token ids (same batch shapes, no prefix-cache "
  "hits), so no JIT capture is timed; the peers warm up with one request.",
}


def throughput_table(results: list[BackendResult]) -> str:
  first, others = results[0], results[1:]
  header = ["Metric", *(r.backend for r in results), *(f"{r.backend} / {first.backend}" for r in others)]
  rows = []
  for name, key, fmt in METRICS:
    values = [getattr(r, key) for r in results]
    rows.append([f"**{name}**", *(fmt.format(v) for v in values), *(f"{v / values[0]:.2f}x" for v in values[1:])])
  return markdown_table(header, rows)


def throughput_report(
  run: Run, workload: Workload, params: dict, results: list[BackendResult], skipped: dict[str, str]
):
  first = results[0]
  ratios = {
    r.backend: {
      "duration": r.duration / first.duration,
      "gen_throughput": r.gen_throughput / first.gen_throughput,
      "total_throughput": r.total_throughput / first.total_throughput,
    }
    for r in results[1:]
  }
  described = {
    "num_seqs": len(workload.prompts),
    "input_tokens": workload.input_tokens,
    "gen_tokens": workload.gen_tokens,
    "temperature": workload.temperature,
    "ignore_eos": True,
  }
  summaries = {r.backend: r.summary() for r in results}
  data = run.data(
    "throughput", parameters=params, workload=described, results=summaries, skipped=skipped, ratios_to_first=ratios
  )
  weights = "random weights from its config" if run.model.random_weights else "real weights"
  lines = [
    f"Workload: nano-vllm's bench generator (seed {params['seed']}): {len(workload.prompts)} sequences, prompt "
    f"lengths randint{tuple(params['input_len'])} of random token ids, output lengths "
    f"randint{tuple(params['output_len'])}, temperature {workload.temperature}, ignore_eos. Model: {run.model.name} "
    f"({weights}). {WARMUP_TEXT[params['warmup']]} Only the generate call is timed.",
    "",
    f"Machine: {machine_line(run.machine)}",
    "",
    throughput_table(results),
    "",
  ]
  for r in results[1:]:
    lines.append(
      f"Gen throughput: {first.backend} is **{first.gen_throughput / r.gen_throughput:.2f}x** {r.backend} "
      f"({r.backend} reaches {r.gen_throughput / first.gen_throughput:.1%} of {first.backend})"
    )
  lines += [f"\nSkipped {name}: {why}" for name, why in skipped.items()]
  lines += [f"\nNote ({r.backend}): {n}" for r in results for n in r.info.get("notes", [])]
  return data, run.markdown(f"throughput: {run.model.name} on {run.device}", lines)
