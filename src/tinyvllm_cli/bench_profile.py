"""`tinyvllm bench profile`: where a decode step's time goes, per batch size.

For each batch size B: B seeded random prompts (greedy, ignore_eos) are stepped until every sequence is
decoding, a few more steps warm up (a new batch shape is captured by TinyJit on first use), then `--steps`
decode steps are timed: the step's wall time and the engine's own phases (`engine.last_step_timings`:
schedule, prepare, forward = kernel launches + device time + reading back the sampled ids, postprocess).
Two more steps run with tinygrad's per-kernel timing (DEBUG=2) switched on; its lines give each kernel's
time, grouped into the model's parts (the matmuls by their weight's shape). The host's share of the step
is schedule + prepare + postprocess + launch overhead (forward minus the kernel time) + what step() spends
outside those phases."""
from __future__ import annotations

import contextlib
import io
import re
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tinyvllm_cli import ui
from tinyvllm_cli.bench_common import BenchError, BenchModel, Report, machine_line, markdown_table, now, timestamp
from tinyvllm_cli.bench_latency import PromptSource

if TYPE_CHECKING:
  from tinyvllm_core import ModelConfig

PYTHON_GOAL_BATCH, PYTHON_GOAL = 32, 0.10  # the issue: "Python overhead per decode step must end under 10% of the step at 32 sequences"
DEBUG_STEPS = 2
LINEARS = ("qkv", "o", "gate_up", "down", "lm_head")
OTHER = "norms/rope/residual/activation"
CATEGORIES = ("embedding", *LINEARS, "attention", "sampling", OTHER)
EXTRA_CATEGORIES = ("other matmul", "transfers", "graph batches")  # shown only when a run has them
PHASES = ("schedule_s", "prepare_s", "forward_s", "postprocess_s")


@dataclass
class ProfileParams:
  batch_sizes: list[int]
  steps: int = 10
  prompt_len: int = 32
  warmup_steps: int = 3
  kv_cache_gb: float = 1.0
  seed: int = 0
  quantize: str | None = None  # int8 or gguf weights


def parse_batch_sizes(text: str) -> list[int]:
  """"1,8,32" -> [1, 8, 32] (duplicates dropped, order kept); anything else is a BenchError."""
  try: sizes = [int(s) for s in text.split(",") if s.strip()]
  except ValueError: sizes = []
  if not sizes or min(sizes) < 1: raise BenchError(f"--batch-sizes {text!r}: expected positive integers like 1,8,32")
  return list(dict.fromkeys(sizes))


# ---- tinygrad's DEBUG=2 lines --------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# *** CPU     5972 r_320_2_3_4_144_4   arg  3 mem   1.62 GB tm   1604.26us/     1.65ms ( ...
KERNEL_LINE = re.compile(r"^\*\*\*\s+\S+\s+\d+\s+(?P<name>.+?)\s+arg\s+\d+\s+mem\s+.*?\btm\s+(?P<t>[\d.]+)\s*(?P<unit>us|ms|s)\b")
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
LINEAR_NAME = re.compile(r"^linear_(\d+)_(\d+)_(\d+)$")


def parse_kernel_lines(text: str) -> list[tuple[str, float]]:
  """(kernel name, seconds) for each per-kernel line tinygrad printed at DEBUG>=2; other lines are skipped."""
  kernels = []
  for line in text.splitlines():
    if (m := KERNEL_LINE.match(ANSI.sub("", line).strip())):
      kernels.append((" ".join(m["name"].split()), float(m["t"]) * UNITS[m["unit"]]))
  return kernels


def linear_shapes(mc: ModelConfig) -> dict[tuple[int, int], list[str]]:
  """(N, K) of each matmul's weight -> the matmuls with that shape (in layer order)."""
  H, I, hd = mc.hidden_size, mc.intermediate_size, mc.head_dim
  shapes: dict[tuple[int, int], list[str]] = defaultdict(list)
  for name, shape in (("qkv", ((mc.num_heads + 2 * mc.num_kv_heads) * hd, H)), ("o", (H, mc.num_heads * hd)),
                      ("gate_up", (2 * I, H)), ("down", (H, I)), ("lm_head", (mc.vocab_size, H))):
    shapes[shape].append(name)
  return dict(shapes)


