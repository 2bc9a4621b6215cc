"""`tinyvllm bench --device X` (the seed tables in one go) and `tinyvllm bench latency | throughput | memory | profile |
serve`: options and checks; the presets live in this package's modules and write bench_results/ as JSON +
markdown."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from tinyvllm_cli import ui
from tinyvllm_cli.bench.common import TOY, BenchError, Run, emit, one_line_errors, parse_ints
from tinyvllm_cli.bench.seed_tables import CPU_SCALE, OTHER_SCALE
from tinyvllm_cli.engine_options import MODEL_HELP, BeamOption, DeviceOption, DtypeOption, KvCacheGbOption
from tinyvllm_cli.engine_options import QuantizeListOption
from tinyvllm_cli.engine_options import QuantizeOption, check_dtype, check_dtype_compiles, quantize_setting

BENCH_HELP = (
  "Benchmark tinyvllm. `tinyvllm bench --device X` runs the seed tables in one go on that device: the latency table "
  "(single / sequential / concurrent) and the throughput table (seed 001's workload, scaled to a few minutes; "
  "--full for its 256 sequences), written to bench_results/. Or one preset: latency, throughput (vs peers), "
  "memory (KV), profile (the decode step), serve (a running server), vs-llamacpp (llama.cpp side by side)."
)
SCALE_HELP = (
  f"Divide the throughput workload's sequence count and lengths by this (default: {CPU_SCALE} on CPU, "
  f"{OTHER_SCALE} elsewhere)."
)
app = typer.Typer(help=BENCH_HELP, no_args_is_help=True)

Opt = typer.Option
ModelOpt = Annotated[Optional[str], Opt("--model", "-m", help="Model: path, pulled repo id, `smollm2` or `toy`.")]
MODELS_HELP = "Model: path, pulled repo id, `smollm2` or `toy` (repeatable: every model in one table)."
RANDOM_HELP = "The model's real shapes (shipped repo id, config.json, folder or GGUF) with random weights."
RandomWeightsOpt = Annotated[bool, Opt("--random-weights", help=RANDOM_HELP)]
PromptLenOpt = Annotated[int, Opt("--prompt-len", min=1, help="Prompt length in tokens (random ids).")]
SeedOpt = Annotated[int, Opt("--seed", help="Seed of the random prompts and lengths.")]
JsonOpt = Annotated[bool, Opt("--json", help="Print the result JSON to stdout.")]
OutputOpt = Annotated[Path, Opt("--output", "-o", help="Folder for the .json and .md results.")]
NoteOpt = Annotated[Optional[list[str]], Opt("--note", help="A note for the markdown (repeatable).")]
NUM_SEQS_HELP = "Number of sequences (repeatable: one workload per count)."
SCHEMA_HELP = "A JSON schema file: every request's output is constrained to it (response_format json_schema)."
LLAMACPP_BIN_HELP = "Folder of llama-bench, llama-batched-bench and llama-server (default: PATH)."
RESULTS = Path("bench_results")
BACKENDS = ("tinyvllm", "vllm", "nanovllm", "transformers", "llamacpp")


def check_range(name: str, value: tuple[int, int]) -> None:
  if not 1 <= value[0] <= value[1]:
    raise BenchError(f"{name} {value[0]} {value[1]}: need 1 <= MIN <= MAX")


@app.callback(invoke_without_command=True)
def seed_tables(
  ctx: typer.Context,
  model: Annotated[Optional[str], Opt("--model", "-m", help=f"{MODEL_HELP} Or `toy`.")] = None,
  device: DeviceOption = None,
  full: Annotated[bool, Opt("--full", help="Seed 001's whole workload: 256 sequences, 100-1024 tokens.")] = False,
  scale: Annotated[Optional[int], Opt("--scale", min=1, show_default=False, help=SCALE_HELP)] = None,
  kv_cache_gb: KvCacheGbOption = 1.0,
  output: OutputOpt = RESULTS,
  note: NoteOpt = None,
) -> None:
  """The seed tables in one go: `bench latency` then `bench throughput` on a scaled workload (a preset named after
  `bench` runs alone)."""
  from tinyvllm_cli.bench.seed_tables import run_seed_tables

  sources = {p.opts[0]: ctx.get_parameter_source(p.name) for p in ctx.command.params}
  given = [flag for flag, source in sources.items() if source is not None and source.name == "COMMANDLINE"]
  if ctx.invoked_subcommand is not None:
    if given:
      ui.fail(f"{given[0]} goes after the preset's name (`tinyvllm bench {ctx.invoked_subcommand} {given[0]} ...`)")
    return
  with one_line_errors():
    if full and scale is not None:
      raise BenchError("--full and --scale: give one (--full is --scale 1)")
    run_seed_tables(ctx, model, device, 1 if full else scale, kv_cache_gb, output, note or [])


@app.command("latency")
def latency(
  ctx: typer.Context,
  model: ModelOpt = None,
  device: DeviceOption = None,
  num_requests: Annotated[int, Opt("--num-requests", min=1, help="Requests per sequential/concurrent row.")] = 5,
  prompt_len: PromptLenOpt = 16,
  max_tokens: Annotated[int, Opt("--max-tokens", min=2, help="Tokens generated per request.")] = 20,
  kv_cache_gb: KvCacheGbOption = 1.0,
  beam: BeamOption = 0,
  as_json: JsonOpt = False,
  output: OutputOpt = RESULTS,
  note: NoteOpt = None,
) -> None:
  """The seed's latency table: single_request, sequential_N, concurrent_N and the speedup (default: the toy model)."""
  from tinyvllm_cli.bench.latency import LatencyParams, latency_report, run_latency

  with one_line_errors():
    run = Run.start(ctx, device, model or TOY, False, note)
    context = run.model.model_config().max_position_embeddings
    if prompt_len + max_tokens > context:
      raise BenchError(f"--prompt-len + --max-tokens exceed the model's context ({context})")
    params = LatencyParams(num_requests, prompt_len, max_tokens, kv_cache_gb, beam=beam)
    run.emit("latency", *latency_report(run, params, run_latency(run, params)), output, as_json)


