"""`tinyvllm bench memory`: how many sequences fit in one KV budget when each preallocates max_model_len
(naive) vs when blocks are taken as tokens arrive (paged), and how much of the reserved KV holds no token.

Sequence lengths follow a ShareGPT-like spread (the vLLM paper's dataset: mean prompt 161, mean output
338 tokens), lognormal, drawn with a fixed seed. The arithmetic is checked by admitting the same sequences
into the engine's own BlockManager."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator

from tinyvllm_cli.bench_common import BenchError, BenchModel, Report, machine_line, markdown_table, timestamp

if TYPE_CHECKING:
  from tinyvllm_core import ModelConfig

SHAREGPT_MEAN_PROMPT, SHAREGPT_MEAN_OUTPUT, SIGMA = 161.3, 337.9, 1.0


@dataclass
class MemoryParams:
  kv_cache_gb: float = 1.0
  block_size: int = 16
  max_model_len: int = 2048
  seed: int = 0


@dataclass
class Layout:
  """The KV budget in tokens, as the engine sizes it (block 0 is reserved for padding)."""
  bytes_per_token: int
  num_blocks: int  # usable blocks
  block_size: int

  @property
  def slots(self) -> int: return self.num_blocks * self.block_size


@dataclass
class Fit:
  sequences: int
  reserved_tokens: int  # KV slots held by the admitted sequences
  used_tokens: int      # slots holding a token

  @property
  def wasted(self) -> float: return 1 - self.used_tokens / max(self.reserved_tokens, 1)


def layout(mc: ModelConfig, p: MemoryParams, dtype_bytes: int) -> Layout:
  bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * dtype_bytes
  num_blocks = max(2, int(p.kv_cache_gb * 2**30 // (bytes_per_token * p.block_size)))
  return Layout(bytes_per_token, num_blocks - 1, p.block_size)


def lengths(max_model_len: int, seed: int) -> Iterator[tuple[int, int]]:
  """(prompt, output) lengths, lognormal with ShareGPT's means, each sequence within max_model_len."""
  rng = random.Random(seed)
  def draw(mean: float) -> int: return max(1, round(rng.lognormvariate(math.log(mean) - SIGMA**2 / 2, SIGMA)))
  while True:
    prompt = min(draw(SHAREGPT_MEAN_PROMPT), max_model_len - 1)
    yield prompt, min(draw(SHAREGPT_MEAN_OUTPUT), max_model_len - prompt)


