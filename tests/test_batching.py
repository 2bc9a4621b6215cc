"""Continuous batching, chunked prefill and preemption give the same greedy tokens as one request alone."""

import pytest
from numpy_ref import reference_greedy
from tinyvllm_core import LLMEngine, SamplingParams

PROMPTS = [
  [5, 17, 42, 9, 100, 3, 7],
  [11, 12, 13],
  list(range(20, 57)),
  [200, 201, 5, 5, 5, 9, 18, 30, 31, 32, 33, 34],
  [90] * 21,
  [1, 2, 3, 4, 5, 6, 7, 8],
  list(range(300, 250, -2)),
  [42],
]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def check_block_accounting(engine: LLMEngine) -> None:
  """Every block's ref count equals the number of sequence block tables that hold it."""
  bm, holders = engine.block_manager, {}
  for seq in engine.scheduler.running + list(engine.scheduler.waiting):
    for b in seq.block_table:
      holders[b] = holders.get(b, 0) + 1
    assert len(set(seq.block_table)) == len(seq.block_table)
  for block in bm.blocks[1:]:
    assert block.ref_count == holders.get(block.block_id, 0), f"block {block.block_id}"
    assert (block.block_id in bm.free_block_ids) == (block.ref_count == 0)


def run(engine: LLMEngine, prompts, arrivals=None, params=GREEDY) -> tuple[dict, int]:
  """Add prompt i at step arrivals[i]; return {index: token ids} and the number of preemptions seen."""
  arrivals, ids, done, step, preempted = arrivals or [0] * len(prompts), {}, {}, 0, 0
  while len(done) < len(prompts):
    for i, p in enumerate(prompts):
      if arrivals[i] == step:
        ids[engine.add_request(p, params)] = i
    for out in engine.step():
      if out.finished:
        done[ids[out.request_id]] = out.token_ids
    preempted = max(preempted, sum(s.num_preemptions for s in engine.seqs.values()))
    check_block_accounting(engine)
    step += 1
  assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
  return done, preempted


def llama_engine(checkpoints, device, **kw) -> LLMEngine:
  """The tiny llama checkpoint in float32 (CL's "auto" is float16): greedy tokens comparable with the reference's."""
  return LLMEngine(checkpoints["llama"][0], device=device, dtype="float32", block_size=4, **kw)


@pytest.fixture(scope="module")
def alone(checkpoints, device):
  _, weights, config = checkpoints["llama"]
  ref = {i: reference_greedy(weights, config, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
  engine = llama_engine(checkpoints, device, num_blocks=64, enable_prefix_caching=False)
  got = {i: run(engine, [p])[0][0] for i, p in enumerate(PROMPTS)}
  assert got == ref, "one request alone must equal the NumPy reference"
  return ref


@pytest.mark.parametrize(
  "kw,arrivals",
  [
    (dict(num_blocks=128, max_num_batched_tokens=512), None),  # all together
    (dict(num_blocks=128, max_num_batched_tokens=16), [0, 0, 1, 2, 3, 5, 8, 13]),  # chunked prefill, staggered joins
    (dict(num_blocks=128, max_num_batched_tokens=64, max_num_seqs=3), None),  # waiting queue
  ],
)
def test_batched_equals_alone(checkpoints, device, alone, kw, arrivals):
  engine = llama_engine(checkpoints, device, enable_prefix_caching=False, **kw)
  assert run(engine, PROMPTS, arrivals)[0] == alone


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_equals_alone(checkpoints, device, alone, caching):
  # 20 usable blocks of 4 tokens cannot hold 8 sequences of up to 47 tokens: the scheduler must preempt
  engine = llama_engine(checkpoints, device, num_blocks=21, max_num_batched_tokens=32, enable_prefix_caching=caching)
  done, preempted = run(engine, PROMPTS)
  assert preempted > 0
  assert done == alone


def test_finished_sequences_leave_and_new_ones_join(checkpoints, device):
  engine = llama_engine(checkpoints, device, num_blocks=64)
  short = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
  long_ = engine.add_request([8, 9, 10], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
  finished_at, joined_at = {}, None
  for step in range(12):
    if step == 3:
      late = engine.add_request([11, 12], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    for out in engine.step():
      if out.finished:
        finished_at[out.request_id] = step
    running = {s.request_id for s in engine.scheduler.running}
    if step == 3:
      joined_at = late in running
  assert finished_at[short] == 1 and joined_at
  assert finished_at[late] < finished_at[long_]
  assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