@app.command("throughput")
def throughput(
  ctx: typer.Context,
  model: Annotated[Optional[list[str]], Opt("--model", "-m", help=MODELS_HELP)] = None,
  device: DeviceOption = None,
  backend: Annotated[str, Opt("--backend", "-b", help=f"First backend: {', '.join(BACKENDS)}.")] = "tinyvllm",
  compare: Annotated[Optional[list[str]], Opt("--compare", "-c", help="Another backend (repeatable).")] = None,
  random_weights: RandomWeightsOpt = False,
  num_seqs: Annotated[Optional[list[int]], Opt("--num-seqs", min=1, help=NUM_SEQS_HELP, show_default="256")] = None,
  input_len: Annotated[tuple[int, int], Opt("--input-len", help="Prompt lengths: MIN MAX.")] = (100, 1024),
  output_len: Annotated[tuple[int, int], Opt("--output-len", help="Output lengths: MIN MAX.")] = (100, 1024),
  temperature: Annotated[float, Opt("--temperature", min=0.01, help="Sampling temperature.")] = 0.6,
  seed: SeedOpt = 0,
  kv_cache_gb: KvCacheGbOption = 1.0,
  max_num_seqs: Annotated[int, Opt("--max-num-seqs", min=1, help="tinyvllm: sequences at once.")] = 32,
  max_num_batched_tokens: Annotated[int, Opt(min=1, help="tinyvllm: tokens per step.")] = 512,
  transformers_batch_size: Annotated[int, Opt(min=1, help="transformers: requests per generate call.")] = 8,
  torch_threads: Annotated[Optional[int], Opt(min=1, help="transformers: torch CPU threads.")] = None,
  warmup: Annotated[str, Opt("--warmup", help="tinyvllm warm-up: `full` workload or `one` request.")] = "full",
  beam: BeamOption = 0,
  quantize: QuantizeListOption = None,
  dtype: DtypeOption = "auto",
  as_json: JsonOpt = False,
  output: OutputOpt = RESULTS,
  note: NoteOpt = None,
) -> None:
  """The seed's throughput table on nano-vllm's workload (256 sequences, 100-1024 token prompts and outputs).
  Several --model or --num-seqs values: one table of weight memory and gen throughput per model and backend."""
  from tinyvllm_cli.bench.peers import BackendOptions, BackendUnavailable, run_backend
  from tinyvllm_cli.bench.throughput import Workload, grid_report, throughput_report

  with one_line_errors():
    names = list(dict.fromkeys([backend, *(compare or [])]))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
      raise BenchError(f"unknown backend {unknown[0]!r} (choose from {', '.join(BACKENDS)})")
    if warmup not in ("full", "one"):
      raise BenchError(f"--warmup {warmup!r}: choose full or one")
    variants = list(dict.fromkeys(quantize or ["none"]))
    bad_quantize = [q for q in variants if q not in ("none", "int8", "gguf")]
    if bad_quantize:
      raise BenchError(f"--quantize {bad_quantize[0]!r}: choose none, int8 or gguf")
    check_dtype(dtype)
    check_range("--input-len", input_len)
    check_range("--output-len", output_len)
    counts = list(dict.fromkeys(num_seqs or [256]))
    run = Run.start(ctx, device, model, random_weights, note)
    if "tinyvllm" in names:
      check_dtype_compiles(dtype, run.device)
    longest = input_len[1] + output_len[1]
    for bench_model in run.models:
      context = bench_model.model_config().max_position_embeddings
      if longest > context:
        raise BenchError(
          f"--input-len MAX + --output-len MAX = {longest} exceeds the model's context ({bench_model.name}: {context})"
        )
    results = []  # (model name, result)
    skipped = {}
    engine = (kv_cache_gb, max_num_seqs, max_num_batched_tokens, None, beam, dtype)
    base = BackendOptions(*engine, transformers_batch_size, seed, warmup, torch_threads)
    several = len(run.models) > 1 or len(counts) > 1
    for bench_model in run.models:
      vocab_size = bench_model.model_config().vocab_size
      workloads = [Workload.nano_vllm(n, input_len, output_len, vocab_size, seed, temperature) for n in counts]
      for name in names:
        for q in variants if name == "tinyvllm" else ["none"]:
          opts = replace(base, quantize=quantize_setting(q))
          label = (opts.label if name == "tinyvllm" else name) + (f" ({bench_model.name})" if several else "")
          for workload in workloads:
            try:
              results.append((bench_model.name, run_backend(name, bench_model, run.device, workload, opts)))
            except BackendUnavailable as e:
              skipped[label] = str(e)
            except Exception as e:  # a peer's own failure: one line, never a traceback
              if name == "tinyvllm":
                raise
              skipped[label] = f"failed ({type(e).__name__}: {ui.one_line(e)[:300]})"
            if label in skipped:
              ui.err.print(f"{label}: {skipped[label]}; skipped", soft_wrap=True, highlight=False, markup=False)
              break
    run.finished()
    if not results:
      raise BenchError("no backend ran: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    params = {
      k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v for k, v in ctx.params.items()
    }
    given = list(dict.fromkeys(model or [None]))
    params |= {"model": given, "num_seqs": counts} if several else {"model": given[0], "num_seqs": counts[0]}
    if several:
      run.emit("throughput", *grid_report(run, workloads, params, results, skipped), output, as_json)
    else:
      report = throughput_report(run, workloads[0], params, [r for _, r in results], skipped)
      run.emit("throughput", *report, output, as_json)


