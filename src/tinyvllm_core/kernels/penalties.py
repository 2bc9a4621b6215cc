"""Sampling penalties and logit bias applied to the logits on the device, at each row's listed tokens only (a dense
[rows, vocab] mask would cost a vocab-sized upload per row per step)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.uop.ops import KernelInfo, UOp

from .opts import heuristic_on_gpu

if TYPE_CHECKING:
  from ..sampling import SamplingParams

PENALTY_INPUTS = ("penalty_token_ids", "penalty_counts", "penalty_num_tokens", "penalties", "penalty_biases")


def _penalize(logits: UOp, token_ids: UOp, counts: UOp, num_tokens: UOp, penalties: UOp, biases: UOp) -> UOp:
  """In place, at each row's listed (distinct) tokens: the repetition penalty (a positive logit divided by it, a
  negative one multiplied), then frequency x count and presence subtracted, and the token's bias added. Rows list
  num_tokens entries; the rest is padding that writes nothing."""
  row, i = UOp.range(token_ids.shape[0], 0), UOp.range(token_ids.shape[1], 1)
  token = token_ids[row, i].cast(dtypes.weakint)
  logit, count = logits[row, token].load(), counts[row, i].load().cast(dtypes.float32)
  repetition, frequency, presence = (penalties[row, j].load() for j in range(3))
  seen = count >= 0  # in the prompt or output: count -1 lists a token only for its bias
  penalized = seen.where((logit > 0).where(logit / repetition, logit * repetition), logit)
  penalized = penalized - frequency * count.maximum(0.0) - (count > 0).where(presence, 0.0) + biases[row, i].load()
  listed = token.valid(i < num_tokens[row].load().cast(dtypes.weakint))
  store = logits.index(row, listed).store(penalized).end(row, i)
  opts = heuristic_on_gpu(())
  return store.sink(arg=KernelInfo(name="penalize", opts_to_apply=opts))


def apply_penalties(
  logits: Tensor, token_ids: Tensor, counts: Tensor, num_tokens: Tensor, penalties: Tensor, biases: Tensor
) -> Tensor:
  """logits [S, V]; per row: token_ids, counts and biases [S, L], num_tokens [S], penalties [S, 3] (repetition,
  frequency, presence)."""
  return logits.custom_kernel(token_ids, counts, num_tokens, penalties, biases, fxn=_penalize)[0]


def penalty_entries(
  params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The distinct tokens a row's penalties (repetition: prompt and output; presence, frequency: output) and logit bias
  touch, their output counts (-1: listed for its bias alone) and biases."""
  output_tokens, output_counts = np.unique(np.asarray(output_ids, np.int32), return_counts=True)
  biased = np.asarray(list(params.logit_bias), np.int32)
  repeated = np.asarray(prompt_ids if params.repetition_penalty != 1 else [], np.int32)
  tokens = np.union1d(np.union1d(output_tokens, biased), repeated)
  counts, biases = np.full(len(tokens), -1, np.int32), np.zeros(len(tokens), np.float32)
  counts[np.searchsorted(tokens, repeated)] = 0
  counts[np.searchsorted(tokens, output_tokens)] = output_counts
  biases[np.searchsorted(tokens, biased)] = list(params.logit_bias.values())
  return tokens, counts, biases


def penalty_arrays(entries: dict, params: list[SamplingParams], num_rows: int, width: int) -> dict[str, np.ndarray]:
  """Per sampled row: its distinct penalized tokens, their output counts, how many, and (repetition, frequency,
  presence); rows without penalties list nothing."""
  a = {
    "penalty_token_ids": np.zeros((num_rows, width), np.int32),
    "penalty_counts": np.zeros((num_rows, width), np.int32),
    "penalty_num_tokens": np.zeros(num_rows, np.int32),
    "penalties": np.tile(np.array([1.0, 0.0, 0.0], np.float32), (num_rows, 1)),
    "penalty_biases": np.zeros((num_rows, width), np.float32),
  }
  for row, (token_ids, counts, biases) in entries.items():
    p = params[row]
    a["penalty_token_ids"][row, : len(token_ids)] = token_ids
    a["penalty_counts"][row, : len(counts)] = counts
    a["penalty_biases"][row, : len(biases)] = biases
    a["penalty_num_tokens"][row] = len(token_ids)
    a["penalties"][row] = (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
  return a
