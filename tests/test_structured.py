"""Structured output (llguidance grammars as a per-row bitmask on the device), logprobs and logit_bias in the
batched sampler, against NumPy and llguidance's own mask application."""

import json

import jsonschema
import llguidance
import numpy as np
import pytest
from llguidance.numpy import apply_token_bitmask_inplace
from tinygrad import Tensor
from tinyvllm_core import SamplingParams
from tinyvllm_core.kernels.sampler import NUM_LOGPROBS, apply_bitmask, top_logprobs

PERSON = {
  "type": "object",
  "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "none"]},
    "address": {
      "type": "object",
      "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
      "required": ["city", "zip"],
      "additionalProperties": False,
    },
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
  },
  "required": ["name", "age", "pet", "address", "tags"],
  "additionalProperties": False,
}
TOPICS = ["a pilot", "a chef", "a child", "a painter", "a robot", "a farmer", "a doctor", "a poet", "a king", "a cat"]


def test_bitmask_kernel_matches_llguidance(device):
  rng = np.random.default_rng(0)
  vocab = 100  # not a multiple of 32: the last word's high bits lie past the vocabulary
  logits = rng.standard_normal((3, vocab)).astype(np.float32)
  bitmask = rng.integers(-(2**31), 2**31, (3, 4), dtype=np.int64).astype(np.int32)
  bitmask[1] = -1  # an unconstrained row
  want = logits.copy()
  apply_token_bitmask_inplace(want, bitmask)
  got = apply_bitmask(Tensor(logits, device=device), Tensor(bitmask, device=device)).numpy()
  np.testing.assert_array_equal(got, want)
  assert np.isinf(got[0]).sum() > 30 and (got[1] == logits[1]).all()


def test_top_logprobs_kernel_matches_numpy(device):
  rng = np.random.default_rng(1)
  logits = (rng.standard_normal((3, 300)) * 4).astype(np.float32)
  logits[2, 7:] = -np.inf  # masked: 7 allowed tokens, fewer than NUM_LOGPROBS
  temperature = np.array([0.0, 0.7, 1.0], np.float32)
  chosen_ids = np.array([logits[0].argmax(), 5, 3], np.int32)
  chosen, values, ids = (
    t.numpy() for t in top_logprobs(*(Tensor(a, device=device) for a in (logits, temperature, chosen_ids)))
  )
  for row, t in enumerate(temperature):
    scaled = logits[row].astype(np.float64) / (t if t > 0 else 1.0)
    want = scaled - scaled.max() - np.log(np.exp(scaled - scaled.max()).sum())
    np.testing.assert_allclose(chosen[row], want[chosen_ids[row]], rtol=1e-5, atol=1e-5)
    order = np.argsort(-want, kind="stable")[:NUM_LOGPROBS]
    finite = np.isfinite(want[order])
    np.testing.assert_allclose(values[row][finite], want[order][finite], rtol=1e-5, atol=1e-5)
    assert set(ids[row][finite]) == set(order[finite])


def _grammar(schema: dict) -> str:
  return llguidance.LLMatcher.grammar_from_json_schema(schema)


def test_json_schema_output_validates_batched(smollm2):
  """Ten prompts in one batch, greedy and sampled, constrained by a schema with nested objects, enums and arrays:
  every output parses and validates; an unconstrained row in the same batch gives its tokens alone."""
  engine = smollm2.engine
  grammar = _grammar(PERSON)
  prompts = [
    engine.apply_chat_template([{"role": "user", "content": f"Describe {t} as JSON."}], add_generation_prompt=True)
    for t in TOPICS
  ]
  params = [SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=120, grammar=grammar) for i in range(10)]
  plain = SamplingParams(temperature=0, max_tokens=12)
  alone = smollm2.generate(["The capital of France is"], plain)[0]
  outs = smollm2.generate([*prompts, "The capital of France is"], [*params, plain])
  for out in outs[:-1]:
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), PERSON)
  assert outs[-1].token_ids == alone.token_ids
  assert len({o.text for o in outs[:-1]}) > 5  # the prompts and seeds differ, the outputs too


def test_grammar_cut_by_max_tokens_says_length(smollm2):
  out = smollm2.generate(["Hi"], SamplingParams(temperature=0, max_tokens=3, grammar=_grammar(PERSON)))[0]
  assert out.finish_reason == "length" and out.text.startswith("{")


def test_bad_grammar_is_one_line_error(smollm2):
  with pytest.raises(ValueError, match="grammar: "):
    smollm2.engine.add_request("Hi", SamplingParams(grammar="start: ( unclosed"))


def test_logprobs_are_those_of_the_logits_sampled_from(smollm2):
  """Each step's chosen logprob and top-k equal log_softmax of that step's logits; rows that do not ask get None."""
  engine = smollm2.engine
  engine.add_request("The capital of France is", SamplingParams(temperature=0, max_tokens=4, logprobs=5))
  engine.add_request("Once upon a time", SamplingParams(temperature=0.7, seed=3, max_tokens=4, logprobs=0))
  engine.add_request("One, two,", SamplingParams(temperature=0, max_tokens=4))
  steps = 0
  while engine.has_unfinished_requests():
    outputs = engine.step()
    logits = engine.last_logits().astype(np.float64)
    for row, (out, t) in enumerate(zip(outputs, (1.0, 0.7, None))):
      if t is None:
        assert out.logprobs is None
        continue
      scaled = logits[row] / t
      want = scaled - scaled.max() - np.log(np.exp(scaled - scaled.max()).sum())
      entry = out.logprobs[-1]
      assert entry.token_id == out.delta_token_ids[0]
      np.testing.assert_allclose(entry.logprob, want[entry.token_id], atol=1e-4)
      assert len(entry.top) == (5 if row == 0 else 0)
      for token, value in entry.top:
        np.testing.assert_allclose(value, want[token], atol=1e-4)
      assert [tok for tok, _ in entry.top] == list(np.argsort(-want)[: len(entry.top)])
    steps += 1
  assert steps == 4


def test_logit_bias_moves_the_greedy_choice(smollm2):
  """-100 on the greedy token makes the runner-up win; +bias on a chosen token makes it win."""
  prompt = "The capital of France is"
  base = smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=3))[0]
  first, runner_up = base.logprobs[0].top[0][0], base.logprobs[0].top[1][0]
  banned = smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logit_bias={first: -100}))[0]
  assert banned.token_ids == [runner_up]
  forced = smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=2, logit_bias={42: 100}))[0]
  assert forced.token_ids == [42, 42]
  with pytest.raises(ValueError, match="logit_bias"):
    SamplingParams(logit_bias={1: 150})