@app.command("memory")
def memory(
  ctx: typer.Context,
  model: Annotated[Optional[str], Opt("--model", "-m", help="Model whose KV shapes are used.")] = "smollm2",
  device: DeviceOption = None,
  kv_cache_gb: KvCacheGbOption = 1.0,
  block_size: Annotated[int, Opt("--block-size", min=1, help="Tokens per KV block.")] = 16,
  max_model_len: Annotated[int, Opt("--max-model-len", min=2, help="What naive preallocates per sequence.")] = 2048,
  seed: SeedOpt = 0,
  as_json: JsonOpt = False,
  output: OutputOpt = RESULTS,
  note: NoteOpt = None,
) -> None:
  """KV memory: sequences that fit in one budget, paged blocks vs preallocating max_model_len; no model runs."""
  from tinyvllm_core import resolve_dtype

  from tinyvllm_cli.bench.memory import MemoryParams, memory_report

  with one_line_errors():
    run = Run.start(ctx, device, model, True, note)
    params = MemoryParams(kv_cache_gb, block_size, max_model_len, seed)
    data, markdown = memory_report(run, resolve_dtype("auto", run.device), params)
    emit(f"memory-{run.model.name_slug}-{run.device.lower()}", data, markdown, output, as_json)


@app.command("profile")
def profile(
  ctx: typer.Context,
  model: ModelOpt = "smollm2",
  device: DeviceOption = None,
  random_weights: RandomWeightsOpt = False,
  batch_sizes: Annotated[str, Opt("--batch-sizes", "-b", help="Comma-separated batch sizes.")] = "1,8,32",
  steps: Annotated[int, Opt("--steps", min=1, help="Decode steps timed per batch size.")] = 10,
  prompt_len: PromptLenOpt = 32,
  warmup_steps: Annotated[int, Opt("--warmup-steps", min=0, help="Untimed steps once all sequences decode.")] = 3,
  seed: SeedOpt = 0,
  quantize: QuantizeOption = None,
  kv_cache_gb: KvCacheGbOption = 1.0,
  repetition_penalty: Annotated[float, Opt(help="Repetition penalty of every sequence (1 = off).")] = 1.0,
  presence_penalty: Annotated[float, Opt(help="Presence penalty of every sequence (0 = off).")] = 0.0,
  frequency_penalty: Annotated[float, Opt(help="Frequency penalty of every sequence (0 = off).")] = 0.0,
  as_json: JsonOpt = False,
  output: OutputOpt = RESULTS,
  note: NoteOpt = None,
) -> None:
  """The decode step per batch size: step time, phases, kernel time per part of the model and the host share
  (greedy; the penalty options measure what penalties cost)."""
  from tinyvllm_core import resolve_dtype

  from tinyvllm_cli.bench.profile import ProfileParams, parse_batch_sizes, profile_report, run_profile

  with one_line_errors():
    sizes = parse_batch_sizes(batch_sizes)
    penalties = (repetition_penalty, presence_penalty, frequency_penalty)
    params = ProfileParams(
      sizes, steps, prompt_len, warmup_steps, kv_cache_gb, seed, quantize_setting(quantize), *penalties
    )
    params.sampling(1)  # a bad penalty is one line before the model loads
    run = Run.start(ctx, device, model, random_weights, note)
    context = run.model.model_config().max_position_embeddings
    if prompt_len >= context:
      raise BenchError(f"--prompt-len {prompt_len} is not shorter than the model's context ({context})")
    results = run_profile(run, params)
    run.emit("profile", *profile_report(run, resolve_dtype("auto", run.device), params, results), output, as_json)


