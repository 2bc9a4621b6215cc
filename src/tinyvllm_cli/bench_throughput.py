"""`tinyvllm bench throughput`: the seed's table (001) on nano-vllm's workload, for tinyvllm and its peers.

nano-vllm's bench.py: random.seed(0); 256 prompts of randint(100, 1024) token ids randint(0, 10000);
max_tokens randint(100, 1024) each; temperature 0.6, ignore_eos; one warm-up request, then only the
generate call is timed. Every backend gets the same workload, one after the other. nano-vllm captures its
CUDA graphs at start-up; tinygrad captures a JIT per new batch shape on first sight, so tinyvllm's default
warm-up runs the workload once untimed (`--warmup one` is nano-vllm's single request)."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from tinyvllm_cli.bench_common import BenchModel, Report, machine_line, markdown_table, now, progress_bar, timestamp
from tinyvllm_cli.engine_options import resolved_dtype


@dataclass
class Workload:
  prompts: list[list[int]]
  output_lens: list[int]
  temperature: float = 0.6

  @property
  def input_tokens(self) -> int: return sum(map(len, self.prompts))
  @property
  def gen_tokens(self) -> int: return sum(self.output_lens)

  @staticmethod
  def nano_vllm(num_seqs: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int, seed: int = 0) -> Workload:
    """nano-vllm's generator, call for call (token ids are capped by a smaller vocabulary)."""
    rng, top = random.Random(seed), min(10000, vocab_size - 1)
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(*input_len))] for _ in range(num_seqs)]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(num_seqs)])

  def other_tokens(self) -> Workload:
    """The same lengths with every token id changed (no block in common with this workload)."""
    top = max(max(p) for p in self.prompts) + 1
    return Workload([[(t + 1) % top for t in p] for p in self.prompts], self.output_lens, self.temperature)

  def describe(self) -> dict:
    return {"num_seqs": len(self.prompts), "input_tokens": self.input_tokens, "gen_tokens": self.gen_tokens,
            "temperature": self.temperature, "ignore_eos": True}


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
    return "tinyvllm" + (f" {self.dtype}" if self.dtype != "auto" else "") + (f" {self.quantize}" if self.quantize else "")


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
  def gen_throughput(self) -> float: return self.gen_tokens / self.duration
  @property
  def total_throughput(self) -> float: return (self.input_tokens + self.gen_tokens) / self.duration

  def summary(self) -> dict:
    return asdict(self) | {"gen_throughput": self.gen_throughput, "total_throughput": self.total_throughput}


def run_tinyvllm(model: BenchModel, device: str, workload: Workload, opts: EngineOptions, warmup: str = "full") -> BackendResult:
  """warmup "full": the workload once untimed, with other token ids (so the prefix cache cannot help) and the
  same lengths, so the scheduler builds the same batches and every JIT capture happens before timing;
  "one": nano-vllm's single warm-up request (JIT captures of new batch shapes are then timed)."""
  from tinyvllm_core import LLMEngine
  return _run_tinyvllm(LLMEngine(model.files(device), device=device, **asdict(opts)), model, device, workload, opts, warmup)


