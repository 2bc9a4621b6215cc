"""`tinyvllm bench memory`: how many sequences fit in one KV budget when each preallocates max_model_len
(naive) vs when blocks are taken as tokens arrive (paged), and how much of the reserved KV holds no token.

Sequence lengths follow a ShareGPT-like spread (the vLLM paper's dataset: mean prompt 161, mean output
338 tokens), lognormal, drawn with a fixed seed. The budget is sized by the engine's own rule (num_kv_blocks)
and the arithmetic is checked by admitting the same sequences into the engine's own BlockManager."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Iterator

from tinyvllm_cli.bench.common import BenchError, Run, machine_line, markdown_table

SHAREGPT_MEAN_PROMPT, SHAREGPT_MEAN_OUTPUT, SIGMA = 161.3, 337.9, 1.0


@dataclass
class MemoryParams:
  kv_cache_gb: float = 1.0
  block_size: int = 16
  max_model_len: int = 2048
  seed: int = 0


@dataclass
class Fit:
  sequences: int
  reserved_tokens: int  # KV slots held by the admitted sequences
  used_tokens: int  # slots holding a token

  @property
  def wasted(self) -> float:
    return 1 - self.used_tokens / max(self.reserved_tokens, 1)


def lengths(max_model_len: int, seed: int) -> Iterator[tuple[int, int]]:
  """(prompt, output) lengths, lognormal with ShareGPT's means, each sequence within max_model_len."""
  rng = random.Random(seed)

  def draw(mean: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(mean) - SIGMA**2 / 2, SIGMA)))

  while True:
    prompt = min(draw(SHAREGPT_MEAN_PROMPT), max_model_len - 1)
    yield prompt, min(draw(SHAREGPT_MEAN_OUTPUT), max_model_len - prompt)


def fit(num_blocks: int, p: MemoryParams, paged: bool) -> tuple[Fit, list[tuple[int, int]]]:
  """Admit sequences in order, each at its full length, until the next one does not fit."""
  free, seqs, reserved, used = num_blocks, [], 0, 0
  for prompt, output in lengths(p.max_model_len, p.seed):
    tokens = prompt + output if paged else p.max_model_len
    need = -(-tokens // p.block_size)
    if need > free:
      return Fit(len(seqs), reserved, used), seqs
    free -= need
    reserved += need * p.block_size
    used += prompt + output
    seqs.append((prompt, output))


def block_manager_fit(num_blocks: int, p: MemoryParams, paged: bool) -> int:
  """The same admission through the engine's BlockManager: paged takes blocks for the tokens a sequence has,
  naive reserves max_model_len for each."""
  from tinyvllm_core import BlockManager, SamplingParams, Sequence

  bm = BlockManager(num_blocks + 1, p.block_size, enable_prefix_caching=False)
  for i, (prompt, output) in enumerate(lengths(p.max_model_len, p.seed)):
    seq = Sequence(f"seq-{i}", [0] * prompt, SamplingParams(max_tokens=output))
    seq.output_token_ids = [0] * output
    need = seq.num_tokens if paged else p.max_model_len
    if not bm.can_allocate(seq, need):
      return i
    bm.allocate(seq, need)


def memory_report(run: Run, dtype: str, p: MemoryParams) -> tuple[dict, str]:
  from tinygrad import dtypes
  from tinyvllm_core import kv_bytes_per_block, num_kv_blocks

  dtype_bytes = getattr(dtypes, dtype).itemsize
  mc = run.model.model_config()
  bytes_per_token = kv_bytes_per_block(mc, 1, dtype)
  num_blocks = num_kv_blocks(mc, p.block_size, dtype, p.kv_cache_gb) - 1  # block 0 is reserved for padding
  slots = num_blocks * p.block_size
  if slots < p.max_model_len:
    raise BenchError(
      f"the KV budget holds {slots} tokens, less than one --max-model-len {p.max_model_len}; raise --kv-cache-gb"
    )
  naive, _ = fit(num_blocks, p, paged=False)
  paged, seqs = fit(num_blocks, p, paged=True)
  fits = {"naive": naive, "paged": paged}
  counts = {name: block_manager_fit(num_blocks, p, paged=name == "paged") for name in fits}
  mean_prompt = sum(s[0] for s in seqs) / max(len(seqs), 1)
  mean_output = sum(s[1] for s in seqs) / max(len(seqs), 1)
  ratio = paged.sequences / max(naive.sequences, 1)
  spread = (
    f"lognormal(sigma={SIGMA}), mean prompt {SHAREGPT_MEAN_PROMPT}, mean output {SHAREGPT_MEAN_OUTPUT} (ShareGPT-like)"
  )
  data = run.data(
    "memory",
    parameters=asdict(p) | {"dtype_bytes": dtype_bytes, "lengths": spread},
    layout={"bytes_per_token": bytes_per_token, "num_blocks": num_blocks, "block_size": p.block_size, "slots": slots},
    results={
      name: asdict(f) | {"wasted_fraction": f.wasted, "block_manager_sequences": counts[name]}
      for name, f in fits.items()
    },
    mean_prompt_tokens=mean_prompt,
    mean_output_tokens=mean_output,
    paged_vs_naive_sequences=ratio,
  )
  rows = [
    ["Sequences that fit at once", f"{naive.sequences:,}", f"{paged.sequences:,}"],
    ["... admitted by the engine's BlockManager", f"{counts['naive']:,}", f"{counts['paged']:,}"],
    ["KV slots reserved", f"{naive.reserved_tokens:,}", f"{paged.reserved_tokens:,}"],
    ["KV slots holding a token", f"{naive.used_tokens:,}", f"{paged.used_tokens:,}"],
    ["Wasted fraction of the reserved KV", f"{naive.wasted:.1%}", f"{paged.wasted:.1%}"],
  ]
  header = ["", f"Naive (preallocate max_model_len={p.max_model_len})", f"Paged (block_size={p.block_size})"]
  agree = naive.sequences == counts["naive"] and paged.sequences == counts["paged"]
  lines = [
    f"KV budget {p.kv_cache_gb} GiB, {dtype_bytes}-byte KV ({run.device}): {bytes_per_token:,} bytes per "
    f"token, {num_blocks:,} blocks of {p.block_size} = {slots:,} token slots.",
    "",
    f"Sequence lengths: ShareGPT-like lognormal (seed {p.seed}); the sequences that fit average "
    f"{mean_prompt:.0f} prompt + {mean_output:.0f} output tokens, each at its full length.",
    "",
    markdown_table(header, rows),
    "",
    f"Paged vs naive: **{ratio:.2f}x** more sequences at once",
    "",
    "The BlockManager row admits the same sequences into tinyvllm_core's BlockManager; "
    + ("it agrees with the arithmetic." if agree else "**it disagrees with the arithmetic.**"),
    "",
    f"Machine: {machine_line(run.machine)} (pure arithmetic: no model runs)",
  ]
  return data, run.markdown(f"memory: {run.model.name}", lines)