@app.command("speculative")
def speculative(
  ctx: typer.Context,
  model: ModelOpt = "smollm2",
  device: DeviceOption = None,
  quantize: QuantizeOption = None,
  draft_counts: Annotated[str, Opt("--num-speculative-tokens", "-k", help="Comma-separated draft counts.")] = "2,4",
  max_tokens: Annotated[int, Opt(min=1, help="Tokens generated per prompt at most.")] = 128,
  as_json: JsonOpt = False,
  output: OutputOpt = RESULTS,
  note: NoteOpt = None,
) -> None:
  """Speculative decoding with prompt lookup: one-sequence greedy tok/s and draft acceptance, with and without
  drafts, on a chat and an edit workload."""
  from tinyvllm_cli.bench.speculative import run_speculative, speculative_report

  with one_line_errors():
    counts = parse_ints(draft_counts, "--num-speculative-tokens", "2,4")
    run = Run.start(ctx, device, model, False, note)
    results = run_speculative(run, quantize_setting(quantize), counts, max_tokens)
    run.emit("speculative", *speculative_report(run, results), output, as_json)


@app.command("vs-llamacpp")
def vs_llamacpp(
  ctx: typer.Context,
  model: ModelOpt = "smollm2",
  device: DeviceOption = None,
  quantize: QuantizeOption = None,
  llamacpp_bin: Annotated[Optional[Path], Opt("--llamacpp-bin", show_default=False, help=LLAMACPP_BIN_HELP)] = None,
  batch_sizes: Annotated[str, Opt("--batch-sizes", "-b", help="Comma-separated decode batch sizes.")] = "1,8,32",
  concurrency: Annotated[
    str, Opt("--concurrency", "-c", help="Comma-separated serving concurrency levels.")
  ] = "1,4,16",
  num_prompts: Annotated[int, Opt("--num-prompts", "-n", min=1, help="Serving requests per level.")] = 32,
  max_tokens: Annotated[int, Opt(min=1, help="Serving: tokens generated per request.")] = 64,
  prefill_len: Annotated[int, Opt(min=1, help="Prefill: prompt length (llama-bench -p).")] = 512,
  timeout: Annotated[float, Opt(min=1, help="Seconds a tool, a server's start or a request may take.")] = 600.0,
  as_json: JsonOpt = False,
  output: OutputOpt = RESULTS,
  note: NoteOpt = None,
) -> None:
  """tinyvllm against llama.cpp built from source (llama-bench, llama-batched-bench, llama-server on PATH) on the
  same GGUF file and thread count: decode at each batch size, prefill, serving at each concurrency and start-up time,
  with the ratio and the weight-read bound; without the binaries, tinyvllm's column alone."""
  from tinygrad.helpers import NUM_CPU_THREADS

  from tinyvllm_cli.bench.peers import BackendUnavailable, check_gguf
  from tinyvllm_cli.bench.vs_llamacpp import VsParams, run_vs_llamacpp

  with one_line_errors():
    sizes = parse_ints(batch_sizes, "--batch-sizes", "1,8,32")
    levels = parse_ints(concurrency, "--concurrency", "1,4,16")
    run = Run.start(ctx, device, model, False, note)
    try:
      check_gguf(run.model)
    except BackendUnavailable as e:
      raise BenchError(f"vs-llamacpp compares on one GGUF file: {str(e).removeprefix('llama.cpp runs GGUF files; ')}")
    if quantize not in (None, "none", "int8", "gguf"):
      raise BenchError(f"--quantize {quantize!r}: choose none, int8 or gguf")
    shape = (tuple(sizes), tuple(levels), num_prompts, max_tokens, prefill_len, timeout)
    params = VsParams(run.model.path, NUM_CPU_THREADS.value, quantize, *shape)
    run.emit("vs-llamacpp", *run_vs_llamacpp(run, params, llamacpp_bin), output, as_json)