def fit(lay: Layout, p: MemoryParams, paged: bool) -> tuple[Fit, list[tuple[int, int]]]:
  """Admit sequences in order, each at its full length, until the next one does not fit."""
  bs, free, seqs, reserved, used = lay.block_size, lay.num_blocks, [], 0, 0
  for prompt, output in lengths(p.max_model_len, p.seed):
    need = -(-(prompt + output if paged else p.max_model_len) // bs)
    if need > free: break
    free, reserved, used = free - need, reserved + need * bs, used + prompt + output
    seqs.append((prompt, output))
  return Fit(len(seqs), reserved, used), seqs


def block_manager_fit(lay: Layout, p: MemoryParams, paged: bool) -> int:
  """The same admission through the engine's BlockManager: paged takes blocks for the tokens a sequence has,
  naive reserves max_model_len for each."""
  from tinyvllm_core import SamplingParams
  from tinyvllm_core.block_manager import BlockManager
  from tinyvllm_core.sequence import Sequence
  bm = BlockManager(lay.num_blocks + 1, p.block_size, enable_prefix_caching=False)
  for i, (prompt, output) in enumerate(lengths(p.max_model_len, p.seed)):
    seq = Sequence(f"seq-{i}", [0] * prompt, SamplingParams(max_tokens=output))
    seq.output_token_ids = [0] * output
    need = seq.num_tokens if paged else p.max_model_len
    if not bm.can_allocate(seq, need): return i
    bm.allocate(seq, need)
  raise AssertionError("unreachable: lengths() is endless")


@dataclass
class MemoryResult:
  layout: Layout
  naive: Fit
  paged: Fit
  naive_block_manager: int
  paged_block_manager: int
  mean_prompt: float
  mean_output: float

  @property
  def ratio(self) -> float: return self.paged.sequences / max(self.naive.sequences, 1)


def run_memory(mc: ModelConfig, p: MemoryParams, dtype_bytes: int) -> MemoryResult:
  lay = layout(mc, p, dtype_bytes)
  if lay.slots < p.max_model_len:
    raise BenchError(f"the KV budget holds {lay.slots} tokens, less than one --max-model-len {p.max_model_len}; raise --kv-cache-gb")
  naive, _ = fit(lay, p, paged=False)
  paged, seqs = fit(lay, p, paged=True)
  return MemoryResult(lay, naive, paged, block_manager_fit(lay, p, paged=False), block_manager_fit(lay, p, paged=True),
                      sum(s[0] for s in seqs) / max(len(seqs), 1), sum(s[1] for s in seqs) / max(len(seqs), 1))


def memory_report(model: BenchModel, device: str, dtype_bytes: int, p: MemoryParams, r: MemoryResult, command: str,
                  notes: list[str], machine: dict) -> Report:
  fits = {"naive": asdict(r.naive) | {"wasted_fraction": r.naive.wasted, "block_manager_sequences": r.naive_block_manager},
          "paged": asdict(r.paged) | {"wasted_fraction": r.paged.wasted, "block_manager_sequences": r.paged_block_manager}}
  data = {"preset": "memory", "command": command, "timestamp": timestamp(), "model": model.describe(), "device": device,
          "parameters": asdict(p) | {"dtype_bytes": dtype_bytes, "lengths": f"lognormal(sigma={SIGMA}), mean prompt "
                                     f"{SHAREGPT_MEAN_PROMPT}, mean output {SHAREGPT_MEAN_OUTPUT} (ShareGPT-like)"},
          "machine": machine, "layout": asdict(r.layout) | {"slots": r.layout.slots}, "results": fits,
          "mean_prompt_tokens": r.mean_prompt, "mean_output_tokens": r.mean_output, "paged_vs_naive_sequences": r.ratio,
          "notes": notes}
  return Report("memory", model.name_slug, device, data, _markdown(model, device, dtype_bytes, p, r, command, machine, notes))


def _markdown(model: BenchModel, device: str, dtype_bytes: int, p: MemoryParams, r: MemoryResult, command: str,
              machine: dict, notes: list[str]) -> str:
  lay = r.layout
  rows = [["Sequences that fit at once", f"{r.naive.sequences:,}", f"{r.paged.sequences:,}"],
          ["... admitted by the engine's BlockManager", f"{r.naive_block_manager:,}", f"{r.paged_block_manager:,}"],
          ["KV slots reserved", f"{r.naive.reserved_tokens:,}", f"{r.paged.reserved_tokens:,}"],
          ["KV slots holding a token", f"{r.naive.used_tokens:,}", f"{r.paged.used_tokens:,}"],
          ["Wasted fraction of the reserved KV", f"{r.naive.wasted:.1%}", f"{r.paged.wasted:.1%}"]]
  table = markdown_table(["", f"Naive (preallocate max_model_len={p.max_model_len})", f"Paged (block_size={p.block_size})"], rows)
  agree = r.naive.sequences == r.naive_block_manager and r.paged.sequences == r.paged_block_manager
  lines = [f"# tinyvllm bench memory: {model.name}", "", f"`{command}`", "",
           f"KV budget {p.kv_cache_gb} GiB, {dtype_bytes}-byte KV ({device}): {lay.bytes_per_token:,} bytes per token, "
           f"{lay.num_blocks:,} blocks of {lay.block_size} = {lay.slots:,} token slots.", "",
           f"Sequence lengths: ShareGPT-like lognormal (seed {p.seed}); the sequences that fit average "
           f"{r.mean_prompt:.0f} prompt + {r.mean_output:.0f} output tokens, each at its full length.", "",
           table, "", f"Paged vs naive: **{r.ratio:.2f}x** more sequences at once", "",
           "The BlockManager row admits the same sequences into tinyvllm_core's BlockManager; "
           + ("it agrees with the arithmetic." if agree else "**it disagrees with the arithmetic.**"),
           "", f"Machine: {machine_line(machine)} (pure arithmetic: no model runs)"]
  return "\n".join(lines + [f"\nNote: {n}" for n in notes])
