"""Sampling penalties and logit bias applied to the logits on the device, at each row's listed tokens only (a dense
[rows, vocab] mask would cost a vocab-sized upload per row per step)."""

from tinygrad import Tensor, dtypes
from tinygrad.uop.ops import KernelInfo, UOp


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
  return store.sink(arg=KernelInfo(name="penalize", opts_to_apply=()))


def apply_penalties(
  logits: Tensor, token_ids: Tensor, counts: Tensor, num_tokens: Tensor, penalties: Tensor, biases: Tensor
) -> Tensor:
  """logits [S, V]; per row: token_ids, counts and biases [S, L], num_tokens [S], penalties [S, 3] (repetition,
  frequency, presence)."""
  return logits.custom_kernel(token_ids, counts, num_tokens, penalties, biases, fxn=_penalize)[0]
