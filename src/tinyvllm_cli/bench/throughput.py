"""`tinyvllm bench throughput`: the seed's table (001) on nano-vllm's bench.py workload, for tinyvllm and its peers."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from tinyvllm_cli.bench.common import BenchModel, Run, markdown_table, now, progress_bar, run_requests


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
  def nano_vllm(
    num_seqs: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
    seed: int = 0,
    temperature: float = 0.6,
  ):
    """nano-vllm's generator, call for call (token ids are capped by a smaller vocabulary)."""
    rng = random.Random(seed)
    top = min(10000, vocab_size - 1)
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(*input_len))] for _ in range(num_seqs)]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(num_seqs)], temperature)

  def other_tokens(self) -> Workload:
    """The same lengths with every token id changed (no block in common with this workload)."""
    top = max(max(p) for p in self.prompts) + 1
    return Workload([[(t + 1) % top for t in p] for p in self.prompts], self.output_lens, self.temperature)

  def max_len(self) -> int:
    return max(len(p) + n for p, n in zip(self.prompts, self.output_lens))


@dataclass
class BackendOptions:
  kv_cache_gb: float = 1.0
  max_num_seqs: int = 32
  max_num_batched_tokens: int = 512
  quantize: str | None = None  # int8 or gguf weights
  beam: int = 0
  dtype: str = "auto"
  transformers_batch_size: int = 8
  seed: int = 0
  warmup: str = "full"  # tinyvllm: the workload once untimed, or "one" request (nano-vllm's)
  torch_threads: int | None = None

  def engine(self) -> dict:
    """LLMEngine's settings."""
    keys = ("kv_cache_gb", "max_num_seqs", "max_num_batched_tokens", "quantize", "beam", "dtype")
    return {k: getattr(self, k) for k in keys}

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
  requests: list[dict] = field(default_factory=list)  # per-request timings (s, from the timed start)
  info: dict = field(default_factory=dict)

  @property
  def gen_throughput(self) -> float:
    return self.gen_tokens / self.duration

  @property
  def total_throughput(self) -> float:
    return (self.input_tokens + self.gen_tokens) / self.duration

  def summary(self) -> dict:
    return asdict(self) | {"gen_throughput": self.gen_throughput, "total_throughput": self.total_throughput}


def run_tinyvllm(model: BenchModel, device: str, workload: Workload, opts: BackendOptions) -> BackendResult:
  """Warm-up "full" runs the workload once with other token ids (same batches, no prefix-cache hits), so every JIT
  capture happens before timing."""
  from tinyvllm_core import LLMEngine, SamplingParams, resolve_dtype

  engine = LLMEngine(model.files(device), device=device, **opts.engine())
  temperature = workload.temperature
  params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
  where = f"({model.name}, {device})"
  if opts.warmup == "full":
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
    "engine": opts.engine(),
    "dtype": resolve_dtype(opts.dtype, device),
    "warmup": opts.warmup,
    "max_model_len": engine.max_model_len,
    "stats": engine.stats(),
    "weight_bytes": sum(w.nbytes() for w in {id(w): w for w in engine.runner.model.weights.values()}.values()),
  }
  input_tokens = sum(r["prompt_tokens"] for r in requests)
  gen_tokens = sum(r["output_tokens"] for r in requests)
  return BackendResult(opts.label, len(requests), input_tokens, gen_tokens, duration, requests, info)


METRICS = [
  ("Total Sequences", "num_seqs", "{:,}"),
  ("Total Input Tokens", "input_tokens", "{:,}"),
  ("Total Gen Tokens", "gen_tokens", "{:,}"),
  ("Total Duration", "duration", "{:.2f} s"),
  ("Gen Throughput", "gen_throughput", "{:,.2f} tok/s"),
  ("Total Throughput", "total_throughput", "{:,.2f} tok/s"),
]
WARMUP_TEXT = {
  "one": "Warm-up: one request per backend (tinyvllm's JIT captures are timed).",
  "full": "Warm-up: tinyvllm runs the workload once untimed with other token ids; the peers run one request.",
}


