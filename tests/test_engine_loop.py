"""The streaming, thread-safe front: one engine thread, many caller threads."""

import threading
import pytest
from tinyvllm_core import EngineLoop, LLMEngine, SamplingParams
from tinyvllm_core import Detokenizer as _Detokenizer

PROMPTS = [[i, i + 1, i + 2, (i * 7) % 300] * (1 + i % 3) for i in range(5, 21)]


@pytest.fixture(scope="module")
def loop(checkpoints):
  loop = EngineLoop(LLMEngine(checkpoints["llama"][0], device="CPU", num_blocks=256, block_size=4, max_num_seqs=16))
  yield loop
  loop.shutdown()


@pytest.fixture(scope="module")
def alone(loop):
  p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  return [loop.submit(q, p).result().token_ids for q in PROMPTS]


def _threads(target, n):
  ts = [threading.Thread(target=target, args=(i,)) for i in range(n)]
  for t in ts:
    t.start()
  for t in ts:
    t.join(timeout=120)
  assert not any(t.is_alive() for t in ts)


def test_sixteen_threads_stream_their_own_output(loop, alone):
  results = {}

  def client(i):
    stream = loop.submit(PROMPTS[i], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    deltas = [out for out in stream]
    results[i] = (
      [t for o in deltas for t in o.delta_token_ids],
      "".join(o.delta_text for o in deltas),
      deltas[-1],
      stream,
    )

  _threads(client, 16)
  for i, (ids, text, last, stream) in results.items():
    assert ids == alone[i] == last.token_ids
    assert text == last.text and last.finish_reason == "length"
    assert stream.ttft is not None and stream.ttft > 0


def test_abort_half_mid_stream(loop, alone):
  results = {}

  def client(i):
    stream = loop.submit(PROMPTS[i], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    outs = []
    for out in stream:
      outs.append(out)
      if i % 2 and len(outs) == 3:
        loop.abort(stream.request_id)
    results[i] = outs[-1]

  _threads(client, 16)
  for i, last in results.items():
    if i % 2:
      assert (
        last.finish_reason == "abort"
        and 3 <= len(last.token_ids) < 12
        and last.token_ids == alone[i][: len(last.token_ids)]
      )
    else:
      assert last.finish_reason == "length" and last.token_ids == alone[i]
  stats = loop.stats()
  assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]


def test_a_failing_request_gets_an_error_and_the_loop_goes_on(loop, alone):
  bad = loop.submit(list(range(5, 2000)), SamplingParams(max_tokens=4)).result()
  assert bad.finish_reason == "error" and "max_model_len" in bad.error
  assert (
    loop.submit(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).result().token_ids
    == alone[0]
  )


def test_incremental_detokenizer_never_splits_characters(smollm2):
  tok = smollm2.engine.tokenizer
  text = "héllo 🙂 wörld — 日本語のテキスト 👍🏽!"
  ids, detok, deltas = tok.encode(text).ids, _Detokenizer(), []
  for n in range(1, len(ids) + 1):
    detok.update(tok, ids[:n])
    deltas.append(detok.take())
  assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_streamed_deltas_hold_back_a_stop_string_across_tokens(smollm2):
  engine, prompt = smollm2.engine, smollm2.engine.encode("The capital of France is")
  greedy = smollm2.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
  pieces = [
    engine.decode(greedy.token_ids[: i + 1])[len(engine.decode(greedy.token_ids[:i])) :]
    for i in range(len(greedy.token_ids))
  ]
  i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
  stop = pieces[i][-2:] + pieces[i + 1][:2]  # spans two tokens
  engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))
  outs = []
  while engine.has_unfinished_requests():
    outs += engine.step()
  streamed = "".join(o.delta_text for o in outs)
  assert outs[-1].finish_reason == "stop" and stop not in outs[-1].text
  assert streamed == outs[-1].text and greedy.text.startswith(streamed)
  assert not any(stop[:2] in o.delta_text and o.delta_text.endswith(stop[:2]) for o in outs[:-1])


def test_shutdown_aborts_requests_in_flight(checkpoints):
  loop = EngineLoop(LLMEngine(checkpoints["llama"][0], device="CPU", num_blocks=64, block_size=4))
  stream = loop.submit(PROMPTS[0], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
  assert stream.get(timeout=60) is not None
  loop.shutdown()
  assert stream.result().finish_reason == "abort"
