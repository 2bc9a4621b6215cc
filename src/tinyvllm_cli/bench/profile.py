"""`tinyvllm bench profile`: where a decode step's time goes per batch size: wall time, the engine's phases, the
kernels by part of the model (tinygrad's DEBUG=2 lines) and the host's share."""

from __future__ import annotations

import contextlib
import io
import re
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tinyvllm_cli import ui
from tinyvllm_cli.bench.common import BenchError, PromptSource, Run, markdown_table, now, parse_ints

if TYPE_CHECKING:
  from tinyvllm_core import ModelConfig

DEBUG_STEPS = 2
LINEARS = ("qkv", "o", "gate_up", "down", "lm_head")
OTHER = "norms/rope/residual/activation"
CATEGORIES = ("embedding", *LINEARS, "attention", "sampling", OTHER)
EXTRA_CATEGORIES = ("other matmul", "transfers", "graph batches")  # shown only when a run has them
PHASES = ("schedule_s", "prepare_s", "forward_s", "postprocess_s")  # launch_s lies inside forward_s
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# *** CPU     5972 r_320_2_3_4_144_4   arg  3 mem   1.62 GB tm   1604.26us/     1.65ms ( ...
KERNEL_LINE = re.compile(
  r"^\*\*\*\s+\S+\s+\d+\s+(?P<name>.+?)\s+arg\s+\d+\s+mem\s+.*?\btm\s+(?P<t>[\d.]+)\s*(?P<unit>us|ms|s)\b"
)
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
LINEAR_NAME = re.compile(r"^linear_(\d+)_(\d+)_(\d+)$")
PENALTY_OFF = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
PENALTIES = tuple(PENALTY_OFF)
TIMING_ATTEMPTS = 3  # a timed window that captured a new batch shape (a new penalty width) is timed again
NEXT_LINEAR = {None: ("qkv",), "qkv": ("o",), "o": ("gate_up",), "gate_up": ("down",), "down": ("qkv", "lm_head")}


@dataclass
class ProfileParams:
  batch_sizes: list[int]
  steps: int = 10
  prompt_len: int = 32
  warmup_steps: int = 3
  kv_cache_gb: float = 1.0
  seed: int = 0
  quantize: str | None = None
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0

  def sampling(self, max_tokens: int):
    """Greedy with this profile's penalties (off by default)."""
    from tinyvllm_core import SamplingParams

    penalties = {k: getattr(self, k) for k in PENALTIES}
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **penalties)

  @property
  def penalized(self) -> bool:
    return self.sampling(1).penalized

  def penalties_text(self) -> str:
    on = [f"{k.replace('_', ' ')} {getattr(self, k)}" for k in PENALTIES if getattr(self, k) != PENALTY_OFF[k]]
    return "penalties: " + ", ".join(on) if on else "no penalties"


def parse_batch_sizes(text: str) -> list[int]:
  return parse_ints(text, "--batch-sizes", "1,8,32")


def parse_kernel_lines(text: str) -> list[tuple[str, float]]:
  """(kernel name, seconds) for each per-kernel line tinygrad printed at DEBUG>=2; other lines are skipped."""
  matches = [KERNEL_LINE.match(ANSI.sub("", line).strip()) for line in text.splitlines()]
  return [(" ".join(m["name"].split()), float(m["t"]) * UNITS[m["unit"]]) for m in matches if m]