@app.command("serve")
def bench_serve(
  url: Annotated[str, Opt("--url", help="Server base URL.")] = "http://127.0.0.1:8000",
  concurrency: Annotated[str, Opt("--concurrency", "-c", help="Comma-separated concurrency levels.")] = "1,4,16",
  num_prompts: Annotated[int, Opt("--num-prompts", "-n", min=0, help="Requests per level (0: max(8, 4 x C)).")] = 0,
  max_tokens: Annotated[int, Opt(min=1, help="Tokens generated per request.")] = 32,
  endpoint: Annotated[str, Opt(help="completions or chat.")] = "completions",
  dataset: Annotated[Optional[Path], Opt(show_default=False, help="Text file of prompts, one per line.")] = None,
  ignore_eos: Annotated[bool, Opt(help="Generate exactly max_tokens tokens per request.")] = True,
  warmup: Annotated[bool, Opt(help="Run each level once untimed first (JIT capture).")] = True,
  api_key: Annotated[Optional[str], Opt(envvar="TINYVLLM_API_KEY", show_default=False, help="Bearer key.")] = None,
  output_dir: OutputOpt = RESULTS,
  json_output: JsonOpt = False,
  timeout: Annotated[float, Opt(min=1, help="Seconds to wait for the server and for each request.")] = 600.0,
  json_schema: Annotated[Optional[Path], Opt("--json-schema", show_default=False, help=SCHEMA_HELP)] = None,
) -> dict:
  """Benchmark a running OpenAI-compatible server (e.g. tinyvllm serve-lite) at several concurrency levels."""
  from datetime import datetime

  from tinyvllm_cli.bench.serve import Target, markdown, read_dataset, read_schema, run_levels

  with one_line_errors():
    if endpoint not in ("completions", "chat"):
      raise BenchError(f"--endpoint {endpoint!r}: expected completions or chat")
    levels = parse_ints(concurrency, "--concurrency", "1,4,16")
    schema = read_schema(json_schema)
    target = Target(url, endpoint, api_key, timeout)
    model = target.wait_ready()
    config = {
      "url": url,
      "endpoint": endpoint,
      "dataset": str(dataset) if dataset else None,
      "concurrency": levels,
      "num_prompts": num_prompts,
      "max_tokens": max_tokens,
      "ignore_eos": ignore_eos,
      "warmup": warmup,
      "json_schema_file": str(json_schema) if json_schema else None,
      "json_schema": schema,
    }
    report = {"timestamp": datetime.now().strftime("%Y%m%d-%H%M%S"), "model": model, "config": config}
    report["levels"] = run_levels(target, model, config, read_dataset(dataset))
    emit("serve", report, markdown(report), output_dir, json_output)
  return report
