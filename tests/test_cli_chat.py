"""`tinyvllm chat` on the real SmolLM2 (greedy): the app driven through a real prompt_toolkit session on pipe
input, Ctrl+C during a reply, /save + /load, the prefix cache over a 10-turn chat, and the piped console script."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
import typer
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from tinyvllm_cli.chat import ChatApp, ReplyView, parse_conversation, prompt_session
from tinyvllm_cli.conversation import Conversation
from tinyvllm_core import EngineLoop, RequestOutput, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)
STATS = re.compile(r"prompt (\d+) tokens \((\d+) cached\)")


@pytest.fixture(scope="module")
def loop(smollm2):
  loop = EngineLoop(smollm2.engine)
  yield loop
  loop.shutdown()


def make_app(smollm2, loop, **kwargs) -> tuple[ChatApp, io.StringIO]:
  screen = io.StringIO()
  console = Console(file=screen, width=200, force_terminal=False, color_system=None, highlight=False)
  return ChatApp(smollm2.engine, loop, console, GREEDY, model_name="smollm2", **kwargs), screen


def drive(app: ChatApp, keys: str) -> None:
  """Type `keys` into a real PromptSession (pipe input, no terminal output) and run the chat until it exits."""
  with create_pipe_input() as inp:
    inp.send_text(keys)
    app.run(prompt_session(InMemoryHistory(), input=inp, output=DummyOutput()))


# ---- through the prompt ------------------------------------------------------------------------


def test_two_turns_reuse_the_prefix_cache(smollm2, loop):
  app, screen = make_app(smollm2, loop)
  drive(app, "What is the capital of France?\n/stats\nAnd what is the capital of Germany?\n/stats\n/bye\n")
  text = screen.getvalue()
  assert "Paris" in text
  (p1, c1), (p2, c2) = [tuple(map(int, m)) for m in STATS.findall(text)]
  assert p2 > p1 and c2 > 0 and c2 >= (p1 // 16) * 16
  assert [m["role"] for m in app.conv.messages] == ["user", "assistant", "user", "assistant"]
  assert app.last_stats.cached_tokens == c2 and app.last_stats.ttft > 0


def test_commands_and_editing(smollm2, loop):
  app, screen = make_app(smollm2, loop, system="You are a terse assistant.")
  app.conv.load(
    "You are a terse assistant.", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
  )
  drive(
    app,
    "/set temperature 0\n/set temperature -1\n/set top_k many\n/set colour blue\n/set max_tokens 8\n"
    "/frobnicate\nnever sent\x03/clear\n/think\n/nothink\n/show\n/help\n"
    '"""\nSay one word:\nhello\n"""\n/exit\n',
  )
  lines = screen.getvalue().splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 4 and "temperature must be >= 0" in errors[0] and "top_k" in errors[1]
  assert "usage: /set" in errors[2] and "unknown command /frobnicate" in errors[3]
  assert "temperature = 0.0" in lines and "max_tokens = 8" in lines
  assert any("conversation cleared (system prompt kept)" in line for line in lines)
  assert any(line.startswith("context") and "/ " in line for line in lines)
  assert any(line.startswith("/help") for line in lines)
  assert "thinking off (this model's chat template may ignore it)" in lines
  assert app.conv.template_kwargs == {"enable_thinking": False}
  assert app.params.temperature == 0 and app.params.max_tokens == 8 and app.conv.system == "You are a terse assistant."
  assert app.conv.messages[0] == {
    "role": "user",
    "content": "Say one word:\nhello",
  }  # only the multi-line message was sent
  assert len(app.conv.messages) == 2 and app.last_stats.generated_tokens <= 8


def test_set_penalties_and_show_the_defaults_source(smollm2, loop):
  app, screen = make_app(smollm2, loop, verbose=True)
  app.welcome()
  drive(
    app,
    "/set repetition_penalty 1.3\n/set presence_penalty 9\n/set frequency_penalty -0.5\n/set min_p 0.1\n/show\n/exit\n",
  )
  lines = screen.getvalue().splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and "presence_penalty must be in [-2, 2]" in errors[0]
  assert (app.params.repetition_penalty, app.params.frequency_penalty, app.params.min_p) == (1.3, -0.5, 0.1)
  assert any(line.startswith("sampling:") and "defaults: llama.cpp's defaults" in line for line in lines)
  assert any(line.startswith("defaults") and "llama.cpp's defaults" in line for line in lines)
  shown = next(line for line in lines if line.startswith("parameters"))
  assert "min_p 0.1" in shown and "repetition_penalty 1.3" in shown and "frequency_penalty -0.5" in shown


def test_ctrl_c_during_a_reply_keeps_the_chat(smollm2, loop, monkeypatch):
  app, screen = make_app(smollm2, loop)
  add, calls = ReplyView.add, []

  def add_then_ctrl_c(view, delta):
    add(view, delta)
    if delta and not calls:
      calls.append(delta)
      raise KeyboardInterrupt  # the user presses Ctrl+C right after the first words appear

  monkeypatch.setattr(ReplyView, "add", add_then_ctrl_c)
  drive(app, "Write a long story about a dragon.\nWhat is the capital of France?\n/bye\n")
  text = screen.getvalue()
  assert "[interrupted]" in text and "Paris" in text.split("[interrupted]")[1]
  user, partial, _, answer = app.conv.messages
  assert partial["role"] == "assistant" and partial["content"].startswith(calls[0])
  assert "Paris" in answer["content"] and app.last_stats.finish_reason in ("stop", "length")
  assert loop.stats()["num_running"] == 0


def test_save_and_load_round_trip(smollm2, loop, tmp_path):
  app, screen = make_app(smollm2, loop, system="Answer in one sentence.")
  history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Nice to meet you, Ada."}]
  app.conv.messages = [dict(m) for m in history]
  (tmp_path / "bad.json").write_text("{not json")
  (tmp_path / "shape.json").write_text(json.dumps({"messages": [{"role": "robot", "content": 1}]}))
  saved = tmp_path / "chat.json"
  other, other_screen = make_app(smollm2, loop)
  app.handle_line(f"/save {saved}")
  for line in (
    f"/load {tmp_path / 'missing.json'}",
    f"/load {tmp_path / 'bad.json'}",
    f"/load {tmp_path / 'shape.json'}",
    f"/load {saved}",
  ):
    assert other.handle_line(line)
  errors = [line for line in other_screen.getvalue().splitlines() if line.startswith("error:")]
  assert len(errors) == 3 and "No such file" in errors[0] and "message 0" in errors[2]
  assert json.loads(saved.read_text())["system"] == "Answer in one sentence."
  assert other.conv.system == app.conv.system and other.conv.messages == history
  stats = other.reply("What is my name?")
  assert stats is not None and stats.prompt_tokens > 30 and len(other.conv.messages) == 4


def test_a_long_history_drops_the_oldest_turns(smollm2, loop):
  app, screen = make_app(smollm2, loop, system="Keep me.")
  turn = [{"role": "user", "content": "Tell me something. " * 20}, {"role": "assistant", "content": "Something. " * 20}]
  app.conv.load("Keep me.", turn * 6)
  app.params = SamplingParams(temperature=0, max_tokens=smollm2.engine.max_model_len - 300)
  ids = app.fit_context("And now?")
  assert ids is not None and len(ids) + app.params.max_tokens <= smollm2.engine.max_model_len
  assert (
    app.conv.system == "Keep me."
    and 2 <= len(app.conv.messages) < 13
    and app.conv.messages[-1]["content"] == "And now?"
  )
  assert "oldest turns to fit" in screen.getvalue()


# ---- the prefix cache over a long chat ---------------------------------------------------------

TURNS = [
  "Hi! I am planning a small vegetable garden in my backyard this spring and would like some advice to get started.",
  "The garden gets about six hours of direct sunlight each day. Which vegetables would grow "
  "well in that amount of sun?",
  "I like tomatoes and peppers the most. How far apart should I plant them so that they have enough room to grow?",
  "What kind of soil do tomatoes prefer, and should I add compost or some kind of fertilizer before planting them?",
  "How often should I water the garden during the hot summer months, and is it better to "
  "water in the morning or evening?",
  "Some of the leaves on my tomato plants are turning yellow at the bottom. What could be causing this problem?",
  "Are there any natural ways to keep aphids and other small insects away from my pepper "
  "plants without using chemicals?",
  "When is the right time to harvest peppers, and how can I tell whether a tomato is ripe "
  "enough to pick from the vine?",
  "Could I grow some herbs like basil and parsley next to the tomatoes, or would they compete for water and nutrients?",
  "Thank you for all the help! Can you give me a short summary of the most important tips for my first garden?",
]


def test_ten_turn_chat_is_served_from_the_prefix_cache(smollm2, loop):
  engine, bs = smollm2.engine, smollm2.engine.config.block_size
  conv, params, previous, ttfts = Conversation(engine), SamplingParams(temperature=0, max_tokens=30), None, []
  for turn, text in enumerate(TURNS, 1):
    assert 20 <= len(engine.encode(text, add_special_tokens=False)) <= 40
    ids = conv.prompt_ids(text)
    stream = loop.submit(ids, params)
    out = stream.result()
    assert out.finish_reason in ("stop", "length") and out.token_ids
    conv.add_reply(out.text, out.token_ids)
    ttfts.append(stream.ttft)
    if previous:
      seen = previous[0] + previous[1]  # the last turn's prompt and generated ids
      assert ids[: len(seen)] == seen, f"turn {turn}: the prompt does not start with what the model saw and generated"
      computed = len(seen) - 1  # the last sampled token is never fed back, so its KV was not computed
      assert out.num_cached_tokens >= computed // bs * bs, f"turn {turn}: {out.num_cached_tokens} cached of {len(ids)}"
    previous = (ids, out.token_ids)
    print(f"turn {turn:2d}: prompt {len(ids):4d} tokens, {out.num_cached_tokens:4d} cached, TTFT {stream.ttft:.3f} s")
  print("TTFT per turn (s):", " ".join(f"{t:.3f}" for t in ttfts))


def test_the_prompt_comes_before_the_load_and_the_warm_up(smollm2, monkeypatch):
  """chat on a terminal: the prompt session starts while the model still loads (the load here waits for it), the
  first message waits for the load, the background warm-up is still going when that message is sent and is paused
  for it, and the answer is the one an app without warm-up gives."""
  from tinyvllm_cli import chat as chat_module

  plain_loop = EngineLoop(smollm2.engine)
  plain, _ = make_app(smollm2, plain_loop)
  drive(plain, "What is the capital of France?\n/bye\n")
  plain_loop.shutdown()

  screen = io.StringIO()
  console = Console(file=screen, width=200, force_terminal=False, color_system=None, highlight=False)
  monkeypatch.setattr(chat_module, "out", console)
  prompted, statuses, paused_with = threading.Event(), [], []
  make_session = chat_module.prompt_session
  settings = dict(system=None, verbose=True, max_tokens=GREEDY.max_tokens, overrides={"temperature": 0.0})

  def build() -> ChatApp:
    assert prompted.wait(120), "the prompt waited for the load"
    app = chat_module._build_app(smollm2.engine, "smollm2", settings, warmup=True, notes=console)
    pause = app.warmup.pause

    def spy_pause() -> None:
      paused_with.append(app.warmup.finished)
      pause()

    app.warmup.pause = spy_pause
    return app

  with create_pipe_input() as inp:
    inp.send_text("What is the capital of France?\n/bye\n")

    def session(status=None):
      statuses.append(status())
      prompted.set()
      return make_session(InMemoryHistory(), status=status, input=inp, output=DummyOutput())

    monkeypatch.setattr(chat_module, "prompt_session", session)
    startup = chat_module.Startup(build, "smollm2")
    try:
      chat_module._chat_at_prompt(startup)
    finally:
      startup.shutdown()
  app = startup.app()
  assert statuses == ["loading the model ..."] and paused_with == [False]
  assert app.conv.messages == plain.conv.messages and "Paris" in app.conv.messages[-1]["content"]
  text = screen.getvalue()
  assert text.startswith("tinyvllm chat · smollm2\n") and "smollm2 on CPU" in text and "Paris" in text


def test_a_failed_load_is_one_line_after_the_first_message(monkeypatch):
  from tinyvllm_cli import chat as chat_module

  def build():
    raise ValueError("bad model file")

  startup = chat_module.Startup(build, "broken")
  with pytest.raises(typer.Exit):
    startup.app()
  assert startup.status() == "loading failed: bad model file"


# ---- the console script ------------------------------------------------------------------------


def test_piped_one_shot_with_the_console_script(tmp_path):
  exe = shutil.which("tinyvllm")
  cmd = [exe] if exe else [sys.executable, "-m", "tinyvllm_cli"]
  env = {**os.environ, "TINYVLLM_HOME": str(tmp_path), "NO_COLOR": "1"}  # no last pulled model: the embedded SmolLM2
  done = subprocess.run(
    [*cmd, "chat", "--temperature", "0", "--max-tokens", "24"],
    input="What is the capital of France?\n",
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr
  assert "Paris" in done.stdout and "Traceback" not in done.stderr


def test_piped_errors_are_one_line(tmp_path):
  exe = shutil.which("tinyvllm")
  cmd = [exe] if exe else [sys.executable, "-m", "tinyvllm_cli"]
  env = {**os.environ, "TINYVLLM_HOME": str(tmp_path)}
  for args, stdin, expected in [
    (["--temperature", "-1"], "hi", "temperature must be >= 0"),
    ([], "  \n", "stdin is empty"),
    (["--model", str(tmp_path / "none.gguf")], "hi", "no such model"),
    (["--dtype", "half"], "hi", "--dtype 'half': choose auto, float32, float16 or bfloat16"),
  ]:
    done = subprocess.run([*cmd, "chat", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error:") and expected in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_piped_one_shot_in_float16_reaches_the_engine(checkpoints, monkeypatch):
  """--dtype float16: the engine's weights and KV pools are float16 and the piped reply completes (in-process)."""
  from tinygrad import dtypes
  from typer.testing import CliRunner
  from tinyvllm_cli import chat as chat_module
  from tinyvllm_cli.main import app

  load, engines = chat_module.load_engine, []

  def spy(*args, **kwargs):
    engines.append(load(*args, **kwargs)[0])
    return engines[-1], "tiny"

  monkeypatch.setattr(chat_module, "load_engine", spy)
  r = CliRunner().invoke(
    app,
    [
      "chat",
      "--model",
      str(checkpoints["llama"][0]),
      "--device",
      "CPU",
      "--dtype",
      "float16",
      "--temperature",
      "0",
      "--max-tokens",
      "4",
      "--kv-cache-gb",
      "0.01",
      "-v",
    ],
    input="hello there\n",
    env={"COLUMNS": "200", "NO_COLOR": "1"},
  )
  assert r.exit_code == 0 and "Traceback" not in r.output, r.output
  model = engines[0].runner.model
  assert engines[0].config.dtype == "float16" and model.dtype == dtypes.float16
  assert model.layer_inputs[0]["k_pool"].dtype == model.layer_inputs[0]["v_pool"].dtype == dtypes.float16
  assert {w.dtype for name, w in model.weights.items() if not name.endswith("_scale")} == {dtypes.float16}
  assert re.search(r"prompt \d+ tokens \(0 cached\) · 4 generated", r.stderr), r.stderr