def linear_shapes(mc: ModelConfig) -> dict[tuple[int, int], list[str]]:
  """(N, K) of each matmul's weight -> the matmuls with that shape (in layer order)."""
  hidden = mc.hidden_size
  weights = {
    "qkv": ((mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim, hidden),
    "o": (hidden, mc.num_heads * mc.head_dim),
    "gate_up": (2 * mc.intermediate_size, hidden),
    "down": (hidden, mc.intermediate_size),
    "lm_head": (mc.vocab_size, hidden),
  }
  shapes = defaultdict(list)
  for name, shape in weights.items():
    shapes[shape].append(name)
  return dict(shapes)


def categorize_step(kernels: list[tuple[str, float]], shapes: dict) -> list[tuple[str, str, float]]:
  """(category, name, seconds) per kernel of one decode step. `linear_{M}_{N}_{K}` kernels are matmuls told apart
  by (N, K) and their order in a layer; kv_write, paged_qk, paged_pv and what runs between are attention; what runs
  after lm_head is sampling; a first gather_rows is the embedding."""
  out = []
  prev = None
  in_attention = False
  after_head = False
  for i, (name, secs) in enumerate(kernels):
    linear = LINEAR_NAME.match(name)
    if name.startswith("copy"):
      cat = "transfers"
    elif name.startswith("batched"):
      cat = "graph batches"
    elif linear:
      candidates = shapes.get((int(linear[2]), int(linear[3])), ["other matmul"])
      cat = next((c for c in candidates if c in NEXT_LINEAR.get(prev, ())), candidates[0])
      prev = cat if cat in LINEARS else prev
      after_head = cat == "lm_head"
    elif after_head:
      cat = "sampling"
    elif name in ("kv_write", "paged_qk", "paged_pv") or in_attention:
      cat = "attention"
    elif i == 0 and name == "gather_rows":
      cat = "embedding"
    else:
      cat = OTHER
    in_attention = name == "paged_qk" or (in_attention and name != "paged_pv")
    out.append((cat, name, secs))
  return out


def step(engine, contexts: dict[str, int], tokens: dict[str, tuple] | None = None) -> float:
  """One engine step's wall time; keeps each request's context length (and with `tokens` its prompt and output)."""
  t0 = now()
  outputs = engine.step()
  wall = now() - t0
  for o in outputs:
    contexts[o.request_id] = len(o.prompt_token_ids) + len(o.token_ids)
    if tokens is not None:
      tokens[o.request_id] = (o.prompt_token_ids, o.token_ids)
  return wall


def one_penalty_width(params, tokens: dict[str, tuple], window: int) -> bool:
  """Whether the penalized tokens' padded width of the last step (a power of 2 over the row with the most; a new
  width is a new capture) stays for `window` more steps: each step adds at most one token per row."""
  from tinyvllm_core.kernels.penalties import penalty_entries

  if not params.penalized or not tokens:
    return True
  # the last step penalized the tokens before the one it sampled
  most = max(len(penalty_entries(params, prompt, output[:-1])[0]) for prompt, output in tokens.values())
  return next_power_of_2(most) == next_power_of_2(most + window)


def next_power_of_2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def all_decoding(engine, b: int) -> bool:
  t = engine.last_step_timings
  return t.get("num_tokens") == t.get("num_seqs") == b


def one_width_from(context_len: int, window: int, block_size: int) -> int:
  """The first context length >= context_len from which `window` steps keep one block-table width (a new width is a
  new TinyJit capture)."""
  from tinyvllm_core import block_table_width

  while block_table_width(context_len, block_size) != block_table_width(context_len + window - 1, block_size):
    context_len += 1
  return context_len


def time_window(engine, b: int, p: ProfileParams, contexts: dict[str, int]) -> tuple[list, dict, list]:
  """The timed steps (wall times, phases) and the DEBUG=2 steps (categorized kernels are parsed by the caller)."""
  from tinygrad.helpers import Context

  walls = []
  phases = defaultdict(list)
  for _ in range(p.steps):
    walls.append(step(engine, contexts))
    if not all_decoding(engine, b):
      raise BenchError(f"batch size {b}: a timed step did not decode all {b} sequences (raise --kv-cache-gb)")
    for k in (*PHASES, "launch_s"):
      phases[k].append(engine.last_step_timings[k])
  debug_outputs = []
  for _ in range(DEBUG_STEPS):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), Context(DEBUG=2):  # tinygrad's per-kernel timing
      step(engine, contexts)
    if not all_decoding(engine, b):
      raise BenchError(f"batch size {b}: a profiled step did not decode all {b} sequences")
    debug_outputs.append(buf.getvalue())
  return walls, phases, debug_outputs