def throughput_report(run: Run, workload: Workload, params: dict, results: list[BackendResult], skipped: dict):
  first = results[0]
  keys = ("duration", "gen_throughput", "total_throughput")
  ratios = {r.backend: {k: getattr(r, k) / getattr(first, k) for k in keys} for r in results[1:]}
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
  header = ["Metric", *(r.backend for r in results), *(f"{r.backend} / {first.backend}" for r in results[1:])]
  rows = []
  for name, key, fmt in METRICS:
    values = [getattr(r, key) for r in results]
    rows.append([f"**{name}**", *(fmt.format(v) for v in values), *(f"{v / values[0]:.2f}x" for v in values[1:])])
  lines = [
    f"Workload: nano-vllm's bench generator (seed {params['seed']}): {len(workload.prompts)} sequences, prompt "
    f"lengths randint{tuple(params['input_len'])} of random token ids, output lengths "
    f"randint{tuple(params['output_len'])}, temperature {workload.temperature}, ignore_eos. Model: {run.model.name} "
    f"({run.weights()}). {WARMUP_TEXT[params['warmup']]} Only the generate call is timed.",
    "",
    markdown_table(header, rows),
    "",
  ]
  for r in results[1:]:
    lines.append(
      f"Gen throughput: {first.backend} is **{first.gen_throughput / r.gen_throughput:.2f}x** {r.backend} "
      f"({r.backend} reaches {r.gen_throughput / first.gen_throughput:.1%} of {first.backend})"
    )
  lines += [f"\nSkipped {name}: {why}" for name, why in skipped.items()]
  lines += [f"\nNote ({r.backend}): {n}" for r in results for n in r.info.get("notes", [])]
  return data, run.markdown("throughput", lines)


def grid_report(run: Run, workloads: list[Workload], params: dict, results: list[tuple[str, BackendResult]], skipped):
  """Several models or sequence counts: one row per model and backend, its weight memory and gen throughput at each
  count (`workloads`: the last model's, the same lengths for every model with the same vocabulary)."""
  counts = [len(w.prompts) for w in workloads]
  rows: dict[tuple[str, str], dict[int, BackendResult]] = {}
  for model, r in results:
    rows.setdefault((model, r.backend), {})[r.num_seqs] = r
  header = ["Model", "Backend", "Weights", *(f"Gen tok/s, {n} seq{'s' if n > 1 else ''}" for n in counts)]
  table = []
  for (model, backend), by_count in rows.items():
    weights = next(iter(by_count.values())).info.get("weight_bytes")
    speeds = [f"{by_count[n].gen_throughput:,.2f}" if n in by_count else "-" for n in counts]
    table.append([model, backend, f"{weights / 1e6:,.1f} MB" if weights else "-", *speeds])
  described = [
    {"num_seqs": len(w.prompts), "input_tokens": w.input_tokens, "gen_tokens": w.gen_tokens} for w in workloads
  ]
  summaries = {
    f"{backend} ({model}, {n} seqs)": r.summary() for (model, backend), rs in rows.items() for n, r in rs.items()
  }
  data = run.data("throughput", parameters=params, workloads=described, results=summaries, skipped=skipped)
  lines = [
    f"Workload: nano-vllm's bench generator (seed {params['seed']}) for {' and '.join(map(str, counts))} sequences: "
    f"prompt lengths randint{tuple(params['input_len'])} of random token ids, output lengths "
    f"randint{tuple(params['output_len'])}, temperature {workloads[0].temperature}, ignore_eos. Models: "
    f"{', '.join(m.name for m in run.models)} ({run.weights()}). {WARMUP_TEXT[params['warmup']]} Gen tok/s: "
    "generated tokens over the generate call's time (prefill included); Weights: tinyvllm's weights on the device.",
    "",
    markdown_table(header, table),
  ]
  lines += [f"\nSkipped {name}: {why}" for name, why in skipped.items()]
  notes = dict.fromkeys(n for _, r in results for n in r.info.get("notes", []))
  lines += [f"\nNote: {n}" for n in notes]
  return data, run.markdown("throughput", lines)
