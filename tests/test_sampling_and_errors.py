"""Sampler behaviour and clear errors for bad input; the engine keeps serving after each."""

import json, shutil
import pytest
from tinyvllm_core import LLM, LLMEngine, SamplingParams, ConfigError


@pytest.fixture(scope="module")
def llm(checkpoints):
  """CPU only: the sampler itself runs on every device below; these engine-level checks would add minutes on CL."""
  return LLM(checkpoints["llama"][0], device="CPU", num_blocks=64, block_size=4)


PROMPT = [5, 17, 42, 9, 100, 3, 7]


def test_seed_reproducible_and_independent_of_batch(llm):
  p = SamplingParams(temperature=1.0, max_tokens=12, seed=123, ignore_eos=True)
  alone = llm.generate([PROMPT], p)[0].token_ids
  batched = llm.generate(
    [PROMPT, [9, 9, 9], PROMPT], [p, SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True), p]
  )
  assert batched[0].token_ids == alone == batched[2].token_ids
  other = llm.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True))[0].token_ids
  assert other != alone


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
  greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids
  for p in (
    SamplingParams(temperature=1.5, top_k=1, max_tokens=8, seed=1, ignore_eos=True),
    SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=8, seed=2, ignore_eos=True),
    SamplingParams(temperature=1.5, min_p=0.9999, max_tokens=8, seed=3, ignore_eos=True),
  ):
    assert llm.generate([PROMPT], p)[0].token_ids == greedy


def test_top_k_limits_choices(llm):
  engine = llm.engine
  engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=1))
  engine.step()
  top3 = set(engine.last_logits()[0].argsort()[-3:].tolist())
  firsts = {
    llm.generate([PROMPT], SamplingParams(temperature=5.0, top_k=3, max_tokens=1, seed=s))[0].token_ids[0]
    for s in range(30)
  }
  assert firsts <= top3 and len(firsts) > 1


def test_stop_token_ids_stop_strings_and_eos(llm):
  greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
  out = llm.generate(
    [PROMPT], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[greedy.token_ids[2]], ignore_eos=True)
  )[0]
  assert out.token_ids == greedy.token_ids[:3] and out.finish_reason == "stop"
  tok = llm.engine.tokenizer
  text = tok.decode(greedy.token_ids)
  stop = text[len(text) // 2 : len(text) // 2 + 2]
  if stop.strip():
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and stop not in out.text and text.startswith(out.text)
  # without ignore_eos the model's EOS (<|im_end|>) ends the request
  eos = next(iter(llm.engine.eos_token_ids))
  out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))[0]
  assert (eos in out.token_ids) == (out.finish_reason == "stop")
  assert (
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].finish_reason == "length"
  )


@pytest.mark.parametrize(
  "kw,msg",
  [
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1), "temperature"),
    (dict(min_p=2), "min_p"),
  ],
)
def test_bad_sampling_params(kw, msg):
  with pytest.raises(ValueError, match=msg):
    SamplingParams(**kw)


def test_bad_requests_do_not_stop_the_engine(llm):
  engine = llm.engine
  with pytest.raises(ValueError, match="max_model_len"):
    engine.add_request(list(range(5, 5 + engine.max_model_len)))
  with pytest.raises(ValueError, match="empty"):
    engine.add_request([])
  with pytest.raises(ValueError, match="vocabulary"):
    engine.add_request([10**6])
  assert llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2))[0].token_ids


def _broken_copy(src, dst, edit):
  shutil.copytree(src, dst)
  edit(dst)
  return dst


@pytest.mark.parametrize(
  "edit,msg",
  [
    (lambda d: (d / "config.json").unlink(), "config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (
      lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "architectures": ["MambaForCausalLM"]})
      ),
      "MambaForCausalLM",
    ),
    (
      lambda d: (d / "config.json").write_text(
        json.dumps({k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "hidden_size"})
      ),
      "hidden_size",
    ),
    (
      lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
      "truncated|safetensors",
    ),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 10), "safetensors"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
  ],
)
def test_bad_model_files(checkpoints, tmp_path, edit, msg):
  path = _broken_copy(checkpoints["llama"][0], tmp_path / "m", edit)
  with pytest.raises(ConfigError, match=msg) as e:
    LLMEngine(path, device="CPU", num_blocks=8)
  assert "\n" not in str(e.value)


def test_bad_paths_and_devices(tmp_path, checkpoints):
  with pytest.raises(ConfigError, match="no such file"):
    LLMEngine(tmp_path / "nope", device="CPU")
  (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
  with pytest.raises(ConfigError, match="GGUF"):
    LLMEngine(tmp_path / "bad.gguf", device="CPU")
  with pytest.raises(ConfigError, match="available"):
    LLMEngine(checkpoints["llama"][0], device="NOSUCHDEV")


def test_sampler_without_top_k_top_p_search_picks_the_same_tokens(device):
  """The head variant that skips the top-k/top-p search (no row uses them) must not change any token."""
  import numpy as np
  from tinygrad import Tensor, dtypes
  from tinyvllm_core.kernels.sampler import sample

  rng = np.random.default_rng(0)
  logits = Tensor(rng.standard_normal((6, 300), dtype=np.float32) * 3, device=device)
  rows = dict(
    temperature=Tensor([0.0, 0.5, 1.0, 1.5, 0.7, 2.0], device=device),
    top_k=Tensor.zeros(6, dtype=dtypes.int32, device=device),
    top_p=Tensor.ones(6, device=device),
    min_p=Tensor([0.0, 0.0, 0.1, 0.0, 0.3, 0.05], device=device),
  )
  for seed in range(5):
    seeds = Tensor(np.arange(6, dtype=np.uint32) * 1000 + seed, device=device)
    full, plain = (sample(logits, **rows, seeds=seeds, filtered=f).numpy() for f in (True, False))
    np.testing.assert_array_equal(full, plain)
  top_k = Tensor([0, 1, 1, 1, 1, 1], dtype=dtypes.int32, device=device)
  with_top_k = sample(logits, **{**rows, "top_k": top_k}, seeds=seeds).numpy()
  assert (with_top_k[1:] == logits.numpy()[1:].argmax(-1)).all()  # top_k=1 rows take the argmax: the search did run
