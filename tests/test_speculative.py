"""Speculative decoding with prompt lookup: n-gram drafts ride in the flat batch as extra rows of their sequence and
are verified in one step. Greedy output is the same as without drafts (batched, preempted); at temperature > 0 the
rejection sampler's output follows the target distribution exactly."""

import numpy as np
import pytest
from tinygrad import Tensor
from tinyvllm_core import LLM, SamplingParams
from tinyvllm_core.engine import ngram_drafts, num_accepted
from tinyvllm_core.kernels.sampler import sample


def test_ngram_drafts_follow_the_latest_longest_match():
  assert ngram_drafts([1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # latest 3-gram match, not the first
  assert ngram_drafts([5, 6, 7, 8, 6, 7], 3) == [8, 6, 7]
  assert ngram_drafts([5, 6, 7, 8, 4, 6, 7], 5) == [8, 4, 6, 7]  # a 2-gram; the drafts stop at the end
  assert ngram_drafts([5, 6, 7, 8, 4, 7], 5) == []  # a 1-gram match is no draft
  assert ngram_drafts([1, 2, 3], 4) == [] and ngram_drafts([1], 4) == []


def test_num_accepted_keeps_tokens_up_to_the_first_mismatch():
  assert num_accepted([], [4]) == 1
  assert num_accepted([4, 5, 6], [4, 5, 6, 7]) == 4  # every draft kept, and the bonus token
  assert num_accepted([4, 5, 6], [4, 9, 6, 7]) == 2  # the row that disagrees gives the corrected token
  assert num_accepted([4, 5, 6, 8], [4, 5]) == 2  # drafts past the chunk (the token budget cut it) never ran


@pytest.mark.parametrize("draft, top_p", [(2, 1.0), (5, 1.0), (0, 0.8), (7, 0.8)])
def test_rejection_sampler_follows_the_target_distribution(device, draft, top_p):
  """Many seeds of one row: with a draft (likely, unlikely, or outside the top-p set) the sampled counts match the
  filtered softmax within 4.5 standard deviations per token, as without a draft."""
  logits = np.array([2.0, 0.5, 1.5, -1.0, 0.0, -0.5, 1.0, -3.0], np.float32)
  n, temperature = 20000, 0.9
  probs = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
  order = np.argsort(-probs)
  keep = order[: np.searchsorted(np.cumsum(probs[order]), top_p) + 1]
  target = np.zeros_like(probs)
  target[keep] = probs[keep] / probs[keep].sum()
  rows = [np.tile(a, (n, 1)) if a.ndim else np.full(n, a) for a in (logits, np.float32(temperature))]
  args = [Tensor(a, device=device) for a in (*rows, np.zeros(n, np.int32), np.full(n, top_p, np.float32))]
  seeds = Tensor(np.arange(n, dtype=np.uint32) * 7919 + 13, device=device)
  min_p = Tensor(np.zeros(n, np.float32), device=device)
  drafts = Tensor(np.full(n, draft, np.int32), device=device)
  for draft_ids in (drafts, None):
    out = sample(*args[:2], args[2], args[3], min_p, seeds, top_p < 1, draft_ids).numpy()
    counts = np.bincount(out, minlength=len(logits)) / n
    bound = 4.5 * np.sqrt(target * (1 - target) / n) + 1e-9
    assert (np.abs(counts - target) <= bound).all(), (draft, counts, target)


def _generate(llm: LLM, requests):
  return [o.token_ids for o in llm.generate([p for p, _ in requests], [sp for _, sp in requests])]


CODE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"


def test_greedy_output_is_the_same_with_drafts_batched_and_preempted(smollm2_path):
  """Prompts whose answers repeat text from the prompt (drafts are accepted) and others, greedy and sampled rows in
  one batch, a KV pool small enough to preempt: every greedy row gives the tokens it gives without speculation."""
  plain = LLM(smollm2_path, device="CPU", dtype="float32", num_blocks=14, block_size=16, quantize=None)
  spec = LLM(smollm2_path, device="CPU", dtype="float32", num_blocks=14, block_size=16, quantize=None,
             num_speculative_tokens=4)  # fmt: skip
  chat = spec.engine.apply_chat_template(
    [{"role": "user", "content": "Repeat exactly:\n" + CODE}], tokenize=False, add_generation_prompt=True
  )
  greedy = SamplingParams(temperature=0, max_tokens=48)
  requests = [(chat, greedy), ("1, 2, 3, 4, 5, 6, 7,", greedy), ("The capital of France is", greedy)]
  requests.append(("Once upon a time", SamplingParams(temperature=0.8, seed=5, max_tokens=48)))
  preemptions = []
  schedule = spec.engine.scheduler._preempt
  spec.engine.scheduler._preempt = lambda seq: preemptions.append(seq) or schedule(seq)
  want, got = _generate(plain, requests[:3]), _generate(spec, requests)
  assert got[:3] == want
  stats = spec.engine.stats()
  assert stats["num_accepted_drafts"] > 20 and stats["num_draft_tokens"] >= stats["num_accepted_drafts"]
  assert preemptions, "the pool was meant to be too small for all four sequences at once"
  assert stats["num_free_blocks"] == stats["num_total_blocks"]