def test_a_dtype_the_backend_cannot_compile_is_one_line(capfd):
  """bfloat16 does not compile for every CPU (clang: __bf16 is not supported on this target): one ValueError line
  naming the fix, and the compiler's messages stay off the terminal. Where it compiles, nothing is raised."""
  from tinyvllm_cli.engine_options import check_dtype_compiles

  for dtype in ("auto", "float32", "float16", "bfloat16"):
    try:
      check_dtype_compiles(dtype, "CPU")
    except ValueError as e:
      assert (
        dtype == "bfloat16" and str(e).startswith("--dtype bfloat16 does not work on CPU here (") and "\n" not in str(e)
      ), e
      assert str(e).endswith("use float32 or float16 (or auto)")
  assert capfd.readouterr().err == ""


# ---- pieces ------------------------------------------------------------------------------------


class CannedStream:
  """What EngineLoop.submit returns, replaying fixed outputs (no model run)."""

  def __init__(self, outputs: list[RequestOutput]):
    self.outputs, self.request_id = outputs, "canned"
    self.ttft, self.first_token_time, self.finish_time = 0.1, 1.0, 2.0

  def __iter__(self):
    return iter(self.outputs)


class CannedLoop:
  def __init__(self, deltas: list[str]):
    ids = list(range(10, 10 + len(deltas)))
    self.outputs = [
      RequestOutput("canned", [1], ids[: i + 1], "".join(deltas[: i + 1]), [ids[i]], d) for i, d in enumerate(deltas)
    ]
    self.outputs[-1].finished, self.outputs[-1].finish_reason = True, "stop"

  def submit(self, ids, params):
    return CannedStream(self.outputs)


