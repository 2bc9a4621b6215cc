"""Devices with graphs, and CL (whose direct replay sets kernel arguments once), capture the whole forward (embed,
every layer, head and sampler) as one jit per batch shape; the CPU takes one layer's jit replayed per layer. Both
give the same tokens and logits (each forced here, on whichever device the run uses)."""

import numpy as np
from tinyvllm_core import LLMEngine, SamplingParams

PROMPTS = [[5, 17, 42, 9, 100, 3, 7], [8, 8, 1], list(range(30, 70))]


def _run(engine: LLMEngine, params: list[SamplingParams]) -> tuple[list[list[int]], list[np.ndarray]]:
  ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
  tokens, logits = {i: [] for i in ids}, []
  while engine.has_unfinished_requests():
    for out in engine.step():
      tokens[out.request_id] += out.delta_token_ids
    logits.append(engine.last_logits())
  return [tokens[i] for i in ids], logits


def test_whole_forward_jit_gives_the_per_layer_results(checkpoints, device):
  path = checkpoints["qwen3"][0]
  engines = [LLMEngine(path, device=device, dtype="float32", num_blocks=64, block_size=4) for _ in range(2)]
  engines[0].runner.whole_forward, engines[1].runner.whole_forward = False, True
  params = [
    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True, repetition_penalty=1.3),
    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
  ]
  (want, want_logits), (got, got_logits) = (_run(e, params) for e in engines)
  assert got == want
  for a, b in zip(got_logits, want_logits):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  kinds = {key[0] for key in engines[1].runner.jits}
  assert kinds == {"forward"}, kinds  # one jit per batch shape, nothing per layer
  if device == "CL":  # kernels/cl.py replays every capture directly: per layer (inputs bound again) or whole
    assert all(jit in e.runner.direct for e in engines for jit in e.runner.jits.values() if jit.captured)


class NoPlans(dict):
  def __setitem__(self, key, value):  # the runner makes no step plan: every step replays jit by jit
    pass


def test_cpu_step_plan_gives_the_per_layer_results(checkpoints):
  """On CPU, once a batch shape's jits are captured, its later steps run as one StepPlan (kernels/cpu.py: the kernels
  of embed, every layer and head with their input addresses patched once): the same tokens and logits as the replay
  jit by jit, with prefix-cache hits, penalties and sampling in the batch."""
  path = checkpoints["qwen3"][0]
  engines = [LLMEngine(path, device="CPU", dtype="float32", num_blocks=64, block_size=4) for _ in range(2)]
  engines[0].runner.plans = NoPlans()
  params = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
  ]
  for _ in range(2):  # the second round reuses the first one's shapes (plans) and its cached prefixes
    (want, want_logits), (got, got_logits) = (_run(e, params) for e in engines)
    assert got == want
    for a, b in zip(got_logits, want_logits):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not engines[0].runner.plans and engines[1].runner.plans


def test_cpu_without_the_c_dispatcher_keeps_tinygrads_replay(checkpoints, monkeypatch):
  """A machine where kernels/dispatch.c does not compile runs tinygrad's own replay: no direct replays, no plans, the
  same tokens and logits."""
  from tinyvllm_core.kernels import cpu

  def no_compiler():
    raise NotImplementedError("kernels/dispatch.c did not compile")

  path = checkpoints["qwen3"][0]
  params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True) for _ in PROMPTS]
  want, want_logits = _run(LLMEngine(path, device="CPU", dtype="float32", num_blocks=64, block_size=4), params)
  monkeypatch.setattr(cpu, "dispatcher", no_compiler)
  engine = LLMEngine(path, device="CPU", dtype="float32", num_blocks=64, block_size=4)
  got, got_logits = _run(engine, params)
  assert not engine.runner.direct and not engine.runner.plans
  assert got == want
  for a, b in zip(got_logits, want_logits):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
