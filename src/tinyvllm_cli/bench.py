"""`tinyvllm bench latency | throughput | memory | profile`: the seed tables and the decode-step profile, written
to bench_results/ as JSON + markdown.

The presets live in bench_latency.py, bench_throughput.py (+ bench_backends.py for the peers), bench_memory.py
and bench_profile.py; what they share (models, machine, reports) in bench_common.py. This module only parses
options, checks them and turns every expected failure into one line."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tinyvllm_cli import ui
from tinyvllm_cli.bench_common import TOY, BenchError, emit, invocation, machine_info, resolve_bench_model, resolve_device, with_end_load
from tinyvllm_cli.engine_options import DTYPE_HELP, DTYPE_METAVAR, check_dtype, check_dtype_compiles

app = typer.Typer(help="Benchmark tinyvllm: latency (single / sequential / concurrent), throughput (vs peers), KV memory, decode-step profile.\n\n"
                       "Example: tinyvllm bench latency, then tinyvllm bench latency --model smollm2",
                  no_args_is_help=True)

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model: path, pulled repo id, `smollm2` or `toy`.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", "-d", help="tinygrad backend: CPU, METAL, CUDA, AMD, ... (default: DEV or tinygrad's pick).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result JSON to stdout.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder for the .json and .md results.")]
NoteOpt = Annotated[Optional[list[str]], typer.Option("--note", help="A note for the markdown (repeatable), e.g. other load on the machine.")]
KvOpt = Annotated[float, typer.Option("--kv-cache-gb", min=0.001, help="KV cache budget in GiB.")]
BeamOpt = Annotated[int, typer.Option("--beam", min=0, help="tinyvllm: tinygrad BEAM search width when a batch shape is captured (searched once, cached on disk; 0 = off).")]


def _json_params(params: dict) -> dict:
  return {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v for k, v in params.items()}


def _check_range(name: str, value: tuple[int, int]) -> None:
  lo, hi = value
  if not 1 <= lo <= hi: raise BenchError(f"{name} {lo} {hi}: need 1 <= MIN <= MAX")


@app.command("latency")
def latency(ctx: typer.Context, model: ModelOpt = None, device: DeviceOpt = None,
            num_requests: Annotated[int, typer.Option("--num-requests", min=1, help="Requests in the sequential and concurrent rows.")] = 5,
            prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt length in tokens (random ids).")] = 16,
            max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Tokens generated per request.")] = 20,
            kv_cache_gb: KvOpt = 1.0, beam: BeamOpt = 0, as_json: JsonOpt = False, output: OutputOpt = Path("bench_results"), note: NoteOpt = None) -> None:
  """The seed's latency table: single_request, sequential_N, concurrent_N (continuous batching) and the speedup.

  Without --model it runs the seed's toy model (random weights, dim=64, 4 layers, 4 heads), in seconds.

  Example: tinyvllm bench latency --model smollm2 --device CPU"""
  from tinyvllm_cli.bench_latency import LatencyParams, latency_report, run_latency
  try:
    dev = resolve_device(device)
    bench_model = resolve_bench_model(model or TOY, random_weights=False)
    params = LatencyParams(num_requests, prompt_len, max_tokens, kv_cache_gb, beam=beam)
    if prompt_len + max_tokens > bench_model.model_config().max_position_embeddings:
      raise BenchError(f"--prompt-len + --max-tokens exceed the model's context ({bench_model.model_config().max_position_embeddings})")
    machine = machine_info(dev)
    rows = run_latency(bench_model, dev, params)
    emit(latency_report(bench_model, dev, params, rows, invocation(ctx), note or [], with_end_load(machine)), output, as_json)
  except (BenchError, ValueError) as e: ui.fail(e)


@app.command("throughput")
def throughput(ctx: typer.Context, model: ModelOpt = None, device: DeviceOpt = None,
               backend: Annotated[str, typer.Option("--backend", "-b", help="First backend: tinyvllm, vllm, nanovllm, transformers or llamacpp.")] = "tinyvllm",
               compare: Annotated[Optional[list[str]], typer.Option("--compare", "-c", help="Another backend on the same workload (repeatable): vllm, nanovllm, transformers, llamacpp (GGUF models), tinyvllm.")] = None,
               random_weights: Annotated[bool, typer.Option("--random-weights", help="The model's real shapes (shipped config, config.json path, folder or GGUF) with random weights.")] = False,
               num_seqs: Annotated[int, typer.Option("--num-seqs", min=1, help="Number of sequences.")] = 256,
               input_len: Annotated[tuple[int, int], typer.Option("--input-len", help="Prompt length range MIN MAX (tokens).")] = (100, 1024),
               output_len: Annotated[tuple[int, int], typer.Option("--output-len", help="Output length range MIN MAX (tokens).")] = (100, 1024),
               temperature: Annotated[float, typer.Option("--temperature", min=0.01, help="Sampling temperature.")] = 0.6,
               seed: Annotated[int, typer.Option("--seed", help="Seed of the workload generator.")] = 0,
               kv_cache_gb: KvOpt = 1.0,
               max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1, help="tinyvllm: sequences running at once.")] = 32,
               max_num_batched_tokens: Annotated[int, typer.Option("--max-num-batched-tokens", min=1, help="tinyvllm: token budget per step.")] = 512,
               transformers_batch_size: Annotated[int, typer.Option("--transformers-batch-size", min=1, help="transformers: requests per generate call.")] = 8,
               torch_threads: Annotated[Optional[int], typer.Option("--torch-threads", min=1, help="transformers: torch CPU threads (default: torch's, one per core).")] = None,
               warmup: Annotated[str, typer.Option("--warmup", help="tinyvllm warm-up: `full` (the workload once, untimed, so no JIT capture is timed) or `one` (nano-vllm's one request).")] = "full",
               beam: BeamOpt = 0,
               quantize: Annotated[Optional[list[str]], typer.Option("--quantize", "-q", help="tinyvllm weights: none, int8, or gguf (a GGUF's Q8_0/Q4_0/Q4_1 blocks as stored); repeat to compare, e.g. -q none -q gguf.")] = None,
               dtype: Annotated[str, typer.Option("--dtype", metavar=DTYPE_METAVAR, help="tinyvllm (every variant): " + DTYPE_HELP[0].lower() + DTYPE_HELP[1:])] = "auto",
               as_json: JsonOpt = False, output: OutputOpt = Path("bench_results"), note: NoteOpt = None) -> None:
  """The seed's throughput table on nano-vllm's workload (256 sequences, prompts and outputs of 100-1024 tokens).

  Example: tinyvllm bench throughput --model Qwen/Qwen3-0.6B --random-weights --device METAL --compare transformers"""
  from tinyvllm_cli.bench_backends import BACKENDS, BackendOptions, BackendUnavailable, run_backend
  from tinyvllm_cli.bench_throughput import EngineOptions, Workload, throughput_report
  try:
    names = list(dict.fromkeys([backend, *(compare or [])]))
    if (bad := [n for n in names if n not in BACKENDS]): raise BenchError(f"unknown backend {bad[0]!r} (choose from {', '.join(BACKENDS)})")
    if warmup not in ("full", "one"): raise BenchError(f"--warmup {warmup!r}: choose full or one")
    if (bad_q := [q for q in quantize or [] if q not in ("none", "int8", "gguf")]): raise BenchError(f"--quantize {bad_q[0]!r}: choose none, int8 or gguf")
    check_dtype(dtype)
    _check_range("--input-len", input_len)
    _check_range("--output-len", output_len)
    dev = resolve_device(device)
    if "tinyvllm" in names: check_dtype_compiles(dtype, dev)
    bench_model = resolve_bench_model(model, random_weights)
    mc = bench_model.model_config()
    if input_len[1] + output_len[1] > mc.max_position_embeddings:
      raise BenchError(f"--input-len MAX + --output-len MAX = {input_len[1] + output_len[1]} exceeds the model's context ({mc.max_position_embeddings})")
    workload = Workload.nano_vllm(num_seqs, input_len, output_len, mc.vocab_size, seed)
    workload.temperature = temperature
    variants = [None if q == "none" else q for q in dict.fromkeys(quantize or ["none"])]
    runs = [(name, BackendOptions(EngineOptions(kv_cache_gb, max_num_seqs, max_num_batched_tokens, q, beam, dtype), transformers_batch_size, seed, warmup, torch_threads))
            for name in names for q in (variants if name == "tinyvllm" else [None])]
    results, skipped, machine = [], {}, machine_info(dev)
    for name, opts in runs:
      label = opts.engine.label if name == "tinyvllm" else name
      try: results.append(run_backend(name, bench_model, dev, workload, opts))
      except BackendUnavailable as e: skipped[label] = str(e)
      except Exception as e:  # a peer's own failure: one line, never a traceback
        if name == "tinyvllm": raise
        skipped[label] = f"failed ({type(e).__name__}: {ui.one_line(e)[:300]})"
      if label in skipped: ui.err.print(f"{label}: {skipped[label]}; skipped", soft_wrap=True, highlight=False, markup=False)
    if not results: raise BenchError("no backend ran: " + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    report = throughput_report(bench_model, dev, workload, _json_params(ctx.params), results, skipped, invocation(ctx), note or [],
                                with_end_load(machine))
    emit(report, output, as_json)
  except (BenchError, ValueError) as e: ui.fail(e)


@app.command("memory")
def memory(ctx: typer.Context, model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model whose KV shapes are used: a shipped config (repo id), `smollm2`, a config.json, folder or .gguf.")] = "smollm2",
           device: DeviceOpt = None, kv_cache_gb: KvOpt = 1.0,
           block_size: Annotated[int, typer.Option("--block-size", min=1, help="Tokens per KV block.")] = 16,
           max_model_len: Annotated[int, typer.Option("--max-model-len", min=2, help="What the naive scheme preallocates per sequence.")] = 2048,
           seed: Annotated[int, typer.Option("--seed", help="Seed of the length generator.")] = 0,
           as_json: JsonOpt = False, output: OutputOpt = Path("bench_results"), note: NoteOpt = None) -> None:
  """KV memory: sequences that fit in one budget, paged blocks vs preallocating max_model_len, and the waste.

  Pure arithmetic over the block manager's rules (checked against the engine's BlockManager); no model runs.

  Example: tinyvllm bench memory --model Qwen/Qwen3-0.6B --kv-cache-gb 4 --max-model-len 4096"""
  from tinyvllm_cli.bench_memory import MemoryParams, memory_report, run_memory
  try:
    dev = resolve_device(device)
    bench_model = resolve_bench_model(model, random_weights=True)
    dtype_bytes = 4 if dev == "CPU" else 2  # the engine keeps the KV in float32 on CPU, float16 elsewhere
    params = MemoryParams(kv_cache_gb, block_size, max_model_len, seed)
    result = run_memory(bench_model.model_config(), params, dtype_bytes)
    emit(memory_report(bench_model, dev, dtype_bytes, params, result, invocation(ctx), note or [], machine_info(dev)), output, as_json)
  except (BenchError, ValueError) as e: ui.fail(e)


@app.command("profile")
def profile(ctx: typer.Context, model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model: path, pulled repo id or `smollm2`; with --random-weights a shipped config (repo id), config.json, folder or .gguf.")] = "smollm2",
            device: DeviceOpt = None,
            random_weights: Annotated[bool, typer.Option("--random-weights", help="The model's real shapes (shipped config, config.json path, folder or GGUF) with random weights.")] = False,
            batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-b", help="Comma-separated batch sizes (sequences decoding at once).")] = "1,8,32",
            steps: Annotated[int, typer.Option("--steps", min=1, help="Decode steps timed per batch size.")] = 10,
            prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt length in tokens (random ids).")] = 32,
            warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0, help="Untimed decode steps once all sequences decode.")] = 3,
            seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompts.")] = 0,
            quantize: Annotated[Optional[str], typer.Option("--quantize", "-q", help="tinyvllm weights: int8, or gguf (a GGUF's Q8_0/Q4_0/Q4_1 blocks as stored).")] = None,
            kv_cache_gb: KvOpt = 1.0, as_json: JsonOpt = False, output: OutputOpt = Path("bench_results"), note: NoteOpt = None) -> None:
  """Profile the decode step per batch size: step time, tokens/s, the engine's phases, the kernel time per part of
  the model (tinygrad DEBUG=2) and the Python/host share of the step.

  Example: tinyvllm bench profile --model Qwen/Qwen3-0.6B --random-weights --batch-sizes 1,8"""
  from tinyvllm_cli.bench_profile import ProfileParams, parse_batch_sizes, profile_report, run_profile
  try:
    params = ProfileParams(parse_batch_sizes(batch_sizes), steps, prompt_len, warmup_steps, kv_cache_gb, seed, None if quantize == "none" else quantize)
    dev = resolve_device(device)
    bench_model = resolve_bench_model(model, random_weights)
    if prompt_len >= bench_model.model_config().max_position_embeddings:
      raise BenchError(f"--prompt-len {prompt_len} is not shorter than the model's context ({bench_model.model_config().max_position_embeddings})")
    dtype = "float32" if dev == "CPU" else "float16"  # the engine's default (auto) dtype
    machine = machine_info(dev)
    results = run_profile(bench_model, dev, params)
    emit(profile_report(bench_model, dev, dtype, params, results, invocation(ctx), note or [], with_end_load(machine)), output, as_json)
  except (BenchError, ValueError) as e: ui.fail(e)


from tinyvllm_cli.bench_serve import bench_serve  # noqa: E402  (the serve preset lives in its own module)
app.command("serve")(bench_serve)
