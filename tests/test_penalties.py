"""Repetition (HF / vLLM), presence and frequency (OpenAI) penalties, applied on the device inside the batched
sampler, against NumPy; the sampling defaults a model's files select."""

import numpy as np
import pytest
from numpy_ref import reference_logits
from tinygrad import Tensor
from tinyvllm_core import LLMEngine, SamplingParams
from tinyvllm_core.kernels.penalties import apply_penalties
from tinyvllm_core.kernels.penalties import penalty_entries


def numpy_penalties(logits: np.ndarray, params: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
  """The textbook definitions, token by token: HF's repetition penalty over prompt + output, then OpenAI's
  frequency x count and presence over the output; then OpenAI's logit_bias added."""
  out = logits.astype(np.float64).copy()
  for token in set(prompt) | set(output):
    x = out[token]
    out[token] = x / params.repetition_penalty if x > 0 else x * params.repetition_penalty
  for token in set(output):
    count = output.count(token)
    out[token] -= params.frequency_penalty * count + params.presence_penalty
  for token, bias in params.logit_bias.items():
    out[token] += bias
  return out


ROWS = [  # (params, prompt, output): several settings in one batch, one row without penalties
  (SamplingParams(repetition_penalty=1.3, logit_bias={9: 2.5, 20: -1.0}), [3, 5, 5, 9], [9, 11, 11, 2]),
  (SamplingParams(), [1, 2, 3], [4]),
  (SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4), [6, 7], [7, 7, 8, 30, 7]),
  (SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.5, presence_penalty=2.0), [40, 41], [41, 12, 12]),
  (SamplingParams(presence_penalty=1.0), [0, 49], []),
  (SamplingParams(logit_bias={3: 5.0, 44: -100.0}), [3, 44], [44, 1]),  # bias alone: no penalty reaches 44 or 1
]


def test_penalty_kernel_matches_numpy(device):
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((len(ROWS), 50)) * 3).astype(np.float32)
  entries = [penalty_entries(p, prompt, output) for p, prompt, output in ROWS]
  width = 8
  token_ids, counts = np.zeros((len(ROWS), width), np.int32), np.zeros((len(ROWS), width), np.int32)
  num_tokens, penalties = np.zeros(len(ROWS), np.int32), np.zeros((len(ROWS), 3), np.float32)
  biases = np.zeros((len(ROWS), width), np.float32)
  for row, ((ids, cnt, bias), (p, _, _)) in enumerate(zip(entries, ROWS)):
    if p.penalized:
      token_ids[row, : len(ids)], counts[row, : len(cnt)], num_tokens[row] = ids, cnt, len(ids)
      biases[row, : len(bias)] = bias
    penalties[row] = (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
  inputs = [Tensor(a, device=device) for a in (token_ids, counts, num_tokens, penalties, biases)]
  got = apply_penalties(Tensor(logits, device=device).contiguous(), *inputs).numpy()
  for row, (p, prompt, output) in enumerate(ROWS):
    want = numpy_penalties(logits[row], p, prompt, output)
    np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-6)
    probs = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
    got_probs = np.exp(got[row] - got[row].max()) / np.exp(got[row] - got[row].max()).sum()
    np.testing.assert_allclose(got_probs, probs, rtol=1e-5, atol=1e-7)
    assert got[row].argmax() == want.argmax()
  assert (got[1] == logits[1]).all()  # no penalties: untouched


@pytest.fixture(scope="module")
def engine(checkpoints, device):
  return LLMEngine(checkpoints["llama"][0], device=device, dtype="float32", num_blocks=64, block_size=4)


PROMPT = [5, 17, 42, 9, 100, 3, 7, 5, 5]


def test_engine_logits_are_the_penalized_reference(engine, checkpoints):
  """Greedy with penalties: every step's logits equal the NumPy model's logits with the penalties applied over the
  tokens so far, and the chosen token is their argmax."""
  _, weights, config = checkpoints["llama"]
  params = SamplingParams(
    temperature=0,
    repetition_penalty=1.5,
    frequency_penalty=0.5,
    presence_penalty=0.3,
    logit_bias={17: 3.0, 60: -2.0, 200: 1.5},
    max_tokens=6,
    ignore_eos=True,
  )
  engine.add_request(PROMPT, params)
  output = []
  while engine.has_unfinished_requests():
    for out in engine.step():
      raw = reference_logits(weights, config, PROMPT + output)[-1]
      ref = numpy_penalties(raw, params, PROMPT, output)
      got = engine.last_logits()[0]
      tolerance = 1e-4 * np.abs(ref).max()
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=tolerance)
      assert np.abs(ref - raw).max() > 100 * tolerance  # the penalties move the logits far past the tolerance
      assert out.delta_token_ids[0] == ref.argmax()
      output.append(out.delta_token_ids[0])


def _run(engine, requests):
  ids = [engine.add_request(prompt, params) for prompt, params in requests]
  tokens = {i: [] for i in ids}
  while engine.has_unfinished_requests():
    for out in engine.step():
      tokens[out.request_id] += out.delta_token_ids
  return [tokens[i] for i in ids]


def test_penalties_same_batched_and_alone(engine):
  greedy = SamplingParams(
    temperature=0, repetition_penalty=1.8, presence_penalty=0.5, logit_bias={3: 2.0}, max_tokens=10, ignore_eos=True
  )
  sampled = SamplingParams(temperature=0.9, frequency_penalty=1.0, seed=4, max_tokens=10, ignore_eos=True)
  plain = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
  alone = [_run(engine, [(PROMPT, greedy)])[0], _run(engine, [([8, 8, 8, 1], sampled)])[0]]
  batched = _run(engine, [([1, 2, 3], plain), (PROMPT, greedy), ([8, 8, 8, 1], sampled)])
  assert batched[1:] == alone


def test_bad_penalties_are_one_line_errors():
  for kw in (dict(repetition_penalty=0), dict(presence_penalty=2.5), dict(frequency_penalty=-3)):
    with pytest.raises(ValueError, match="SamplingParams: .*penalty"):
      SamplingParams(**kw)


def test_defaults_come_from_generation_config_else_llama_cpp():
  params, source = SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.6, "top_p": 0.9})
  assert params.temperature == 0 and "do_sample false" in source
  params, source = SamplingParams.from_generation_config(
    {"do_sample": True, "temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1}
  )
  assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (0.6, 20, 1.0, 1.1)
  assert source == "generation_config.json"
  for cfg in ({}, {"bos_token_id": 1, "eos_token_id": 2}):  # every GGUF; a config that sets no sampling field
    params, source = SamplingParams.from_generation_config(cfg)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.8, 40, 0.95, 0.05)
    assert "llama.cpp" in source


def test_gguf_model_gets_llama_cpp_defaults(smollm2):
  engine = smollm2.engine
  assert "llama.cpp" in engine.default_params_source
  assert (engine.default_params.temperature, engine.default_params.top_k) == (0.8, 40)
