"""Warm-up: tinygrad captures a TinyJit (and with --beam searches its kernels) the first time a batch shape is seen,
which costs seconds even when the kernels are in tinygrad's disk cache (lowering them is most of it). Running the
shapes a first request uses once moves that cost out of the first reply. Only the engine's public API is used: short
dummy requests, each shape's prompt chosen so it lands in the next prefill bucket and attention width (blocks of 16
tokens: 1, 2, 4, 8), then batches of 2, 4, ... sequences prefilling and decoding together at those widths and in the
prefill buckets up to the engine's token budget per step (serve-lite: what concurrent requests meet).

chat and serve-lite answer first and warm up in the background through their EngineLoop (`BackgroundWarmUp`), one
round at a time, the rounds a likely first request needs first; a reply pauses it: the warm-up requests still queued
are aborted, so a reply never queues behind them (only behind the step in flight). `warm_up` runs the plan on an
engine directly."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

PROMPT_LENS = (8, 24, 56, 120)  # prefill buckets 8, 32, 64, 128 and decode widths of 1, 2, 4, 8 blocks
BATCH_PROMPT_LEN = PROMPT_LENS[0]  # the prompts of the first batch rounds (decode at width 1)
# the engine's three sampling heads: argmax, plain sampling, with the top-k/top-p search
HEADS = ("greedy", "sample", "top_p")
BLOCK_SIZE = 16  # the engine's default KV block size: the widths above are in its blocks
FIRST_MESSAGE = "What is the capital of France?"  # a likely first turn: its prefill bucket is warmed up first


def next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def head_of(params) -> str:
  """The sampling head a request with these SamplingParams runs through."""
  if params.temperature == 0:
    return "greedy"
  if params.top_k > 0 or params.top_p < 1:
    return "top_p"
  return "sample"


def width_of(context_len: int) -> int:
  """The block-table width a step reaching context_len tokens pads to, in the default block size's blocks."""
  from tinyvllm_core import block_table_width  # the engine's rule; imported late: the CLI starts before tinygrad

  return block_table_width(context_len, BLOCK_SIZE)


def warmup_plan(
  max_len: int,
  max_num_seqs: int = 1,
  head: str | None = None,
  prompt_len: int = 0,
  max_num_batched_tokens: int = 512,
) -> list[tuple]:
  """(number of sequences, prompt length, head) per warm-up round: every head is captured, since a request may pick
  any. `head` and `prompt_len` (a likely first prompt) put the rounds that prompt needs first: that head's rounds,
  from the prompt's prefill bucket up, then its smaller buckets, then the other heads; then batches of 2, 4, ...
  sequences decoding at width 1.

  Then what serving at up to max_num_seqs concurrent requests meets (`serving_rounds`): b = 2, 4, ... sequences
  (at most min(max_num_seqs, 32)) prefilling together and decoding at widths of 1, 2, 4 and 8 blocks, and the
  prefill buckets up to max_num_batched_tokens at each width. On SmolLM2-135M Q4_1, CPU, 2 cores,
  `warm_up(engine, max_num_seqs=16)` takes 99-117 s for 63 rounds, 111 shapes (before the serving rounds: 47-54 s
  for 24 rounds, 48 shapes; load average 1-3.4 from other work): an idle server serves in steady state ~2 minutes
  after its start; serve-lite (32 sequences) has 75 rounds."""
  heads = sorted(HEADS, key=lambda h: h != head)
  lens = [n for n in PROMPT_LENS if n + 2 < max_len]
  lens = sorted(lens, key=lambda n: next_power_of_2(n) < next_power_of_2(prompt_len))
  rounds = [(1, n, h) for h in heads for n in lens] if head else [(1, n, h) for n in lens for h in heads]
  batches = batch_sizes(max_num_seqs)
  rounds += [(b, BATCH_PROMPT_LEN, h) for b in batches for h in heads]
  return rounds + serving_rounds(max_len, batches, heads, max_num_batched_tokens)


def batch_sizes(max_num_seqs: int) -> list[int]:
  """2, 4, ... up to min(max_num_seqs, 32)."""
  return [1 << k for k in range(1, 6) if 1 << k <= min(max_num_seqs, 32)]


