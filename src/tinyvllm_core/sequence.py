from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class Logprob:
  """The log-probability of a generated token, and the most likely tokens at its position (token id, logprob)."""

  token_id: int
  logprob: float
  top: list[tuple[int, float]]


class SequenceStatus(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
  request_id: str
  prompt_token_ids: list[int]
  sampling_params: SamplingParams
  arrival_index: int = 0
  output_token_ids: list[int] = field(default_factory=list)
  status: SequenceStatus = SequenceStatus.WAITING
  block_table: list[int] = field(default_factory=list)
  num_computed_tokens: int = 0  # tokens whose KV is in the cache
  num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
  num_preemptions: int = 0
  finish_reason: str | None = None
  matcher: object | None = None  # llguidance.LLMatcher of the request's grammar: which tokens may come next
  logprobs: list[Logprob] = field(default_factory=list)  # per output token, when the request asks
  spec_token_ids: list[int] = field(default_factory=list)  # this step's draft tokens, after the output

  @property
  def token_ids(self) -> list[int]:
    return self.prompt_token_ids + self.output_token_ids + self.spec_token_ids

  @property
  def num_tokens(self) -> int:  # drafts included: the scheduler gives a decoding sequence a row for each
    return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.spec_token_ids)

  @property
  def is_finished(self) -> bool:
    return self.status is SequenceStatus.FINISHED