def _run_tinyvllm(engine, model: BenchModel, device: str, workload: Workload, opts: EngineOptions, warmup: str) -> BackendResult:
  from tinyvllm_core import SamplingParams
  params = [SamplingParams(temperature=workload.temperature, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
  if warmup == "full":
    with progress_bar(f"{opts.label} warm-up ({model.name}, {device})", workload.gen_tokens) as advance:
      _generate(engine, workload.other_tokens().prompts, params, advance)
  else:
    prompt = engine.encode("Benchmark: ") if engine.tokenizer else workload.prompts[0][:8]
    _generate(engine, [prompt], [SamplingParams(temperature=workload.temperature, max_tokens=16, ignore_eos=True)], lambda n: None)
  with progress_bar(f"{opts.label} ({model.name}, {device})", workload.gen_tokens) as advance:
    t0 = now()
    requests = _generate(engine, workload.prompts, params, advance)
    duration = now() - t0
  return BackendResult(opts.label, len(requests), sum(r["prompt_tokens"] for r in requests), sum(r["output_tokens"] for r in requests),
                       duration, requests, {"engine": asdict(opts), "dtype": resolved_dtype(opts.dtype, device), "warmup": warmup, "max_model_len": engine.max_model_len,
                                            "stats": engine.stats()})


def _generate(engine, prompts: list[list[int]], params: list, advance) -> list[dict]:
  """LLM.generate with timings: add every request, step until all finish."""
  t0, timings = now(), {}
  for prompt, sp in zip(prompts, params):
    timings[engine.add_request(prompt, sp)] = {"prompt_tokens": len(prompt), "arrival": now() - t0}
  while engine.has_unfinished_requests():
    for out in engine.step():
      r = timings[out.request_id]
      r.setdefault("first_token", now() - t0)
      advance(len(out.delta_token_ids))
      if out.finished: r |= {"finish": now() - t0, "output_tokens": len(out.token_ids), "finish_reason": out.finish_reason}
  return list(timings.values())


# ---- the table -------------------------------------------------------------------------------

METRICS = [("Total Sequences", lambda r: r.num_seqs, "{:,}"), ("Total Input Tokens", lambda r: r.input_tokens, "{:,}"),
           ("Total Gen Tokens", lambda r: r.gen_tokens, "{:,}"), ("Total Duration", lambda r: r.duration, "{:.2f} s"),
           ("Gen Throughput", lambda r: r.gen_throughput, "{:,.2f} tok/s"), ("Total Throughput", lambda r: r.total_throughput, "{:,.2f} tok/s")]


def throughput_table(results: list[BackendResult]) -> str:
  first, others = results[0], results[1:]
  header = ["Metric", *(r.backend for r in results), *(f"{r.backend} / {first.backend}" for r in others)]
  rows = [[f"**{name}**", *(fmt.format(get(r)) for r in results), *(f"{get(r) / get(first):.2f}x" for r in others)]
          for name, get, fmt in METRICS]
  return markdown_table(header, rows)


def comparison_lines(results: list[BackendResult]) -> list[str]:
  first = results[0]
  return [f"Gen throughput: {first.backend} is **{first.gen_throughput / r.gen_throughput:.2f}x** {r.backend} "
          f"({r.backend} reaches {r.gen_throughput / first.gen_throughput:.1%} of {first.backend})" for r in results[1:]]


def throughput_report(model: BenchModel, device: str, workload: Workload, params: dict, results: list[BackendResult],
                      skipped: dict[str, str], command: str, notes: list[str], machine: dict) -> Report:
  data = {"preset": "throughput", "command": command, "timestamp": timestamp(), "model": model.describe(), "device": device,
          "parameters": params, "workload": workload.describe(), "machine": machine,
          "results": {r.backend: r.summary() for r in results}, "skipped": skipped,
          "ratios_to_first": {r.backend: {"duration": r.duration / results[0].duration, "gen_throughput": r.gen_throughput / results[0].gen_throughput,
                                          "total_throughput": r.total_throughput / results[0].total_throughput} for r in results[1:]},
          "notes": notes}
  weights = "random weights from its config" if model.random_weights else "real weights"
  lines = [f"# tinyvllm bench throughput: {model.name} on {device}", "", f"`{command}`", "",
           f"Workload: nano-vllm's bench generator (seed {params['seed']}): {len(workload.prompts)} sequences, prompt lengths "
           f"randint{tuple(params['input_len'])} of random token ids, output lengths randint{tuple(params['output_len'])}, "
           f"temperature {workload.temperature}, ignore_eos. Model: {model.name} ({weights}). {_warmup_text(params['warmup'])} "
           "Only the generate call is timed.", "", f"Machine: {machine_line(machine)}", "", throughput_table(results), ""]
  lines += comparison_lines(results)
  lines += [f"\nSkipped {name}: {why}" for name, why in skipped.items()]
  lines += [f"\nNote ({r.backend}): {n}" for r in results for n in r.info.get("notes", [])]
  lines += [f"\nNote: {n}" for n in notes]
  return Report("throughput", model.slug, device, data, "\n".join(lines))


def _warmup_text(warmup: str) -> str:
  if warmup == "one": return "Warm-up: one request per backend (tinyvllm's JIT captures of new batch shapes are timed)."
  return ("Warm-up: tinyvllm runs the workload once untimed with other token ids (same batch shapes, no prefix-cache hits), "
          "so no JIT capture is timed; the peers warm up with one request.")