def serving_rounds(max_len: int, batches: list[int], heads: list[str], max_num_batched_tokens: int) -> list[tuple]:
  """Rounds of b prompts of one length for each batch size b: first each width's prompt length of PROMPT_LENS (the
  b prompts prefill together, in chunks of max_num_batched_tokens when more, then decode at that width), then, for
  each width, a prompt length in it whose b prompts land in each token bucket (16 up to max_num_batched_tokens'
  bucket) not met yet at that width, with the fewest prompts that get there. Every head for each round: a head jit
  is keyed by its token and sampled rows. Prompts must fit max_len with their two tokens."""
  lens = [n for n in PROMPT_LENS if n + 2 < max_len]
  rounds, met = [], set()  # met: (token bucket, width) of the layer jits the rounds capture
  for n in lens:  # what the one-sequence rounds capture
    met |= {(next_power_of_2(n), width_of(n)), (1, width_of(n + 1))}
  for b in batches:
    for n in lens:
      if n != BATCH_PROMPT_LEN:  # those rounds come earlier
        rounds += [(b, n, h) for h in heads]
      met.add((b, width_of(n + 1)))  # decode
      if b * n <= max_num_batched_tokens:
        met.add((next_power_of_2(b * n), width_of(n)))  # the prefill, in one step
  widths = sorted({width_of(n) for n in lens})
  buckets = [1 << k for k in range(4, next_power_of_2(max_num_batched_tokens).bit_length())]
  for w in widths:
    shortest, longest = (1 if w == 1 else w * BLOCK_SIZE // 2 + 1), min(w * BLOCK_SIZE - 1, max_len - 3)
    for bucket in buckets:
      if (bucket, w) in met:
        continue
      for b in batches:
        n = min(longest, bucket // b, max_num_batched_tokens // b)
        if n >= shortest and b * n > bucket // 2:
          rounds += [(b, n, h) for h in heads]
          met.add((bucket, w))
          break
  return rounds


def first_prompt_len(engine) -> int:
  """Tokens of FIRST_MESSAGE in the model's chat template (0 for a model without one)."""
  try:
    return len(engine.apply_chat_template([{"role": "user", "content": FIRST_MESSAGE}], add_generation_prompt=True))
  except ValueError:  # no chat template (ConfigError), or one that refuses the message
    return 0


def head_params(params) -> dict:
  """SamplingParams per head for two-token warm-up requests, built from `params` (penalties and all)."""
  base = dataclasses.replace(params, max_tokens=2, ignore_eos=True, stop=[], stop_token_ids=[], seed=0)
  sampled = dataclasses.replace(base, temperature=base.temperature or 0.7, top_k=0, top_p=1.0)
  greedy = dataclasses.replace(base, temperature=0.0)
  top_p = dataclasses.replace(sampled, top_p=0.95)
  return {"greedy": greedy, "sample": sampled, "top_p": top_p}


def round_prompts(first: int, num_seqs: int, prompt_len: int, vocab: int) -> list[list[int]]:
  """Prompts number first, first + 1, ... of a warm-up, `prompt_len` ids each; each starts with its own number, so
  no two share a block and no prefix-cache hit shrinks a prefill (while fewer prompts than the vocabulary ran)."""
  return [[(n + 7919 * j) % vocab for j in range(prompt_len)] for n in range(first, first + num_seqs)]


def warm_up(engine, max_num_seqs: int = 1, on_round: Callable[[int, int], None] | None = None) -> int:
  """Run the plan on the engine before any other request; returns the number of rounds."""
  rounds = warmup_plan(engine.max_model_len, max_num_seqs, max_num_batched_tokens=engine.config.max_num_batched_tokens)
  vocab = engine.model_config.vocab_size
  params = head_params(engine.default_params)
  first = 0
  for i, (num_seqs, prompt_len, head) in enumerate(rounds):
    for prompt in round_prompts(first, num_seqs, prompt_len, vocab):
      engine.add_request(prompt, params[head])
    first += num_seqs
    while engine.has_unfinished_requests():
      engine.step()
    if on_round:
      on_round(i + 1, len(rounds))
  return len(rounds)


class BackgroundWarmUp:
  """Runs the warm-up plan through an EngineLoop (the only thread that steps the engine), one round at a time, from a
  thread of its own. `pause` aborts the round in flight and holds the next one (a reply is coming); `resume` goes on,
  redoing the aborted round; `stop` ends it. The rounds for `params` and a prompt of `prompt_len` come first."""

  def __init__(self, loop, params, prompt_len: int = 0, max_num_seqs: int = 1) -> None:
    engine = loop.engine
    self.loop, self.vocab = loop, engine.model_config.vocab_size
    budget = engine.config.max_num_batched_tokens
    self.rounds = warmup_plan(engine.max_model_len, max_num_seqs, head_of(params), prompt_len, budget)
    self.params = head_params(params)
    self.done = 0
    self.elapsed_s: float | None = None  # from start() to the last round's end, once the plan completed
    self._started = 0.0
    self._first = 0  # the next warm-up prompt's number
    self._lock = threading.Lock()  # orders submits against pause: no warm-up request is queued after a pause
    self._running = threading.Event()
    self._running.set()
    self._stopped = False
    self._streams: list = []
    self._thread = threading.Thread(target=self._run, name="tinyvllm-warmup", daemon=True)

  @property
  def finished(self) -> bool:
    return self.done == len(self.rounds)

  @property
  def paused(self) -> bool:
    return not self._running.is_set()

  @property
  def pending(self) -> bool:
    """Whether a round's requests are in the engine loop now."""
    return bool(self._streams)

  def progress(self) -> str | None:
    """A line for the prompt's toolbar while rounds remain, else None."""
    if self.finished or self._stopped:
      return None
    return f"warming up {self.done}/{len(self.rounds)}"

  def start(self) -> BackgroundWarmUp:
    self._started = time.perf_counter()
    self._thread.start()
    return self

  def pause(self) -> None:
    with self._lock:
      self._running.clear()
      self._abort_streams()

  def resume(self) -> None:
    self._running.set()

  def stop(self) -> None:
    with self._lock:
      self._stopped = True
      self._abort_streams()
    self._running.set()

  def join(self, timeout: float | None = None) -> None:
    self._thread.join(timeout)

  def _abort_streams(self) -> None:
    for stream in self._streams:
      self.loop.abort(stream.request_id)

  def _submit(self, num_seqs: int, prompt_len: int, head: str) -> list | None:
    """The round's streams, or None when paused or stopped meanwhile."""
    with self._lock:
      if self._stopped or not self._running.is_set():
        return None
      prompts = round_prompts(self._first, num_seqs, prompt_len, self.vocab)
      self._first += num_seqs
      self._streams = [self.loop.submit(prompt, self.params[head]) for prompt in prompts]
      return self._streams

  def _run(self) -> None:
    while self.done < len(self.rounds) and not self._stopped:
      self._running.wait()
      streams = self._submit(*self.rounds[self.done])
      if streams is None:
        continue
      reasons = [stream.result().finish_reason for stream in streams]
      with self._lock:
        self._streams = []
      if "abort" not in reasons:  # done (or failed: a failed round is not retried)
        self.done += 1
    if self.finished:
      self.elapsed_s = time.perf_counter() - self._started
