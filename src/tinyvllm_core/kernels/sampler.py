"""The batched sampler on the device: grammar masks, logprobs, top-k / top-p / min-p and Gumbel-max sampling."""

import numpy as np
from tinygrad import Tensor, dtypes

NUM_LOGPROBS = 20  # top logprobs computed when any row asks (OpenAI's top_logprobs maximum): one head per shape


def hash_uniform(counters: Tensor, seeds: Tensor) -> Tensor:
  """Counter-based hash -> uniform (0,1) per (counter, seed) pair (broadcast): reproducible, independent of batching,
  one kernel per shape (tinygrad's rand compiles one per call)."""
  x = counters.cast(dtypes.uint32) * 0x9E3779B1 + seeds.cast(dtypes.uint32)
  for mul in (0x85EBCA6B, 0xC2B2AE35):
    x = (x ^ (x >> 16)) * mul
  x = x ^ (x >> 16)
  return ((x >> 8).cast(dtypes.float32) + 0.5) * (1.0 / (1 << 24))


def apply_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
  """logits [S, V]; bitmask [S, ceil(V / 32)] int32, bit t % 32 of word t // 32 set when token t is allowed (the
  layout llguidance fills). Unconstrained rows have every bit set."""
  S, V = logits.shape
  bits = Tensor.arange(32, dtype=dtypes.uint32).reshape(1, 1, 32)
  words = bitmask.bitcast(dtypes.uint32).reshape(S, -1, 1)
  allowed = ((words >> bits) & 1).reshape(S, -1)[:, :V]
  return (allowed == 1).where(logits, float("-inf"))


def top_logprobs(logits: Tensor, temperature: Tensor, next_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
  """The log-probabilities of the distribution sampled from (after penalties and masks, at the row's temperature;
  greedy rows at 1): of each row's chosen token [S], and the NUM_LOGPROBS largest [S, k] with their token ids."""
  scale = (temperature > 0).where(temperature, 1.0).reshape(-1, 1)
  logprobs = (logits / scale).log_softmax(-1)
  chosen = logprobs.gather(-1, next_ids.reshape(-1, 1)).reshape(-1)
  values, indices = logprobs.topk(NUM_LOGPROBS)
  return chosen, values, indices.cast(dtypes.int32)


def _threshold(probs: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, steps: int) -> Tensor:
  """Bisection for the stricter of two thresholds: the largest keeping >= top_k tokens, the largest keeping >= top_p
  of the mass; then at least min_p of the top probability."""
  pmax = probs.max(-1, keepdim=True)
  lo, hi = Tensor.zeros_like(pmax), pmax
  k, p = top_k.reshape(-1, 1), top_p.reshape(-1, 1)
  for _ in range(steps):
    mid = (lo + hi) / 2
    kept = probs >= mid
    enough_tokens = (k > 0) & (kept.sum(-1, keepdim=True) >= k)
    enough_mass = (p < 1) & (kept.where(probs, 0).sum(-1, keepdim=True) >= p)
    ok = enough_tokens | enough_mass
    lo, hi = ok.where(mid, lo), ok.where(hi, mid)
  return lo.maximum(min_p.reshape(-1, 1) * pmax)


def sample(
  logits: Tensor,
  temperature: Tensor,
  top_k: Tensor,
  top_p: Tensor,
  min_p: Tensor,
  seeds: Tensor,
  filtered: bool = True,
  draft_ids: Tensor | None = None,
) -> Tensor:
  """Batched sampler on the device. logits [S, V]; per-row params [S]. Greedy rows have temperature 0.
  filtered=False skips the top-k/top-p search (no row uses them): the same tokens, ~8% of a sampled step less.
  draft_ids [S] (-1: none): speculative rejection sampling for a draft proposed with certainty (prompt lookup): keep
  it with its probability p, else sample from p without it; the output follows p exactly."""
  V = logits.shape[-1]
  probs = (logits / temperature.maximum(1e-5).reshape(-1, 1)).softmax(-1)
  kept = probs >= _threshold(probs, top_k, top_p, min_p, 16 if filtered else 0)
  counters = Tensor.arange(V + (draft_ids is not None), dtype=dtypes.uint32).reshape(1, -1)  # V: a draft's draw
  uniform = hash_uniform(counters, seeds.reshape(-1, 1))
  scores = probs.log() - (-uniform[:, :V].log()).log()  # Gumbel-max
  if draft_ids is None:
    sampled = kept.where(scores, float("-inf")).argmax(-1)
  else:
    is_draft = Tensor.arange(V).reshape(1, -1) == draft_ids.reshape(-1, 1)
    resampled = (kept & is_draft.logical_not()).where(scores, float("-inf")).argmax(-1)
    draft_prob = (kept & is_draft).where(probs, 0).sum(-1) / kept.where(probs, 0).sum(-1)
    sampled = (uniform[:, V] < draft_prob).where(draft_ids, resampled)
  return (temperature > 0).where(sampled, logits.argmax(-1))  # greedy rows take the argmax


def grammar_bitmask(sampled: list, num_rows: int, vocab_size: int) -> np.ndarray:
  """Allowed tokens per sampled row as llguidance's bitmask (32 tokens per int32); rows without a grammar allow all."""
  from llguidance.numpy import fill_next_token_bitmask

  bitmask = np.full((num_rows, -(-vocab_size // 32)), -1, np.int32)
  for row, seq in enumerate(sampled):
    if seq.matcher:
      fill_next_token_bitmask(seq.matcher, bitmask, row)
  return bitmask