NEXT_LINEAR = {None: ("qkv",), "qkv": ("o",), "o": ("gate_up",), "gate_up": ("down",), "down": ("qkv", "lm_head"), "lm_head": ()}


def categorize_step(kernels: list[tuple[str, float]], shapes: dict[tuple[int, int], list[str]]) -> list[tuple[str, str, float]]:
  """(category, name, seconds) for one decode step's kernels, in order. `linear_{M}_{N}_{K}` kernels are
  the matmuls, told apart by (N, K) (and by their order in a layer where two share a shape); kv_write,
  paged_qk, paged_pv and what runs between paged_qk and paged_pv (mask, softmax) are attention; what
  runs after the lm_head matmul is sampling; a gather_rows first is the embedding."""
  out, prev, in_attention, after_head = [], None, False, False
  for i, (name, secs) in enumerate(kernels):
    linear = LINEAR_NAME.match(name)
    if name.startswith("copy"): cat = "transfers"
    elif name.startswith("batched"): cat = "graph batches"
    elif linear:
      candidates = shapes.get((int(linear[2]), int(linear[3])), [])
      cat = next((c for c in candidates if c in NEXT_LINEAR[prev]), candidates[0] if candidates else "other matmul")
      if cat in LINEARS: prev = cat
      after_head = cat == "lm_head"
    elif after_head: cat = "sampling"
    elif name in ("kv_write", "paged_qk", "paged_pv") or in_attention: cat = "attention"
    elif i == 0 and name == "gather_rows": cat = "embedding"
    else: cat = OTHER
    if name == "paged_qk": in_attention = True
    elif name == "paged_pv": in_attention = False
    out.append((cat, name, secs))
  return out


def capture_kernels(run: Callable[[], object]) -> list[tuple[str, float]]:
  """Run `run()` with tinygrad's per-kernel timing on (DEBUG=2) and return its kernels."""
  from tinygrad.helpers import DEBUG
  buf, old = io.StringIO(), DEBUG.value
  DEBUG.value = 2
  try:
    with contextlib.redirect_stdout(buf): run()
  finally: DEBUG.value = old
  return parse_kernel_lines(buf.getvalue())


# ---- running ---------------------------------------------------------------------------------

