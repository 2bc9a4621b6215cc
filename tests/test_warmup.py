"""Warm-up captures the batch shapes of a first chat turn (and of small batches for serve-lite), in the background
through an engine loop, paused by a reply (serve-lite's side: tests/test_serve.py)."""

import threading

from tinyvllm_core import ConfigError, EngineLoop, LLMEngine, SamplingParams
from tinyvllm_cli.warmup import BackgroundWarmUp, first_prompt_len, head_of, next_power_of_2, warm_up, warmup_plan
from tinyvllm_cli.warmup import width_of


def test_plan_covers_prefill_buckets_widths_and_batches():
  heads = ("greedy", "sample", "top_p")
  assert warmup_plan(1024, 1) == [(1, n, h) for n in (8, 24, 56, 120) for h in heads]
  assert warmup_plan(1024, 8)[12:21] == [(b, 8, h) for b in (2, 4, 8) for h in heads]  # then the serving rounds
  assert all(n < 40 for _, n, _ in warmup_plan(40, 1))  # prompts that do not fit the context are left out


def layer_shapes(plan: list[tuple], max_num_batched_tokens: int) -> set[tuple[int, int]]:
  """(token bucket, block-table width) of the layer jits a plan's rounds capture: each round's prefill (when its
  prompts fit one step) and its decode."""
  shapes = set()
  for b, n, _ in plan:
    shapes.add((next_power_of_2(b), width_of(n + 1)))
    if b * n <= max_num_batched_tokens:
      shapes.add((next_power_of_2(b * n), width_of(n)))
  return shapes


def test_plan_covers_what_serving_concurrent_requests_meets():
  """Up to 16 sequences: decode at widths 1-8 for 1, 2, 4, 8, 16 of them, the prefill buckets up to 512 tokens at
  each width where 16 prompts reach them, every round for every head; nothing past the limits."""
  plan = warmup_plan(1024, 16, "top_p", prompt_len=30, max_num_batched_tokens=512)
  assert plan[: len(warmup_plan(1024, 1, "top_p", 30))] == warmup_plan(1024, 1, "top_p", 30)  # the first turn's first
  shapes = layer_shapes(plan, 512)
  assert {(b, w) for b in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)} <= shapes  # decode
  assert {(n, 1) for n in (16, 32, 64, 128, 256)} <= shapes  # 16 prompts of 15 tokens: 240, no more at width 1
  assert {(n, 2) for n in (32, 64, 128, 256, 512)} <= shapes
  assert {(n, 4) for n in (64, 128, 256, 512)} | {(n, 8) for n in (128, 256, 512)} <= shapes
  assert max(n for n, _ in shapes) == 512 and all(b <= 16 and n + 2 < 1024 for b, n, _ in plan)
  assert len(set(plan)) == len(plan) and {h for _, _, h in plan[-3:]} == {"greedy", "sample", "top_p"}

  small = warmup_plan(40, 64, max_num_batched_tokens=64)  # a 40-token context, 64-token steps; 32 sequences at most
  assert all(n + 2 < 40 and b <= 32 for b, n, _ in small)
  assert {w for _, w in layer_shapes(small, 64)} == {1, 2}  # the prompt lengths of PROMPT_LENS that fit
  assert max(n for n, _ in layer_shapes(small, 64)) == 64 and (32, 1) in layer_shapes(small, 64)
  assert warmup_plan(1024, 1, max_num_batched_tokens=64) == warmup_plan(1024, 1)  # one sequence: as before


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


def test_a_chat_plan_puts_the_rounds_of_its_first_prompt_first():
  """The chat's head first, from its first prompt's prefill bucket (37 tokens: 64) up, then the other heads: the
  same rounds as the plain plan, in another order."""
  plan = warmup_plan(1024, 1, "top_p", prompt_len=37)
  assert plan[:4] == [(1, 56, "top_p"), (1, 120, "top_p"), (1, 8, "top_p"), (1, 24, "top_p")]
  assert {h for _, _, h in plan[4:8]} == {"greedy"} and sorted(plan) == sorted(warmup_plan(1024, 1))
  assert warmup_plan(1024, 1, "greedy", prompt_len=30)[0] == (1, 24, "greedy")  # 30 tokens: bucket 32
  assert head_of(SamplingParams(temperature=0)) == "greedy"
  assert head_of(SamplingParams(temperature=0.8, top_k=0, top_p=1.0)) == "sample"
  assert head_of(SamplingParams(temperature=0.8, top_k=40)) == "top_p"


class Templated:
  def apply_chat_template(self, messages, **kwargs):
    return list(range(len(messages[0]["content"].split()) + 5))


class Untemplated:
  def apply_chat_template(self, messages, **kwargs):
    raise ConfigError("this model has no chat template; send a plain prompt instead")


def test_first_prompt_len_counts_the_templated_first_message():
  assert first_prompt_len(Templated()) == 11 and first_prompt_len(Untemplated()) == 0


def test_background_warm_up_yields_to_a_request_and_changes_nothing(checkpoints, monkeypatch):
  """Through an EngineLoop: the warm-up's first round is pending when a user's request comes; pause aborts it, so
  after the step in flight the user's request runs alone, and its greedy answer is the one an engine without warm-up
  gives; resume redoes the aborted round and the plan completes, capturing what warm_up captures."""
  path = checkpoints["llama"][0]
  kwargs = dict(device="CPU", num_blocks=128, block_size=16)
  user = SamplingParams(temperature=0, max_tokens=20)
  prompt = list(range(3, 40))
  alone = EngineLoop(LLMEngine(path, **kwargs))
  expected = alone.submit(prompt, user).result().token_ids
  alone.shutdown()
  plain = LLMEngine(path, **kwargs)
  warm_up(plain)

  engine = LLMEngine(path, **kwargs)
  step, gate, in_engine = engine.step, threading.Event(), []

  def gated_step():  # the engine steps only once the user's request is queued
    assert gate.wait(60), "the warm-up was never paused"
    in_engine.append(len(engine.scheduler.running) + len(engine.scheduler.waiting))
    return step()

  monkeypatch.setattr(engine, "step", gated_step)
  loop = EngineLoop(engine)
  warmup = BackgroundWarmUp(loop, user, prompt_len=len(prompt)).start()
  try:
    while not warmup.pending:  # the first round is queued, and its step waits at the gate
      threading.Event().wait(0.01)
    warmup.pause()
    stream = loop.submit(prompt, user)
    assert warmup.done == 0 and warmup.pending
    gate.set()
    got = stream.result()
    assert got.finish_reason == "length" and got.token_ids == expected
    assert in_engine[0] == 1 and set(in_engine[1 : len(expected) + 1]) == {1}  # the round in flight, then alone
    warmup.resume()
    warmup.join(600)
    assert warmup.finished and set(engine.captured_shapes()) >= set(plain.captured_shapes())
  finally:
    warmup.stop()
    loop.shutdown()