def profile_batch(engine, b: int, p: ProfileParams, prompts: PromptSource, shapes: dict) -> dict:
  """B prompts stepped until all decode, warmed up until the timed + DEBUG steps share one block-table width (no JIT
  capture is timed), then the timed steps and the DEBUG=2 steps. With penalties the padded width of each row's
  penalized tokens grows with the output: a window in which it changed (a new capture) is timed again."""
  bs = engine.config.block_size
  window = p.steps + DEBUG_STEPS
  # chunked prefill lets early sequences decode while later ones prefill: at most this many steps before all decode
  prefill_bound = -(-b * p.prompt_len // engine.config.max_num_batched_tokens) + 1
  penalty_wait = window + 1 if p.penalized else 0  # at most this many steps waiting for one penalty width
  retries = (TIMING_ATTEMPTS - 1) * window
  start = one_width_from(p.prompt_len + prefill_bound + p.warmup_steps + penalty_wait, window + 1, bs)
  end_context = start + window + 1 + retries
  max_tokens = end_context - p.prompt_len + 1
  if end_context + 1 > engine.max_model_len:
    raise BenchError(
      f"--prompt-len {p.prompt_len} + {max_tokens} generated tokens exceed the engine's context "
      f"({engine.max_model_len} tokens); shorten --prompt-len or --steps, or raise --kv-cache-gb"
    )
  blocks = b * -(-(end_context + 1) // bs)
  total_blocks = engine.stats()["num_total_blocks"]
  if blocks > total_blocks:
    raise BenchError(f"batch size {b} needs {blocks} KV blocks but the cache has {total_blocks}; raise --kv-cache-gb")
  params = p.sampling(max_tokens)
  ids = [engine.add_request(prompt, params) for prompt in prompts.take(b)]
  contexts = {rid: p.prompt_len for rid in ids}  # request -> the context length of its next decode step
  tokens = {}  # request -> (prompt, output) token ids, for the penalties' width
  try:
    prefill_steps = 0
    while not all_decoding(engine, b):
      if prefill_steps > 2 * prefill_bound + 4:
        raise BenchError(f"batch size {b}: the sequences never all decoded at once")
      step(engine, contexts, tokens)
      prefill_steps += 1
    warmup = 0
    while True:
      last = max(contexts.values()) - 1
      block_width_ready = one_width_from(last, window + 1, bs) == last
      penalty_ready = warmup >= p.warmup_steps + penalty_wait or one_penalty_width(params, tokens, window + 1)
      if warmup >= p.warmup_steps and block_width_ready and penalty_ready:
        break
      step(engine, contexts, tokens)
      warmup += 1
    for attempt in range(1, TIMING_ATTEMPTS + 1):
      first_context = max(contexts.values())
      shapes_before = len(engine.captured_shapes())
      walls, phases, debug_outputs = time_window(engine, b, p, contexts)
      if len(engine.captured_shapes()) == shapes_before:
        break
      if attempt == TIMING_ATTEMPTS:
        raise BenchError(f"batch size {b}: every timed window captured a new batch shape; try another --steps")
  finally:
    for rid in ids:
      engine.abort(rid)
  debug_steps = [categorize_step(parse_kernel_lines(text), shapes) for text in debug_outputs]
  summary = batch_summary(b, walls, phases, debug_steps, prefill_steps, warmup, first_context)
  summary["timing_attempts"] = attempt
  return summary


def batch_summary(
  b: int, walls: list, phases: dict, debug_steps: list, prefill_steps: int, warmup: int, first_context: int
) -> dict:
  step_s = statistics.median(walls)
  med = {k: statistics.median(v) for k, v in phases.items()}
  n = len(debug_steps)
  per_cat = defaultdict(float)
  per_kernel = defaultdict(lambda: [0.0, 0.0])  # (category, name) -> [count, seconds] per step
  for kernels in debug_steps:
    for cat, name, secs in kernels:
      per_cat[cat] += secs / n
      per_kernel[cat, name][0] += 1 / n
      per_kernel[cat, name][1] += secs / n
  kernel_total = sum(per_cat.values())

  def pct_of_kernels(secs: float) -> float:
    return 100 * secs / kernel_total if kernel_total else 0.0

  shown = (*CATEGORIES, *(c for c in EXTRA_CATEGORIES if c in per_cat))
  categories = {c: {"ms": per_cat[c] * 1e3, "pct": pct_of_kernels(per_cat[c])} for c in shown}
  linears = sum(per_cat[c] for c in LINEARS)
  host = {
    "schedule": med["schedule_s"],
    "prepare": med["prepare_s"],
    "launch_overhead": max(0.0, med["forward_s"] - kernel_total),
    "postprocess": med["postprocess_s"],
    "outside_phases": max(0.0, step_s - sum(med[k] for k in PHASES)),
  }
  by_name = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
  return {
    "batch_size": b,
    "timed_steps": len(walls),
    "warmup_steps": warmup,
    "steps_until_all_decoding": prefill_steps,
    "first_timed_context_len": first_context,
    "step_s": step_s,
    "step_s_all": walls,
    "tokens_per_s": b / step_s,
    "phases_median_s": med,
    "phases_all_s": dict(phases),
    "kernels": {
      "total_s": kernel_total,
      "pct_of_step": 100 * kernel_total / step_s,
      "per_step": [len(k) for k in debug_steps],
      "total_s_per_step": [sum(secs for _, _, secs in k) for k in debug_steps],
      "linears_ms": linears * 1e3,
      "linears_pct": pct_of_kernels(linears),
      "categories": categories,
      "by_name": [{"category": c, "name": k, "count": count, "ms": secs * 1e3} for (c, k), (count, secs) in by_name],
    },
    "host": {k: {"ms": v * 1e3, "pct_of_step": 100 * v / step_s} for k, v in host.items()},
    "python_share_pct": 100 * sum(host.values()) / step_s,
    "launch_overhead_raw_s": med["forward_s"] - kernel_total,
    "enqueue_s": med["launch_s"],
    "launch_overhead_floored": med["forward_s"] < kernel_total,
  }


def with_estimates(results: list[dict]) -> list[dict]:
  """Where the launch overhead came out below the noise (floored), add the host share with the largest launch
  overhead measured at another batch size (the same kernels are launched whatever B is)."""
  measured = [r for r in results if not r["launch_overhead_floored"]]
  if not measured:
    return results
  ref = max(measured, key=lambda m: m["host"]["launch_overhead"]["ms"])
  extra_ms = ref["host"]["launch_overhead"]["ms"]
  for r in results:
    if r["launch_overhead_floored"]:
      share = r["python_share_pct"] + 100 * extra_ms * 1e-3 / r["step_s"]
      estimate = {"launch_overhead_ms": extra_ms, "from_batch_size": ref["batch_size"], "python_share_pct": share}
      r["python_share_estimate"] = estimate
  return results


def run_profile(run: Run, p: ProfileParams) -> list[dict]:
  from tinyvllm_core import LLMEngine

  biggest = max(p.batch_sizes)
  engine = LLMEngine(
    run.model.files(run.device),
    device=run.device,
    kv_cache_gb=p.kv_cache_gb,
    max_num_seqs=biggest,
    max_num_batched_tokens=max(512, biggest),
    quantize=p.quantize,
  )
  shapes = linear_shapes(engine.model_config)
  prompts = PromptSource(engine.model_config.vocab_size, p.prompt_len, p.seed)
  results = []
  for b in p.batch_sizes:
    ui.err.print(f"profile: batch size {b} ({run.model.name}, {run.device})", highlight=False)
    results.append(profile_batch(engine, b, p, prompts, shapes))
  run.finished()
  return with_estimates(results)


HOST_ROWS = {
  "schedule": "schedule (scheduler, seeds)",
  "prepare": "prepare (batch arrays, input copies)",
  "launch_overhead": "launch overhead (forward - kernel time)",
  "postprocess": "postprocess (detokenize, stops, outputs)",
  "outside_phases": "step() outside its phases",
}


def ms_pct(ms: float, pct: float) -> str:
  return f"{ms:.2f} ms ({pct:.1f}%)"


def label(category: str) -> str:
  return f"linear: {category}" if category in LINEARS else category


def profile_table(results: list[dict]) -> str:
  def host_cell(r: dict, k: str) -> str:
    floored = " floored, see note" if k == "launch_overhead" and r["launch_overhead_floored"] else ""
    return ms_pct(r["host"][k]["ms"], r["host"][k]["pct_of_step"]) + floored

  kernels = [r["kernels"] for r in results]
  blank = ["" for _ in results]
  rows = [
    ["**decode step (median wall)**", *(f"{r['step_s'] * 1e3:.2f} ms" for r in results)],
    ["**tokens/s** (B / step)", *(f"{r['tokens_per_s']:,.1f}" for r in results)],
    ["*host, % of the step:*", *blank],
    *([title, *(host_cell(r, k) for r in results)] for k, title in HOST_ROWS.items()),
    ["**Python / host share**", *(f"**{r['python_share_pct']:.1f}%**" for r in results)],
    ["forward until the step is queued (CPU: run)", *(f"{r['enqueue_s'] * 1e3:.2f} ms" for r in results)],
    ["*kernels (DEBUG=2), % of kernel time:*", *blank],
    ["kernel time per step (% of the step)", *(ms_pct(k["total_s"] * 1e3, k["pct_of_step"]) for k in kernels)],
    ["kernels per step", *(str(k["per_step"][0]) for k in kernels)],
    ["linears (all matmuls)", *(ms_pct(k["linears_ms"], k["linears_pct"]) for k in kernels)],
  ]
  for c in dict.fromkeys(c for k in kernels for c in k["categories"]):
    rows.append([label(c), *(ms_pct(**k["categories"][c]) if c in k["categories"] else "-" for k in kernels)])
  return markdown_table(["", *(f"B={r['batch_size']}" for r in results)], rows)


def dominates_line(r: dict) -> str:
  """What takes the step's time at one batch size, from the numbers."""
  kernels = r["kernels"]
  cats = kernels["categories"]
  top = sorted(cats, key=lambda c: -cats[c]["ms"])[:2]
  host_top = max(r["host"], key=lambda k: r["host"][k]["ms"])
  bigger = "kernels" if kernels["pct_of_step"] >= r["python_share_pct"] else "host/Python"
  largest = f"(largest: {host_top.replace('_', ' ')} {r['host'][host_top]['pct_of_step']:.0f}%)."
  if r["launch_overhead_floored"]:
    largest = "(launch overhead below the noise, see the note)."
  return (
    f"B={r['batch_size']}: {bigger} dominate; kernels {kernels['pct_of_step']:.0f}% of the step "
    f"(linears {kernels['linears_pct']:.0f}% of kernel time; top: {label(top[0])} {cats[top[0]]['pct']:.0f}%, "
    f"{label(top[1])} {cats[top[1]]['pct']:.0f}%), host {r['python_share_pct']:.0f}% {largest}"
  )


def noise_line(r: dict) -> str:
  walls = r["step_s_all"]
  forward_ms = r["phases_median_s"]["forward_s"] * 1e3
  line = (
    f"Noise at B={r['batch_size']}: the DEBUG=2 kernel time ({r['kernels']['total_s'] * 1e3:.1f} ms per step) came "
    f"out above the median forward phase ({forward_ms:.1f} ms; timed steps took {min(walls) * 1e3:.1f}-"
    f"{max(walls) * 1e3:.1f} ms), so the launch overhead is below this run's noise and counted as 0"
  )
  est = r.get("python_share_estimate")
  if est is None:
    return line + "."
  return line + (
    f"; with the largest launch overhead measured at another batch size ({est['launch_overhead_ms']:.1f} ms at "
    f"B={est['from_batch_size']}) the host share would be {est['python_share_pct']:.1f}%."
  )


def profile_report(run: Run, dtype: str, p: ProfileParams, results: list[dict]) -> tuple[dict, str]:
  from tinygrad.helpers import NUM_CPU_THREADS

  threads = NUM_CPU_THREADS.value if run.device.startswith("CPU") else None
  parameters = asdict(p) | {"debug_steps": DEBUG_STEPS, "temperature": 0.0, "ignore_eos": True}
  parameters["penalized"] = p.penalized
  parameters["prompts"] = "distinct random token ids"
  data = run.data("profile", dtype=dtype, cpu_threads=threads, parameters=parameters, results=results)
  weights = run.weights() + (f", {p.quantize}" if p.quantize else "")
  lines = [
    f"Model: {run.model.name} ({weights}), dtype {dtype}. Per batch size B: B prompts of {p.prompt_len} random token "
    f"ids, greedy, {p.penalties_text()}; {p.warmup_steps}+ untimed warm-up steps once all decode, {p.steps} timed "
    f"decode steps (medians) and {DEBUG_STEPS} more with tinygrad's per-kernel timing (DEBUG=2).",
    "",
    profile_table(results),
    "",
    "What dominates:",
    *(f"- {dominates_line(r)}" for r in results),
    "",
    *(f"{noise_line(r)}\n" for r in results if r["launch_overhead_floored"]),
    "Host share = schedule + prepare + launch overhead (forward phase - kernel time, floored at 0) + postprocess + "
    "step() outside its phases, over the median step.",
  ]
  if not any(r["kernels"]["linears_ms"] for r in results):
    lines.append(f"\nNo `linear_*` kernels were seen: the matmuls are counted under {OTHER}.")
  if threads and threads > 1:
    lines.append(f"\nCPU kernels ran on {threads} threads; NUM_CPU_THREADS=1 gives a one-core kernel breakdown.")
  return data, run.markdown("profile", lines)
