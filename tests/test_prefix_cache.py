"""Prefix caching: same greedy tokens with the cache on and off; hits are counted, shared and collision-safe."""

import pytest
import tinyvllm_core.block_manager as block_manager
from tinyvllm_core import LLMEngine, SamplingParams
from test_batching import check_block_accounting, run

SYSTEM = list(range(30, 70))  # 40 shared tokens = 10 blocks of 4
PROMPTS = [
  SYSTEM + [5, 6, 7],
  SYSTEM + [8],
  SYSTEM[:20],
  SYSTEM + [5, 6, 7],
  SYSTEM[:24],
  SYSTEM + [9, 9, 9, 9, 9, 9, 9, 9, 1],
]


def engine(path, device, caching, **kw):
  """float32 on every device (CL's "auto" is float16), as test_batching's."""
  kw = {"num_blocks": 128, **kw}
  return LLMEngine(path, device=device, dtype="float32", block_size=4, enable_prefix_caching=caching, **kw)


@pytest.fixture(scope="module")
def no_cache(checkpoints, device):
  e = engine(checkpoints["llama"][0], device, False)
  return {i: run(e, [p])[0][0] for i, p in enumerate(PROMPTS)}


def test_cache_on_equals_off_one_by_one(checkpoints, device, no_cache):
  e = engine(checkpoints["llama"][0], device, True)
  cached = []
  for i, p in enumerate(PROMPTS):
    e.add_request(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    outs = []
    while e.has_unfinished_requests():
      outs += [o for o in e.step() if o.finished]
    assert outs[0].token_ids == no_cache[i]
    cached.append(outs[0].num_cached_tokens)
  # first prompt misses; the others reuse SYSTEM's full blocks; SYSTEM[:20] and [:24] are entirely cached
  # (all their blocks are full) yet still compute their last token
  assert cached == [0, 40, 16, 40, 20, 40]
  assert e.stats()["prefix_cache_hit_rate"] > 0.5
  assert e.block_manager.num_free_blocks == e.block_manager.num_total_blocks


def test_cache_on_equals_off_batched_and_preempted(checkpoints, device, no_cache):
  assert run(engine(checkpoints["llama"][0], device, True), PROMPTS, [0, 0, 1, 1, 2, 3])[0] == no_cache
  done, preempted = run(
    engine(checkpoints["llama"][0], device, True, num_blocks=24, max_num_batched_tokens=16), PROMPTS, [0, 1, 2, 3, 4, 5]
  )
  assert preempted > 0 and done == no_cache


def test_shared_blocks_are_ref_counted(checkpoints, device):
  e = engine(checkpoints["llama"][0], device, True)
  e.add_request(SYSTEM + [1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
  e.step()
  e.add_request(SYSTEM + [2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
  e.step()
  a, b = e.scheduler.running
  shared = set(a.block_table) & set(b.block_table)
  assert len(shared) == 10 and all(e.block_manager.blocks[i].ref_count == 2 for i in shared)
  check_block_accounting(e)


def _one(e, prompt, max_tokens=10):
  e.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
  outs = []
  while e.has_unfinished_requests():
    outs += [o for o in e.step() if o.finished]
  return outs[0]


def test_hash_collision_never_serves_wrong_kv(checkpoints, device, monkeypatch):
  path = checkpoints["llama"][0]
  other = [77] * 8 + SYSTEM[8:] + [5, 6, 7]  # differs from PROMPTS[0] in its first two blocks only
  expected = _one(engine(path, device, False), other).token_ids
  monkeypatch.setattr(block_manager, "hash_block", lambda parent, tokens: 42)  # every block collides
  e = engine(path, device, True)
  _one(e, PROMPTS[0])
  out = _one(e, other)
  assert out.num_cached_tokens == 0 and out.token_ids == expected
  assert (
    _one(e, PROMPTS[0]).num_cached_tokens == 4
  )  # a true match is still found (first block; later ones collide away)


def test_lru_eviction_drops_chain_tails_first(checkpoints, device):
  e = engine(checkpoints["llama"][0], device, True, num_blocks=21)  # 20 usable blocks of 4 tokens
  assert _one(e, SYSTEM[:17], 1).num_cached_tokens == 0  # 5 blocks, the first 4 full and cached
  assert _one(e, SYSTEM[:17], 1).num_cached_tokens == 16
  _one(e, list(range(100, 166)), 1)  # 17 blocks: the 15 never used, then the chain's tail
  assert _one(e, SYSTEM[:17], 1).num_cached_tokens == 12  # the chain's head survived
  assert e.block_manager.num_free_blocks == 20
