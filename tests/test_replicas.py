"""Engine replicas (one process each, to use every CPU core) behave like one engine: same greedy tokens, streaming
through EngineLoop, aborts, stats, and clear errors."""
import pytest
from numpy_ref import reference_greedy
from tinyvllm_core import ConfigError, EngineLoop, LLMEngine, ReplicatedEngine, SamplingParams, make_engine

PROMPTS = [[5, 17, 42, 9, 100, 3, 7], [11, 12, 13], list(range(20, 57)), [90] * 21, [1, 2, 3, 4, 5, 6, 7, 8], [42]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

@pytest.fixture(scope="module")
def replicated(checkpoints):
  engine = make_engine(checkpoints["llama"][0], num_replicas=2, device="CPU", num_blocks=64, block_size=4)
  yield engine
  engine.shutdown()

def test_replicas_match_the_reference_and_split_the_work(replicated, checkpoints):
  _, weights, config = checkpoints["llama"]
  ids = [replicated.add_request(p, GREEDY) for p in PROMPTS]
  assert sorted(replicated.num_unfinished) == [3, 3]  # least-loaded placement
  done = {}
  while replicated.has_unfinished_requests():
    for out in replicated.step():
      if out.finished: done[out.request_id] = out.token_ids
  assert [done[i] for i in ids] == [reference_greedy(weights, config, p, GREEDY.max_tokens) for p in PROMPTS]
  stats = replicated.stats()
  assert stats["num_replicas"] == 2 and stats["num_generated_tokens"] >= len(PROMPTS) * GREEDY.max_tokens
  assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["kv_cache_usage"] == 0

def test_replicas_stream_and_abort_through_the_engine_loop(replicated):
  loop = EngineLoop(replicated)
  try:
    streams = [loop.submit(p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)) for p in PROMPTS[:4]]
    loop.abort(streams[1].request_id)
    results = [s.result() for s in streams]
  finally: loop.shutdown()
  assert results[1].finish_reason == "abort"
  assert all(r.finish_reason == "length" for i, r in enumerate(results) if i != 1)
  assert not replicated.has_unfinished_requests() and not replicated.owner

def test_replica_errors_reach_the_caller(replicated, checkpoints):
  with pytest.raises(ValueError, match="outside the vocabulary"): replicated.add_request([10**6], GREEDY)
  assert replicated.add_request([1, 2], GREEDY, request_id="same") == "same"
  with pytest.raises(ValueError, match="already in use"): replicated.add_request([1, 2], GREEDY, request_id="same")
  assert replicated.abort("same").finish_reason == "abort" and replicated.abort("unknown") is None
  with pytest.raises(ConfigError, match="block_size"): make_engine(checkpoints["llama"][0], num_replicas=2, device="CPU", block_size=0)
  with pytest.raises(ValueError, match="num_replicas"): make_engine(checkpoints["llama"][0], num_replicas=0)
  assert isinstance(make_engine(checkpoints["llama"][0], num_replicas=1, device="CPU", num_blocks=8), LLMEngine)
  assert isinstance(replicated, ReplicatedEngine)
