"""Warm-up before the first request: tinygrad captures a TinyJit (and with --beam searches its kernels) the first time
a batch shape is seen, which costs seconds. Running the shapes a first request uses once, at start, moves that cost out
of the first reply. Only the engine's public API is used: short dummy requests, each shape's prompt chosen so it lands
in the next prefill bucket and attention width (blocks of 16 tokens: 1, 2, 4, 8), then batches of 2, 4, ... sequences
decoding together (serve-lite)."""

from __future__ import annotations

import dataclasses
from typing import Callable

PROMPT_LENS = (8, 24, 56, 120)  # prefill buckets 8, 32, 64, 128 and decode widths of 1, 2, 4, 8 blocks
# the engine's three sampling heads: argmax, plain sampling, with the top-k/top-p search
HEADS = ("greedy", "sample", "top_p")


def warmup_plan(max_len: int, max_num_seqs: int = 1) -> list[tuple[int, int, str]]:
  """(number of sequences, prompt length, head) per warm-up round: every head is captured, since a request may
  pick any."""
  rounds = [(1, n, head) for n in PROMPT_LENS if n + 2 < max_len for head in HEADS]
  batch = 2
  while batch <= min(max_num_seqs, 32):
    rounds += [(batch, 8, head) for head in HEADS]
    batch *= 2
  return rounds


def warm_up(engine, max_num_seqs: int = 1, on_round: Callable[[int, int], None] | None = None) -> int:
  """Run the plan on the engine before any other request; returns the number of rounds."""
  rounds = warmup_plan(engine.max_model_len, max_num_seqs)
  vocab = engine.model_config.vocab_size
  base = dataclasses.replace(engine.default_params, max_tokens=2, ignore_eos=True, stop=[], stop_token_ids=[], seed=0)
  sampled = dataclasses.replace(base, temperature=base.temperature or 0.7, top_k=0, top_p=1.0)
  greedy, top_p = dataclasses.replace(base, temperature=0.0), dataclasses.replace(sampled, top_p=0.95)
  params = {"greedy": greedy, "sample": sampled, "top_p": top_p}
  for i, (num_seqs, prompt_len, head) in enumerate(rounds):
    for k in range(num_seqs):  # token ids distinct across prompts: no prefix-cache hit shrinks a prefill
      engine.add_request([(7919 * (i * 64 + k) + j) % vocab for j in range(prompt_len)], params[head])
    while engine.has_unfinished_requests():
      engine.step()
    if on_round:
      on_round(i + 1, len(rounds))
  return len(rounds)


def warm_up_with_progress(engine, console, max_num_seqs: int = 1) -> None:
  """warm_up with a progress bar on `console` (stderr for chat and serve-lite)."""
  from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

  label = TextColumn("warming up: capturing batch shapes{task.fields[beam]}")
  columns = (label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
  rounds = len(warmup_plan(engine.max_model_len, max_num_seqs))
  beam = engine.config.beam
  with Progress(*columns, console=console, transient=True) as progress:
    task = progress.add_task("warm-up", total=rounds, beam=f" (BEAM={beam} search)" if beam else "")
    warm_up(engine, max_num_seqs, lambda done, total: progress.update(task, completed=done))
