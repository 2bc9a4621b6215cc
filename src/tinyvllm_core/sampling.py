from __future__ import annotations

from dataclasses import dataclass, field


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
  logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI: -100..100)
  logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely (0..20)
  grammar: str | None = None  # an llguidance grammar (JSON schema, regex or Lark) the output must match

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
      (all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
      (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
    ]
    if failed := [msg for ok, msg in checks if not ok]:
      raise ValueError(f"SamplingParams: {failed[0]}")

  @property
  def penalized(self) -> bool:
    penalties = self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
    return penalties or bool(self.logit_bias)

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
