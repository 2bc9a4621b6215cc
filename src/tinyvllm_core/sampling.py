from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tinygrad import Tensor, dtypes


# llama.cpp's sampling defaults, for models that ship no generation_config (every GGUF file)
LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
GENERATION_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class SamplingParams:
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # 0 or -1: off
  min_p: float = 0.0
  repetition_penalty: float = 1.0  # HF / vLLM: over prompt and output tokens; > 1 discourages repeats
  presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already in the output
  frequency_penalty: float = 0.0  # OpenAI: subtracted once per occurrence in the output
  seed: int | None = None
  max_tokens: int = 256
  stop: list[str] = field(default_factory=list)
  stop_token_ids: list[int] = field(default_factory=list)
  ignore_eos: bool = False

  def __post_init__(self):
    if isinstance(self.stop, str):
      self.stop = [self.stop]
    checks = [
      (self.temperature >= 0, "temperature must be >= 0"),
      (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
      (self.top_k >= -1, "top_k must be -1, 0 (off) or a positive count"),
      (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
      (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
      (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
      (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
      (self.max_tokens >= 1, "max_tokens must be >= 1"),
    ]
    if failed := [msg for ok, msg in checks if not ok]:
      raise ValueError(f"SamplingParams: {failed[0]}")

  @property
  def penalized(self) -> bool:
    return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

  @staticmethod
  def from_generation_config(cfg: dict) -> tuple[SamplingParams, str]:
    """The model's defaults and where they come from: generation_config.json when it sets any sampling field
    (do_sample false = greedy), else llama.cpp's defaults."""
    fields = {k: cfg[k] for k in GENERATION_FIELDS if cfg.get(k) is not None}
    if cfg.get("do_sample") is False:
      return SamplingParams(**fields | {"temperature": 0.0}), "generation_config.json (do_sample false: greedy)"
    if fields or cfg.get("do_sample"):
      return SamplingParams(**fields), "generation_config.json"
    return SamplingParams(**LLAMA_CPP_DEFAULTS), "llama.cpp's defaults (the model has no generation_config)"


def penalty_entries(
  params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
  """The distinct tokens a row's penalties touch and how often each occurs in the output: the repetition penalty
  reaches prompt and output tokens, presence and frequency only output tokens."""
  output_tokens, output_counts = np.unique(np.asarray(output_ids, np.int32), return_counts=True)
  tokens = output_tokens
  if params.repetition_penalty != 1:
    tokens = np.union1d(np.asarray(prompt_ids, np.int32), output_tokens)
  counts = np.zeros(len(tokens), np.int32)
  counts[np.searchsorted(tokens, output_tokens)] = output_counts
  return tokens, counts


def hash_uniform(counters: Tensor, seeds: Tensor) -> Tensor:
  """Counter-based hash -> uniform (0,1) per (counter, seed) pair (broadcast): reproducible, independent of batching,
  one kernel per shape (tinygrad's rand compiles one per call)."""
  x = counters.cast(dtypes.uint32) * 0x9E3779B1 + seeds.cast(dtypes.uint32)
  for mul in (0x85EBCA6B, 0xC2B2AE35):
    x = (x ^ (x >> 16)) * mul
  x = x ^ (x >> 16)
  return ((x >> 8).cast(dtypes.float32) + 0.5) * (1.0 / (1 << 24))


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
) -> Tensor:
  """Batched sampler on the device. logits [S, V]; per-row params [S]. Greedy rows have temperature 0.
  filtered=False skips the top-k/top-p search (no row uses them): the same tokens, ~8% of a sampled step less."""
  probs = (logits / temperature.maximum(1e-5).reshape(-1, 1)).softmax(-1)
  threshold = _threshold(probs, top_k, top_p, min_p, 16 if filtered else 0)
  tokens = Tensor.arange(logits.shape[-1], dtype=dtypes.uint32).reshape(1, -1)
  gumbel = -(-hash_uniform(tokens, seeds.reshape(-1, 1)).log()).log()
  sampled = (probs >= threshold).where(probs.log() + gumbel, float("-inf")).argmax(-1)
  return (temperature > 0).where(sampled, logits.argmax(-1))  # greedy rows take the argmax