def test_reasoning_is_dimmed_on_a_terminal_and_kept_out_of_the_history(smollm2):
  deltas = ["<think>", "\nThe user", " greets me.\n", "</think>", "\n\nHello", " there!"]
  for terminal in (True, False):
    screen = io.StringIO()
    console = Console(file=screen, width=200, force_terminal=terminal, color_system="standard" if terminal else None)
    app = ChatApp(smollm2.engine, CannedLoop(deltas), console, GREEDY)
    assert app.reply("Hi") is not None
    assert app.conv.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]
    if terminal:
      assert "\x1b[2m" in screen.getvalue() and "The user" in screen.getvalue()  # dim
    else:
      assert screen.getvalue() == "Hello there!\n"  # a pipe gets the answer only


def test_parse_conversation_accepts_a_leading_system_message():
  system, messages = parse_conversation(
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]}
  )
  assert system == "S" and messages == [{"role": "user", "content": "u"}]
  for bad in ([], {"messages": "x"}, {"system": 3, "messages": []}, {"messages": [{"role": "user"}]}):
    with pytest.raises(ValueError):
      parse_conversation(bad)


def test_quantize_none_reaches_the_engine(monkeypatch: pytest.MonkeyPatch):
  """`--quantize none` is quantize=None for the engine (a GGUF dequantized), not an unset option (the GGUF's blocks)."""
  import tinyvllm_core

  from tinyvllm_cli.chat import new_engine
  from tinyvllm_cli.engine_options import quantize_setting

  monkeypatch.setattr(tinyvllm_core, "LLMEngine", lambda path, **kwargs: kwargs)
  assert new_engine("m.gguf", quantize=quantize_setting("none"), beam=None, device="CPU") == {
    "quantize": None,
    "device": "CPU",
  }
  assert new_engine("m.gguf", quantize=quantize_setting(None))["quantize"] == "auto"
