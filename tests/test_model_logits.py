"""The tinygrad forward pass (paged KV, chunked prefill, decode) against an independent NumPy reference."""

import numpy as np
import pytest
from numpy_ref import reference_logits
from tinyvllm_core import LLMEngine, SamplingParams


def _engine_logits(path, prompt, num_decode, device="CPU", **kw):
  """(engine, logits of the last prompt token and of each decode step read from the sampled rows, all tokens)."""
  engine = LLMEngine(path, device=device, num_blocks=32, block_size=4, **kw)
  engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=num_decode + 1, ignore_eos=True))
  logits, tokens = [], list(prompt)
  while engine.has_unfinished_requests():
    for out in engine.step():
      logits.append(engine.last_logits()[0])
      tokens.append(out.delta_token_ids[0])
  return engine, np.stack(logits), tokens


# float16 (CL's and every GPU's "auto"): weights, activations and KV rounded to 11 significant bits (unit roundoff
# 2**-11 = 4.9e-4). Measured max |engine - reference| / max |reference| over these five checkpoints: 1.0e-3 to 2.0e-3
# on CPU and 7.9e-4 to 1.8e-3 on CL (pocl, which computes half in float); the bound, 5e-3, is 2.5x the worst of them
# (about ten float16 roundoffs of the largest logit). Chunking does not change the rounding: float16 runs unchunked.
@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2", "llama_tied_bf16_sharded", "qwen3_fp16"])
@pytest.mark.parametrize("dtype,chunk", [("float32", 512), ("float32", 5), ("float16", 512)])
def test_logits_match_numpy_reference(checkpoints, device, name, dtype, chunk):
  path, weights, config = checkpoints[name]
  prompt = [7, 100, 42, 9, 250, 3, 77, 12, 5, 61, 8, 199, 33]
  _, got, tokens = _engine_logits(path, prompt, num_decode=4, device=device, dtype=dtype, max_num_batched_tokens=chunk)
  ref = reference_logits(weights, config, tokens[:-1])[len(prompt) - 1 :]
  assert got.shape == ref.shape
  if dtype == "float16":
    assert np.abs(got - ref).max() < 5e-3 * np.abs(ref).max()
  else:
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_beam_search_keeps_greedy_tokens(checkpoints):
  """beam > 0 captures each jit under tinygrad's BEAM search: other kernel opts, the same model."""
  prompt = [7, 100, 42, 9, 250]
  _, _, plain = _engine_logits(checkpoints["llama"][0], prompt, num_decode=3)
  _, _, searched = _engine_logits(checkpoints["llama"][0], prompt, num_decode=3, beam=1)
  assert searched == plain


def test_bad_engine_settings(checkpoints):
  from tinyvllm_core import ConfigError

  for kw in (
    dict(block_size=0),
    dict(kv_cache_gb=0),
    dict(dtype="int4"),
    dict(max_num_seqs=0),
    dict(quantize="int4"),
    dict(beam=-1),
  ):
    with pytest.raises(ConfigError):
      LLMEngine(checkpoints["llama"][0], device="CPU", **kw)


def test_kernels_split_over_threads_match_reference(checkpoints, monkeypatch):
  """With 2 CPU threads the big kernels are split in two and the runner runs the parts on two threads at once."""
  from tinygrad.helpers import NUM_CPU_THREADS

  monkeypatch.setattr(NUM_CPU_THREADS, "value", 2)
  path, weights, config = checkpoints["qwen3"]
  prompt = [(i * 37) % 200 + 3 for i in range(40)]
  engine, got, tokens = _engine_logits(path, prompt, num_decode=3)
  assert any(k.num_threads == 2 for replay in engine.runner.direct.values() for k in replay.kernels)
  ref = reference_logits(weights, config, tokens[:-1])[len(prompt) - 1 :]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