def width_bucket(context_len: int, block_size: int) -> int:
  """The block-table width the runner pads a batch to (a new width is a new TinyJit capture)."""
  from tinyvllm_core.runner import next_power_of_2
  return next_power_of_2(-(-context_len // block_size))


def _step(engine, contexts: dict[str, int]) -> float:
  """One engine step; returns its wall time and keeps each request's context length (prompt + output)."""
  t0 = now()
  outputs = engine.step()
  wall = now() - t0
  for o in outputs: contexts[o.request_id] = len(o.prompt_token_ids) + len(o.token_ids)
  return wall


def _all_decoding(engine, b: int) -> bool:
  t = engine.last_step_timings
  return t.get("num_tokens") == t.get("num_seqs") == b


def one_width_from(context_len: int, window: int, block_size: int) -> int:
  """The first context length >= context_len from which `window` steps (context_len, context_len + 1, ...) keep one
  block-table width."""
  while width_bucket(context_len, block_size) != width_bucket(context_len + window - 1, block_size): context_len += 1
  return context_len


def profile_batch(engine, b: int, p: ProfileParams, prompts: PromptSource, shapes: dict) -> dict:
  from tinyvllm_core import SamplingParams
  bs, window = engine.config.block_size, p.steps + DEBUG_STEPS
  # chunked prefill lets early sequences decode while later ones prefill: at most this many steps before all decode
  prefill_bound = -(-b * p.prompt_len // engine.config.max_num_batched_tokens) + 1
  # the last warm-up step and the timed + DEBUG steps after it share one width: that width is captured before timing
  end_context = one_width_from(p.prompt_len + prefill_bound + p.warmup_steps, window + 1, bs) + window + 1
  max_tokens = end_context - p.prompt_len + 1
  if end_context + 1 > engine.max_model_len:
    raise BenchError(f"--prompt-len {p.prompt_len} + {max_tokens} generated tokens exceed the engine's context ({engine.max_model_len} tokens); "
                     "shorten --prompt-len or --steps, or raise --kv-cache-gb")
  blocks, total_blocks = b * -(-(end_context + 1) // bs), engine.stats()["num_total_blocks"]
  if blocks > total_blocks:
    raise BenchError(f"batch size {b} needs up to {blocks} KV blocks of {bs} tokens but the cache has {total_blocks}; raise --kv-cache-gb")
  params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
  ids = [engine.add_request(prompt, params) for prompt in prompts.take(b)]
  contexts = {rid: p.prompt_len for rid in ids}  # request -> the context length of its next decode step
  try:
    prefill_steps = 0
    while not _all_decoding(engine, b):
      if prefill_steps > 2 * prefill_bound + 4: raise BenchError(f"batch size {b}: the sequences never all decoded at once")
      _step(engine, contexts)
      prefill_steps += 1
    # a few steps, and on until the last one (its context: the next one's - 1, as every sequence decodes) and the timed +
    # DEBUG steps share one block-table width: no JIT capture of a new width is timed
    warmup = 0
    while warmup < p.warmup_steps or one_width_from(last := max(contexts.values()) - 1, window + 1, bs) != last:
      _step(engine, contexts)
      warmup += 1
    first_context = max(contexts.values())
    walls, phases = [], defaultdict(list)
    for _ in range(p.steps):
      walls.append(_step(engine, contexts))
      t = engine.last_step_timings
      if not _all_decoding(engine, b): raise BenchError(f"batch size {b}: a timed step ran {t.get('num_seqs')} sequences, not {b} (preempted? raise --kv-cache-gb)")
      for k in PHASES: phases[k].append(t[k])
    debug_steps = []
    for _ in range(DEBUG_STEPS):
      kernels = capture_kernels(lambda: _step(engine, contexts))
      if not _all_decoding(engine, b): raise BenchError(f"batch size {b}: a profiled step did not decode all {b} sequences")
      debug_steps.append(categorize_step(kernels, shapes))
  finally:
    for rid in ids: engine.abort(rid)
  return batch_summary(b, walls, phases, debug_steps, prefill_steps, warmup, first_context)


def batch_summary(b: int, walls: list[float], phases: dict[str, list[float]], debug_steps: list[list[tuple[str, str, float]]],
                  prefill_steps: int, warmup: int, first_context: int) -> dict:
  step = statistics.median(walls)
  med = {k: statistics.median(v) for k, v in phases.items()}
  n = len(debug_steps)
  per_cat: dict[str, float] = defaultdict(float)
  per_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # (category, name) -> [count, seconds] per step
  for kernels in debug_steps:
    for cat, name, secs in kernels:
      per_cat[cat] += secs / n
      per_kernel[cat, name][0] += 1 / n
      per_kernel[cat, name][1] += secs / n
  kernel_total = sum(per_cat.values())
  categories = {c: {"ms": per_cat.get(c, 0.0) * 1e3, "pct": 100 * per_cat.get(c, 0.0) / kernel_total if kernel_total else 0.0}
                for c in (*CATEGORIES, *(c for c in EXTRA_CATEGORIES if c in per_cat))}
  linears = sum(per_cat.get(c, 0.0) for c in LINEARS)
  host = {"schedule": med["schedule_s"], "prepare": med["prepare_s"], "launch_overhead": max(0.0, med["forward_s"] - kernel_total),
          "postprocess": med["postprocess_s"], "outside_phases": max(0.0, step - sum(med.values()))}
  python = sum(host.values())
  return {"batch_size": b, "timed_steps": len(walls), "warmup_steps": warmup, "steps_until_all_decoding": prefill_steps,
          "first_timed_context_len": first_context, "step_s": step, "step_s_all": walls, "tokens_per_s": b / step,
          "phases_median_s": med, "phases_all_s": dict(phases),
          "kernels": {"total_s": kernel_total, "pct_of_step": 100 * kernel_total / step, "per_step": [len(k) for k in debug_steps],
                      "total_s_per_step": [sum(secs for _, _, secs in k) for k in debug_steps],
                      "linears_ms": linears * 1e3, "linears_pct": 100 * linears / kernel_total if kernel_total else 0.0,
                      "categories": categories,
                      "by_name": [{"category": cat, "name": name, "count": count, "ms": secs * 1e3}
                                  for (cat, name), (count, secs) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])]},
          "host": {k: {"ms": v * 1e3, "pct_of_step": 100 * v / step} for k, v in host.items()},
          "python_share_pct": 100 * python / step, "launch_overhead_raw_s": med["forward_s"] - kernel_total,
          "launch_overhead_floored": med["forward_s"] < kernel_total}


def with_estimates(results: list[dict]) -> list[dict]:
  """Where the DEBUG=2 kernel time came out above the forward phase (the launch overhead is below the run's noise, as
  on a loaded machine at large batches), add the host share with the largest launch overhead measured at another
  batch size (the same kernels are launched whatever B is)."""
  measured = [r for r in results if not r["launch_overhead_floored"]]
  for r in results:
    if not r["launch_overhead_floored"] or not measured: continue
    ref = max(measured, key=lambda m: m["host"]["launch_overhead"]["ms"])
    extra = ref["host"]["launch_overhead"]["ms"] * 1e-3
    r["python_share_estimate"] = {"launch_overhead_ms": extra * 1e3, "from_batch_size": ref["batch_size"],
                                  "python_share_pct": r["python_share_pct"] + 100 * extra / r["step_s"]}
  return results


def run_profile(model: BenchModel, device: str, p: ProfileParams) -> list[dict]:
  from tinyvllm_core import LLMEngine
  biggest = max(p.batch_sizes)
  engine = LLMEngine(model.files(device), device=device, kv_cache_gb=p.kv_cache_gb, max_num_seqs=biggest,
                     max_num_batched_tokens=max(512, biggest), quantize=p.quantize)
  shapes, prompts, results = linear_shapes(engine.model_config), PromptSource(engine.model_config.vocab_size, p.prompt_len, p.seed), []
  for b in p.batch_sizes:
    ui.err.print(f"profile: batch size {b} ({model.name}, {device})", highlight=False)
    results.append(profile_batch(engine, b, p, prompts, shapes))
  return with_estimates(results)


# ---- the report ------------------------------------------------------------------------------

def goal(results: list[dict]) -> dict:
  row = next((r for r in results if r["batch_size"] == PYTHON_GOAL_BATCH), None)
  if row is None: return {"batch_size": PYTHON_GOAL_BATCH, "measured": False, "limit_pct": 100 * PYTHON_GOAL}
  shares = [row["python_share_pct"], *([row["python_share_estimate"]["python_share_pct"]] if "python_share_estimate" in row else [])]
  return {"batch_size": PYTHON_GOAL_BATCH, "measured": True, "limit_pct": 100 * PYTHON_GOAL, "python_share_pct": row["python_share_pct"],
          "launch_overhead_floored": row["launch_overhead_floored"], "python_share_estimate_pct": shares[1] if len(shares) > 1 else None,
          "passed": max(shares) < 100 * PYTHON_GOAL}


def goal_line(g: dict) -> str:
  if not g["measured"]:
    return f"Python overhead at {g['batch_size']} sequences: not measured (--batch-sizes has no {g['batch_size']}); goal: under {g['limit_pct']:.0f}% of the step."
  verdict = "PASS" if g["passed"] else "FAIL"
  if g["launch_overhead_floored"]:
    estimate = (f"{g['python_share_estimate_pct']:.1f}% with another batch size's launch overhead" if g["python_share_estimate_pct"] is not None
                else "no other batch size to estimate it from")
    return (f"**{verdict}**: Python overhead per decode step at {g['batch_size']} sequences is **{g['python_share_pct']:.1f}%** of the step "
            f"with the launch overhead floored at 0, {estimate} (goal: under {g['limit_pct']:.0f}%; see the note on noise below).")
  return (f"**{verdict}**: Python overhead per decode step at {g['batch_size']} sequences is **{g['python_share_pct']:.1f}%** "
          f"of the step (goal: under {g['limit_pct']:.0f}%).")


HOST_ROWS = (("schedule", "schedule (scheduler, seeds)"), ("prepare", "prepare (batch arrays, input copies)"),
             ("launch_overhead", "launch overhead (forward - kernel time)"), ("postprocess", "postprocess (detokenize, stops, outputs)"),
             ("outside_phases", "step() outside its phases"))


def profile_table(results: list[dict]) -> str:
  def ms_pct(ms: float, pct: float) -> str: return f"{ms:.2f} ms ({pct:.1f}%)"
  rows = [["**decode step (median wall)**", *(f"{r['step_s'] * 1e3:.2f} ms" for r in results)],
          ["**tokens/s** (B / step)", *(f"{r['tokens_per_s']:,.1f}" for r in results)],
          ["*host, % of the step:*", *("" for _ in results)]]
  def host_cell(r: dict, k: str) -> str:
    return ms_pct(r["host"][k]["ms"], r["host"][k]["pct_of_step"]) + (" floored, see note" if k == "launch_overhead" and r["launch_overhead_floored"] else "")
  rows += [[label, *(host_cell(r, k) for r in results)] for k, label in HOST_ROWS]
  rows += [["**Python / host share**", *(f"**{r['python_share_pct']:.1f}%**" for r in results)],
           ["*kernels (DEBUG=2), % of kernel time:*", *("" for _ in results)],
           ["kernel time per step (% of the step)", *(ms_pct(r["kernels"]["total_s"] * 1e3, r["kernels"]["pct_of_step"]) for r in results)],
           ["kernels per step", *(str(r["kernels"]["per_step"][0]) for r in results)],
           ["linears (all matmuls)", *(ms_pct(r["kernels"]["linears_ms"], r["kernels"]["linears_pct"]) for r in results)]]
  cats = list(dict.fromkeys(c for r in results for c in r["kernels"]["categories"]))
  for c in cats:
    label = f"linear: {c}" if c in LINEARS else c
    rows.append([label, *(ms_pct(r["kernels"]["categories"][c]["ms"], r["kernels"]["categories"][c]["pct"]) if c in r["kernels"]["categories"]
                          else "-" for r in results)])
  return markdown_table(["", *(f"B={r['batch_size']}" for r in results)], rows)


def dominates_line(r: dict) -> str:
  """What takes the step's time at one batch size, from the numbers."""
  cats = r["kernels"]["categories"]
  top = sorted(cats, key=lambda c: -cats[c]["ms"])[:2]
  host_top = max(r["host"], key=lambda k: r["host"][k]["ms"])
  label = lambda c: f"linear {c}" if c in LINEARS else c
  bigger = "kernels" if r["kernels"]["pct_of_step"] >= r["python_share_pct"] else "host/Python"
  return (f"B={r['batch_size']}: {bigger} dominate; kernels {r['kernels']['pct_of_step']:.0f}% of the step "
          f"(linears {r['kernels']['linears_pct']:.0f}% of kernel time; top: {label(top[0])} {cats[top[0]]['pct']:.0f}%, "
          f"{label(top[1])} {cats[top[1]]['pct']:.0f}%), host {r['python_share_pct']:.0f}% "
          + ("(launch overhead below the noise, see the note)." if r["launch_overhead_floored"] else
             f"(largest: {host_top.replace('_', ' ')} {r['host'][host_top]['pct_of_step']:.0f}%)."))


def noise_line(r: dict) -> str:
  walls = r["step_s_all"]
  line = (f"Noise at B={r['batch_size']}: the DEBUG=2 kernel time ({r['kernels']['total_s'] * 1e3:.1f} ms per step) came out above the "
          f"median forward phase ({r['phases_median_s']['forward_s'] * 1e3:.1f} ms; timed steps took {min(walls) * 1e3:.1f}-{max(walls) * 1e3:.1f} ms), "
          "so the launch overhead is below this run's noise and counted as 0")
  if (est := r.get("python_share_estimate")) is None: return line + "."
  return (line + f"; with the largest launch overhead measured at another batch size ({est['launch_overhead_ms']:.1f} ms at "
          f"B={est['from_batch_size']}) the host share would be {est['python_share_pct']:.1f}%.")


def profile_report(model: BenchModel, device: str, dtype: str, p: ProfileParams, results: list[dict], command: str,
                   notes: list[str], machine: dict) -> Report:
  from tinygrad.helpers import NUM_CPU_THREADS
  g, threads = goal(results), NUM_CPU_THREADS.value if device.startswith("CPU") else None
  data = {"preset": "profile", "command": command, "timestamp": timestamp(), "model": model.describe(), "device": device, "dtype": dtype,
          "cpu_threads": threads,
          "parameters": asdict(p) | {"debug_steps": DEBUG_STEPS, "temperature": 0.0, "ignore_eos": True,
                                     "prompts": "distinct random token ids"},
          "machine": machine, "results": results, "python_goal": g, "notes": notes}
  weights = ("random weights" if model.random_weights else "real weights") + (f", {p.quantize}" if p.quantize else "")
  lines = [f"# tinyvllm bench profile: {model.name} on {device}", "", f"`{command}`", "",
           f"Model: {model.name} ({weights}), dtype {dtype}, tinygrad {machine.get('tinygrad')}, {data['timestamp']}", "",
           f"Machine: {machine_line(machine)}", "",
           f"Workload: per batch size B, B prompts of {p.prompt_len} random token ids, greedy, ignore_eos; stepped until all B "
           f"sequences decode, {p.warmup_steps}+ warm-up steps (no JIT capture is timed), then {p.steps} decode steps timed (medians) "
           f"and {DEBUG_STEPS} more with tinygrad's per-kernel timing (DEBUG=2) for the kernel breakdown.", "",
           profile_table(results), "", goal_line(g), "", "What dominates:", *(f"- {dominates_line(r)}" for r in results), "",
           *(f"{noise_line(r)}\n" for r in results if r["launch_overhead_floored"]),
           "Host share = schedule + prepare + launch overhead + postprocess + step() outside its phases, over the median step wall "
           "time. Launch overhead = the median forward phase (kernel launches, device time, reading back the sampled ids) minus "
           "the kernel time from the DEBUG=2 steps, floored at 0. Kernel percentages are of the kernel time per step."]
  if not any(r["kernels"]["linears_ms"] for r in results):
    lines += ["", "No `linear_*` kernels were seen: on this device the matmuls run as tinygrad's own kernels and are counted "
                  f"under {OTHER}."]
  if any("graph batches" in r["kernels"]["categories"] for r in results):
    lines += ["", "Some kernels ran inside JIT graphs (`batched N` lines), which DEBUG=2 times as one entry: see graph batches."]
  if threads:
    lines += ["", f"CPU kernels split over {threads} thread(s) (tinygrad's NUM_CPU_THREADS); the runner runs the parts at once, the "
                  "DEBUG=2 steps one after another, so the kernel times are one core's" + ("" if threads == 1 else ": with more than one "
                  "thread they exceed the forward phase; NUM_CPU_THREADS=1 gives a one-core breakdown with the host share") + "."]
  lines += [f"\nNote: {n}" for n in notes]
  return Report("profile", model.slug, device, data, "\n".join(lines))
