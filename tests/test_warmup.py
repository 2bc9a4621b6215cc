"""Warm-up captures the batch shapes of a first chat turn (and of small batches for serve-lite) before requests come."""

from tinyvllm_core import LLMEngine, SamplingParams
from tinyvllm_cli.warmup import warm_up, warmup_plan


def test_plan_covers_prefill_buckets_widths_and_batches():
  heads = ("greedy", "sample", "top_p")
  assert warmup_plan(1024, 1) == [(1, n, h) for n in (8, 24, 56, 120) for h in heads]
  assert warmup_plan(1024, 8)[-6:] == [(4, 8, h) for h in heads] + [(8, 8, h) for h in heads]
  assert all(n < 40 for _, n, _ in warmup_plan(40, 1))  # prompts that do not fit the context are left out


def test_first_request_after_warm_up_captures_nothing(checkpoints):
  engine = LLMEngine(checkpoints["llama"][0], device="CPU", num_blocks=128, block_size=16, max_num_seqs=4)
  done = []
  assert (
    warm_up(engine, max_num_seqs=4, on_round=lambda i, n: done.append((i, n)))
    == len(done)
    == len(warmup_plan(engine.max_model_len, 4))
  )
  assert (
    not engine.has_unfinished_requests()
    and engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
  )
  captured = set(engine.captured_shapes())
  for start, params in (
    (3, SamplingParams(temperature=0, max_tokens=30)),
    (50, SamplingParams(temperature=0.8, max_tokens=30, seed=1)),
    (90, SamplingParams(temperature=0.8, top_p=0.9, top_k=5, max_tokens=30, seed=2)),
  ):
    engine.add_request(
      list(range(start, start + 37)), params
    )  # 37-token prompts: prefill bucket 64, decode widths 4 and 8 blocks
    while engine.has_unfinished_requests():
      engine.step()
  assert set(engine.captured_shapes()) == captured
