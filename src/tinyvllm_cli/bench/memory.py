"""`tinyvllm bench memory`: sequences that fit in one KV budget, preallocating max_model_len (naive) vs paged
blocks, on ShareGPT-like lognormal lengths; checked against the engine's own BlockManager."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Iterator

from tinyvllm_cli.bench.common import BenchError, Run, markdown_table

SHAREGPT_MEAN_PROMPT = 161.3
SHAREGPT_MEAN_OUTPUT = 337.9
SIGMA = 1.0


@dataclass
class MemoryParams:
  kv_cache_gb: float = 1.0
  block_size: int = 16
  max_model_len: int = 2048
  seed: int = 0


def lengths(max_model_len: int, seed: int) -> Iterator[tuple[int, int]]:
  """(prompt, output) lengths, lognormal with ShareGPT's means, each sequence within max_model_len."""
  rng = random.Random(seed)

  def draw(mean: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(mean) - SIGMA**2 / 2, SIGMA)))

  while True:
    prompt = min(draw(SHAREGPT_MEAN_PROMPT), max_model_len - 1)
    yield prompt, min(draw(SHAREGPT_MEAN_OUTPUT), max_model_len - prompt)


def fit(num_blocks: int, p: MemoryParams, paged: bool) -> dict:
  """Admit sequences in order, each at its full length, until the next one does not fit."""
  free = num_blocks
  seqs = []
  reserved = 0
  for prompt, output in lengths(p.max_model_len, p.seed):
    blocks = -(-(prompt + output if paged else p.max_model_len) // p.block_size)
    if blocks > free:
      break
    free -= blocks
    reserved += blocks * p.block_size
    seqs.append((prompt, output))
  used = sum(a + b for a, b in seqs)
  return {
    "sequences": len(seqs),
    "reserved_tokens": reserved,
    "used_tokens": used,
    "wasted_fraction": 1 - used / max(reserved, 1),
    "block_manager_sequences": block_manager_fit(num_blocks, p, paged),
    "lengths": seqs,
  }


def block_manager_fit(num_blocks: int, p: MemoryParams, paged: bool) -> int:
  """The same admission through the engine's BlockManager."""
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
  naive = fit(num_blocks, p, paged=False)
  paged = fit(num_blocks, p, paged=True)
  seqs = paged.pop("lengths")
  naive.pop("lengths")
  mean_prompt = sum(s[0] for s in seqs) / max(len(seqs), 1)
  mean_output = sum(s[1] for s in seqs) / max(len(seqs), 1)
  ratio = paged["sequences"] / max(naive["sequences"], 1)
  spread = (
    f"lognormal(sigma={SIGMA}), mean prompt {SHAREGPT_MEAN_PROMPT}, mean output {SHAREGPT_MEAN_OUTPUT} (ShareGPT-like)"
  )
  data = run.data(
    "memory",
    parameters=asdict(p) | {"dtype_bytes": dtype_bytes, "lengths": spread},
    layout={"bytes_per_token": bytes_per_token, "num_blocks": num_blocks, "block_size": p.block_size, "slots": slots},
    results={"naive": naive, "paged": paged},
    mean_prompt_tokens=mean_prompt,
    mean_output_tokens=mean_output,
    paged_vs_naive_sequences=ratio,
  )
  titles = {
    "sequences": "Sequences that fit at once",
    "block_manager_sequences": "... admitted by the engine's BlockManager",
    "reserved_tokens": "KV slots reserved",
    "used_tokens": "KV slots holding a token",
  }
  rows = [[title, f"{naive[k]:,}", f"{paged[k]:,}"] for k, title in titles.items()]
  rows.append(
    ["Wasted fraction of the reserved KV", f"{naive['wasted_fraction']:.1%}", f"{paged['wasted_fraction']:.1%}"]
  )
  header = ["", f"Naive (preallocate max_model_len={p.max_model_len})", f"Paged (block_size={p.block_size})"]
  agree = all(f["sequences"] == f["block_manager_sequences"] for f in (naive, paged))
  lines = [
    f"KV budget {p.kv_cache_gb} GiB, {dtype_bytes}-byte KV: {bytes_per_token:,} bytes per token, {num_blocks:,} "
    f"blocks of {p.block_size} = {slots:,} token slots. Sequence lengths: ShareGPT-like lognormal (seed {p.seed}); "
    f"the sequences that fit average {mean_prompt:.0f} prompt + {mean_output:.0f} output tokens.",
    "",
    markdown_table(header, rows),
    "",
    f"Paged vs naive: **{ratio:.2f}x** more sequences at once",
    "",
    "The BlockManager row admits the same sequences into tinyvllm_core's BlockManager; "
    + ("it agrees with the arithmetic." if agree else "**it disagrees with the arithmetic.**"),
  ]
  return data, run.markdown("memory", lines)
