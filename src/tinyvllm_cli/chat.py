"""`tinyvllm chat`: a terminal chat whose history is re-sent every turn and served from the prefix cache.

`ChatApp` holds the engine loop, the conversation and the sampling parameters; `handle_line` runs one input
(a message or a slash command) and `reply` streams one answer to a rich Console. The Typer function `chat`
shows the prompt at once and loads the model meanwhile (`Startup`); the first message waits for the load, and the
batch shapes of a first turn are captured in the background through the engine loop (`BackgroundWarmUp`), paused
while a reply streams. Piped input is answered once, after the load, without a warm-up."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable

import typer
from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.formatted_text import HTML
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from rich.console import Console
from rich.text import Text

from tinyvllm_cli import models
from tinyvllm_cli.conversation import Conversation
from tinyvllm_cli.engine_options import (
  BeamOption,
  DeviceOption,
  DtypeOption,
  MaxModelLenOption,
  ModelOption,
  OptionalKvCacheGbOption,
  QuantizeOption,
  SpeculativeOption,
  check_dtype,
  check_dtype_compiles,
  quantize_setting,
)
from tinyvllm_cli.reasoning import ReasoningSplitter, prompt_opens_reasoning, split_reasoning
from tinyvllm_cli.ui import err, fail, one_line, out
from tinyvllm_cli.warmup import BackgroundWarmUp, first_prompt_len

if TYPE_CHECKING:
  from tinyvllm_core import EngineLoop, LLMEngine, RequestOutput, RequestStream, SamplingParams

HINTS = '/help for commands · """ for multi-line input · Ctrl+C stops a reply · Ctrl+D or /bye exits'
PROMPT, CONTINUATION, FENCE = ">>> ", "... ", '"""'
EXIT_COMMANDS = ("/bye", "/exit", "/quit")
HELP = [
  ("/help", "this list"),
  ("/clear", "forget the conversation (the system prompt stays)"),
  ("/system TEXT", "set the system prompt (without TEXT: show it)"),
  ("/set NAME VALUE", "temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty,"),
  ("", "max_tokens or seed (none: random)"),
  ("/show", "model, device, parameters and how much of the context is used"),
  ("/stats", "prompt and cached tokens, time to first token and decode speed of the last reply"),
  ("/save FILE, /load FILE", "write or read the conversation as JSON (system, messages)"),
  ("/think, /nothink", "turn a thinking model's reasoning on or off (Qwen3's enable_thinking)"),
  ('"""', "start and end a multi-line message"),
  ("Ctrl+C", "stop the reply (what was said is kept) or clear the line"),
  ("Ctrl+D, /bye", "exit"),
]


def _seed(value: str) -> int | None:
  return None if value.lower() in ("none", "random", "off") else int(value)


SETTABLE: dict[str, Callable[[str], object]] = {"temperature": float, "top_p": float, "top_k": int, "min_p": float}
SETTABLE |= {"repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float}
SETTABLE |= {"max_tokens": int, "seed": _seed}
VERBOSE_HELP = "Print token counts, TTFT and tok/s after each reply"
WARMUP_HELP = "Capture the common batch shapes in the background while you type (not for piped input)"


# ---- pieces of a reply ---------------------------------------------------------------------------


class ReplyView:
  """Streams one reply to a console: a spinner until the first token, reasoning dimmed on a terminal
  and left out elsewhere (so a pipe gets the answer only)."""

  def __init__(self, console: Console, started: bool = False) -> None:
    self.console, self.splitter = console, ReasoningSplitter(started)
    self.printed = self.thought = False
    self.status = console.status("", spinner="dots") if console.is_terminal else None
    if self.status:
      self.status.start()

  def add(self, delta: str) -> None:
    self._stop_spinner()
    self._print(*self.splitter.feed(delta))

  def close(self) -> None:
    self._stop_spinner()
    self._print(*self.splitter.flush())
    if self.printed:
      self.console.print()

  def _stop_spinner(self) -> None:
    if self.status:
      self.status.stop()
    self.status = None

  def _print(self, reasoning: str, content: str) -> None:
    if reasoning and self.console.is_terminal:
      self.console.print(Text(reasoning, style="dim"), end="", soft_wrap=True)
      self.printed = self.thought = True
    if content:
      self.console.print(Text("\n\n" * self.thought + content), end="", soft_wrap=True)
      self.printed, self.thought = True, False


@dataclass
class ReplyStats:
  prompt_tokens: int
  cached_tokens: int
  generated_tokens: int
  ttft: float | None
  decode_tps: float | None
  finish_reason: str | None

  @staticmethod
  def of(out: RequestOutput, stream: RequestStream) -> ReplyStats:
    n, first, last = len(out.token_ids), stream.first_token_time, stream.finish_time
    tps = (n - 1) / (last - first) if n > 1 and first is not None and last is not None and last > first else None
    return ReplyStats(len(out.prompt_token_ids), out.num_cached_tokens, n, stream.ttft, tps, out.finish_reason)

  def line(self) -> str:
    ttft = "-" if self.ttft is None else f"{self.ttft:.2f} s"
    tps = "-" if self.decode_tps is None else f"{self.decode_tps:.1f} tok/s"
    tokens = f"prompt {self.prompt_tokens} tokens ({self.cached_tokens} cached) · {self.generated_tokens} generated"
    return f"{tokens} · TTFT {ttft} · decode {tps}"


def parse_conversation(data: object) -> tuple[str | None, list[dict]]:
  """(system, messages) from saved JSON; ValueError says what is wrong."""
  if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
    raise ValueError('expected a JSON object with a "messages" list')
  system, messages = data.get("system"), list(data["messages"])
  if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" and system is None:
    system = messages.pop(0).get("content")
  if system is not None and not isinstance(system, str):
    raise ValueError('"system" must be a string or null')
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)):
      raise ValueError(f'message {i} is not {{"role": "user" or "assistant", "content": "..."}}')
  return system, [{"role": m["role"], "content": m["content"]} for m in messages]


# ---- the app -------------------------------------------------------------------------------------


def sampling_line(p: SamplingParams) -> str:
  """The sampling settings in one line; penalties only when set."""
  line = f"temperature {p.temperature} · top_p {p.top_p} · top_k {p.top_k} · min_p {p.min_p}"
  penalties = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
  changed = [f"{name} {getattr(p, name)}" for name, off in penalties.items() if getattr(p, name) != off]
  return " · ".join([line, *changed])


class ChatApp:
  """One chat session: engine loop + conversation + sampling parameters; replies and command output go to
  `console`, notes and errors to `notes` (the same console unless given)."""

  def __init__(
    self,
    engine: LLMEngine,
    loop: EngineLoop,
    console: Console,
    params: SamplingParams,
    *,
    system: str | None = None,
    model_name: str = "",
    verbose: bool = False,
    notes: Console | None = None,
    warmup: BackgroundWarmUp | None = None,
  ) -> None:
    self.engine, self.loop, self.console, self.notes = engine, loop, console, notes or console
    self.params, self.model_name, self.verbose = params, model_name, verbose
    self.warmup = warmup
    self.conv = Conversation(engine, system=system)
    self.last_stats: ReplyStats | None = None
    self.commands = self._command_table()

  def _command_table(self) -> dict[str, Callable[[str], None]]:
    return {
      "/help": self.cmd_help,
      "/?": self.cmd_help,
      "/clear": self.cmd_clear,
      "/system": self.cmd_system,
      "/set": self.cmd_set,
      "/show": self.cmd_show,
      "/stats": self.cmd_stats,
      "/save": self.cmd_save,
      "/load": self.cmd_load,
      "/think": lambda _: self.set_thinking(True),
      "/nothink": lambda _: self.set_thinking(False),
    }

  # ---- input ----
  def run(self, session: PromptSession) -> None:
    while (text := read_message(session)) is not None:
      if not self.handle_input(text):
        return

  def handle_input(self, text: str) -> bool:
    """handle_line, where Ctrl+C outside a streaming reply (tokenizing, a command) drops the unanswered message."""
    try:
      return self.handle_line(text)
    except KeyboardInterrupt:
      self.conv.discard_last_user()
      self.note("[interrupted]")
      return True

  def handle_line(self, text: str) -> bool:
    """Run one message or slash command; False when the chat should end."""
    text = text.strip()
    if text.startswith("/") and "\n" not in text:
      return self.run_command(text)
    if text:
      self.reply(text)
    return True

  def run_command(self, text: str) -> bool:
    """Run one slash command; False when it ends the chat."""
    name, _, arg = text.partition(" ")
    if name.lower() in EXIT_COMMANDS:
      return False
    if (command := self.commands.get(name.lower())) is None:
      self.error(f"unknown command {name}; /help lists the commands")
    else:
      command(arg.strip())
    return True

  # ---- one reply ----
  def reply(self, user_text: str) -> ReplyStats | None:
    """Stream the answer to `user_text`; Ctrl+C (KeyboardInterrupt) stops it and keeps what was said."""
    if (ids := self.fit_context(user_text)) is None:
      return None
    room = self.engine.max_model_len - len(ids)
    params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens, room))
    if self.warmup:  # its queued requests are aborted first: the reply runs alone
      self.warmup.pause()
    try:
      stream = self.loop.submit(ids, params)
      return self._finish(self._stream(stream), stream)
    finally:
      if self.warmup:
        self.warmup.resume()

  def fit_context(self, user_text: str) -> list[int] | None:
    """Prompt ids for the next turn, dropping the oldest turns while prompt + max_tokens exceeds the context."""
    limit = self.engine.max_model_len
    try:
      ids, dropped = self._drop_oldest_turns(user_text)
    except ValueError as e:
      return self.error(e)
    if dropped:
      self.note(f"(dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit the {limit}-token context)")
    if len(ids) >= limit:
      self.conv.discard_last_user()
      message = f"the message needs {len(ids)} tokens but the context holds {limit} (max_model_len); shorten it"
      return self.error(message)
    return ids

  def _drop_oldest_turns(self, user_text: str) -> tuple[list[int], int]:
    """(prompt ids, turns dropped): the oldest turns go while the prompt and a full reply do not fit the context."""
    dropped = 0
    while True:
      ids = self.conv.prompt_ids(user_text)
      too_long = len(ids) + self.params.max_tokens > self.engine.max_model_len
      if not too_long or len(self.conv.messages) <= 1:
        return ids, dropped
      self.conv.discard_last_user()
      dropped += self.conv.drop_oldest_turn()

  def _stream(self, stream: RequestStream) -> RequestOutput:
    """Show the reply as it streams; its final output. Ctrl+C aborts the request and keeps what was shown."""
    view, last = ReplyView(self.console, prompt_opens_reasoning(self.conv.prompt_text)), None
    try:
      for last in stream:
        view.add(last.delta_text)
    except KeyboardInterrupt:
      if last is None or not last.finished:
        self.loop.abort(stream.request_id)
      last = self._drain_aborted(stream, view, last)
    finally:
      view.close()
    return last

  def _drain_aborted(self, stream: RequestStream, view: ReplyView, last: RequestOutput | None) -> RequestOutput:
    """The aborted request's last output; more Ctrl+C meanwhile are ignored."""
    while last is None or not last.finished:
      try:
        for last in stream:
          view.add(last.delta_text)
      except KeyboardInterrupt:
        pass
    return last

  def _finish(self, final: RequestOutput, stream: RequestStream) -> ReplyStats | None:
    """Keep the answer in the conversation (or drop the question), say why it ended, and record its stats."""
    if final.finish_reason == "error":
      self.conv.discard_last_user()
      return self.error(final.error or "the request failed")
    answer = split_reasoning(final.text, prompt_opens_reasoning(self.conv.prompt_text))[1]
    if answer:
      self.conv.add_reply(answer, final.token_ids)
    else:
      self.conv.discard_last_user()
    self._note_ending(final, kept=bool(answer))
    self.last_stats = ReplyStats.of(final, stream)
    if self.verbose:
      self.note(self.last_stats.line())
    return self.last_stats

  def _note_ending(self, final: RequestOutput, kept: bool) -> None:
    if final.finish_reason == "abort":
      self.note("[interrupted]" if kept else "[interrupted; nothing kept]")
    elif final.finish_reason == "length":
      self.note(f"(stopped at {len(final.token_ids)} tokens; /set max_tokens N for longer replies)")

  # ---- commands ----
  def cmd_help(self, _: str) -> None:
    for usage, what in HELP:
      self.console.print(Text.assemble((f"{usage:<24}", "bold"), what), soft_wrap=True)

  def cmd_clear(self, _: str) -> None:
    self.conv.clear()
    self.note("conversation cleared" + (" (system prompt kept)" if self.conv.system else ""))

  def cmd_system(self, arg: str) -> None:
    if arg:
      self.conv.system = arg
      self.note("system prompt set")
    elif self.conv.system:
      self.note(f"system prompt: {self.conv.system}")
    else:
      self.note("no system prompt (/system TEXT sets one)")

  def cmd_set(self, arg: str) -> None:
    name, _, value = arg.partition(" ")
    if name not in SETTABLE or not value.strip():
      return self.error(f"usage: /set {'|'.join(SETTABLE)} VALUE")
    try:
      params = dataclasses.replace(self.params, **{name: SETTABLE[name](value.strip())})
      if params.max_tokens >= self.engine.max_model_len:
        raise ValueError(f"max_tokens must be below the context size {self.engine.max_model_len}")
    except ValueError as e:
      return self.error(f"/set {name}: {e}")
    self.params = params
    self.note(f"{name} = {getattr(params, name)}")

  def cmd_show(self, _: str) -> None:
    for name, value in self._settings():
      self.console.print(Text.assemble((f"{name:<12}", "bold"), value), soft_wrap=True)

  def _settings(self) -> list[tuple[str, str]]:
    """What /show lists: (name, value) rows."""
    mc, p = self.engine.model_config, self.params
    thinking = self.conv.template_kwargs.get("enable_thinking")
    return [
      ("model", f"{self.model_name} · {mc.family}, {mc.num_layers} layers"),
      ("device", str(self.engine.device)),
      ("parameters", f"{sampling_line(p)} · max_tokens {p.max_tokens} · seed {p.seed}"),
      ("defaults", self.engine.default_params_source),
      ("thinking", "template default" if thinking is None else ("on" if thinking else "off")),
      ("system", self.conv.system or "-"),
      ("context", f"{self.context_used()} / {self.engine.max_model_len} tokens used"),
    ]

  def cmd_stats(self, _: str) -> None:
    if self.last_stats is None:
      return self.note("no reply yet")
    stats = self.loop.stats()
    caches = f"kv cache {stats['kv_cache_usage']:.0%} used · prefix cache hit rate {stats['prefix_cache_hit_rate']:.0%}"
    self.console.print(Text(self.last_stats.line()), soft_wrap=True)
    self.console.print(Text(caches), soft_wrap=True)

  def cmd_save(self, arg: str) -> None:
    if not arg:
      return self.error("usage: /save FILE")
    data = {"model": self.model_name, "system": self.conv.system, "messages": self.conv.messages}
    try:
      Path(arg).expanduser().write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
      return self.error(f"/save {arg}: {e.strerror or e}")
    self.note(f"saved {len(self.conv.messages)} messages to {arg}")

  def cmd_load(self, arg: str) -> None:
    if not arg:
      return self.error("usage: /load FILE")
    try:
      system, messages = parse_conversation(json.loads(Path(arg).expanduser().read_text()))
    except OSError as e:
      return self.error(f"/load {arg}: {e.strerror or e}")
    except ValueError as e:
      return self.error(f"/load {arg}: {e}")
    self.conv.load(system, messages)
    self.note(f"loaded {len(messages)} messages from {arg}")

  def set_thinking(self, on: bool) -> None:
    self.conv.template_kwargs["enable_thinking"] = on
    hint = "" if self.engine.model_config.family == "qwen3" else " (this model's chat template may ignore it)"
    self.note(f"thinking {'on' if on else 'off'}{hint}")

  # ---- output ----
  def context_used(self) -> int:
    """Tokens the conversation takes now (the system prompt and all messages, as the template renders them)."""
    messages = self.conv.all_messages()
    if not messages:
      return 0
    kwargs = self.conv.template_kwargs
    return len(self.engine.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, **kwargs))

  def welcome(self) -> None:
    where = f" · {self.model_name} on {self.engine.device} · {self.engine.max_model_len}-token context"
    self.console.print(Text.assemble(("tinyvllm chat", "bold"), where), soft_wrap=True)
    if self.verbose:
      self.note(self.sampling_note())
    self.note(HINTS)

  def sampling_note(self) -> str:
    return f"sampling: {sampling_line(self.params)} (defaults: {self.engine.default_params_source})"

  def loaded_line(self) -> str:
    """What --verbose says once the model is loaded (the welcome came before it)."""
    where = f"{self.model_name} on {self.engine.device} · {self.engine.max_model_len}-token context"
    return f"{where} · {self.sampling_note()}"

  def note(self, msg: str) -> None:
    self.notes.print(Text(msg, style="dim"), soft_wrap=True)

  def error(self, msg: object) -> None:
    self.notes.print(Text.assemble(("error: ", "bold red"), one_line(msg)), soft_wrap=True)


# ---- input ---------------------------------------------------------------------------------------


def read_message(session: PromptSession) -> str | None:
  """One line, or the lines between two \"\"\" marks; None at Ctrl+D. Ctrl+C clears what was typed."""
  while True:
    try:
      line = session.prompt(PROMPT)
      return _read_block(session, line.lstrip().removeprefix(FENCE)) if line.lstrip().startswith(FENCE) else line
    except KeyboardInterrupt:
      continue
    except EOFError:
      return None


def _read_block(session: PromptSession, line: str) -> str:
  lines = []
  while not line.rstrip().endswith(FENCE):
    lines.append(line)
    line = session.prompt(CONTINUATION)
  lines.append(line.rstrip().removesuffix(FENCE))
  return "\n".join(lines).strip()


def prompt_session(
  history: History | None = None, status: Callable[[], str | None] | None = None, **kwargs
) -> PromptSession:
  """A prompt with history; `status` (loading, warm-up progress) joins the grey placeholder while it has a line."""

  def placeholder() -> HTML:
    line = status() if status else None
    text = "Send a message (/help for commands)" + (f" · {line}" if line else "")
    return HTML("<style fg='#888888'>{}</style>").format(text)

  suggest = AutoSuggestFromHistory()
  if status:
    kwargs.setdefault("refresh_interval", 0.5)
  return PromptSession(history=history or _history(), auto_suggest=suggest, placeholder=placeholder, **kwargs)


def _history() -> History:
  path = models.tinyvllm_home() / "chat_history"
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return FileHistory(str(path))
  except OSError:
    return InMemoryHistory()


# ---- the command ---------------------------------------------------------------------------------


def new_engine(path: Path, **engine_kwargs) -> LLMEngine:
  from tinyvllm_core import LLMEngine

  # unset options take the engine's defaults; quantize=None is `--quantize none` (a GGUF dequantized), not unset
  return LLMEngine(path, **{k: v for k, v in engine_kwargs.items() if v is not None or k == "quantize"})


def load_engine(model: str | None, **engine_kwargs) -> tuple[LLMEngine, str]:
  """(engine, model label), with a spinner on stderr; a missing or bad model is one error line."""
  try:
    path = models.resolve_model(model)
    label = model or _default_label(path)
    with err.status(f"loading {label} ..."):
      return new_engine(path, **engine_kwargs), label
  except (models.ModelNotFoundError, ValueError, OSError) as e:
    fail(e)


def _resolve(model: str | None) -> tuple[Path, str]:
  """(model path, label); a missing model is one error line, before the prompt shows."""
  try:
    path = models.resolve_model(model)
  except (models.ModelNotFoundError, ValueError, OSError) as e:
    fail(e)
  return path, model or _default_label(path)


def _default_label(path: Path) -> str:
  pulled = models.last_pulled()
  return pulled[0] if pulled and pulled[1] == path else f"{models.EMBEDDED_ALIAS} ({path.name})"


def _piped_message() -> str:
  try:
    text = sys.stdin.read().strip()
  except (OSError, UnicodeDecodeError) as e:
    fail(f"cannot read stdin: {e}")
  if not text:
    fail('stdin is empty; pipe a message (echo "hi" | tinyvllm chat) or run tinyvllm chat in a terminal')
  return text


class Startup:
  """Builds the ChatApp (model load, engine loop, background warm-up) on a thread of its own while the prompt takes
  the first message; `app()` waits for it with a spinner, and a failed load is one error line then."""

  def __init__(self, build: Callable[[], ChatApp], label: str) -> None:
    self.label = label
    self._app: ChatApp | None = None
    self._error: BaseException | None = None
    self._done = threading.Event()
    threading.Thread(target=self._run, args=(build,), name="tinyvllm-startup", daemon=True).start()

  def _run(self, build: Callable[[], ChatApp]) -> None:
    try:
      self._app = build()
    except Exception as e:
      self._error = e
    finally:
      self._done.set()

  def status(self) -> str | None:
    """The prompt's status: loading, the warm-up's progress, a failed load, or None when all is done."""
    if not self._done.is_set():
      return "loading the model ..."  # the welcome line above the prompt names it
    if self._error is not None:
      return f"loading failed: {one_line(self._error)}"
    return self._app.warmup.progress() if self._app.warmup else None

  def app(self) -> ChatApp:
    if not self._done.is_set():
      with err.status(f"loading {self.label} ..."):
        self._done.wait()
    if self._error is not None:
      fail(self._error)
    return self._app

  def shutdown(self) -> None:
    """Stop the warm-up and the engine loop once the app is built; a load still running is left to the exit."""
    if self._app is None:
      return
    if self._app.warmup:
      self._app.warmup.stop()
    self._app.loop.shutdown()


def chat(
  model: ModelOption = None,
  device: DeviceOption = None,
  system: Annotated[str | None, typer.Option(help="System prompt")] = None,
  temperature: Annotated[float | None, typer.Option(help="0 = greedy (default: the model's generation_config)")] = None,
  top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass in (0, 1]")] = None,
  top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest tokens (0 = off)")] = None,
  min_p: Annotated[
    float | None, typer.Option(help="Drop tokens below this share of the likeliest one's probability")
  ] = None,
  repeat_penalty: Annotated[
    float | None, typer.Option(help="Repetition penalty over prompt and reply (1 = off)")
  ] = None,
  max_tokens: Annotated[int, typer.Option(help="Longest reply in tokens")] = 512,
  seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling")] = None,
  verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
  kv_cache_gb: OptionalKvCacheGbOption = None,
  max_model_len: MaxModelLenOption = None,
  quantize: QuantizeOption = None,
  dtype: DtypeOption = "auto",
  beam: BeamOption = 0,
  num_speculative_tokens: SpeculativeOption = 0,
  warmup: Annotated[bool, typer.Option(help=WARMUP_HELP)] = True,
) -> None:
  """Chat with a model in the terminal (/help lists the commands). Piped input is answered once:
  echo "What is the capital of France?" | tinyvllm chat"""
  overrides = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p, "seed": seed}
  overrides["repetition_penalty"] = repeat_penalty
  overrides = {name: value for name, value in overrides.items() if value is not None}
  _check_settings(max_tokens, overrides, dtype)  # bad values fail before the model loads
  piped = None if sys.stdin.isatty() else _piped_message()
  try:
    check_dtype_compiles(dtype, device)
  except ValueError as e:
    fail(e)
  engine_kwargs = dict(device=device, kv_cache_gb=kv_cache_gb, max_model_len=max_model_len, dtype=dtype)
  engine_kwargs |= dict(quantize=quantize_setting(quantize), beam=beam or None)
  engine_kwargs |= dict(num_speculative_tokens=num_speculative_tokens)
  settings = dict(system=system, verbose=verbose, max_tokens=max_tokens, overrides=overrides)
  if piped is not None:
    _answer_piped(piped, model, engine_kwargs, settings)
    return
  path, label = _resolve(model)

  def build() -> ChatApp:
    engine = new_engine(path, **engine_kwargs)
    return _build_app(engine, label, settings, warmup=warmup, notes=out)

  startup = Startup(build, label)
  try:
    _chat_at_prompt(startup)
  finally:
    startup.shutdown()


def _build_app(engine: LLMEngine, label: str, settings: dict, warmup: bool, notes: Console) -> ChatApp:
  """The app on a started engine loop; with `warmup`, a background warm-up led by these params' shapes."""
  from tinyvllm_core import EngineLoop

  max_tokens, overrides = settings["max_tokens"], settings["overrides"]
  params = dataclasses.replace(engine.default_params, max_tokens=max_tokens, **overrides)
  loop = EngineLoop(engine)
  background = None
  if warmup:
    background = BackgroundWarmUp(loop, params, prompt_len=first_prompt_len(engine)).start()
  system, verbose = settings["system"], settings["verbose"]
  return ChatApp(
    engine, loop, out, params, system=system, model_name=label, verbose=verbose, notes=notes, warmup=background
  )


def _answer_piped(piped: str, model: str | None, engine_kwargs: dict, settings: dict) -> None:
  """Answer the piped message once; exit code 1 when that fails."""
  engine, label = load_engine(model, **engine_kwargs)
  app = _build_app(engine, label, settings, warmup=False, notes=err)
  try:
    if app.reply(piped) is None:
      raise typer.Exit(1)
  finally:
    app.loop.shutdown()


def _check_settings(max_tokens: int, overrides: dict, dtype: str) -> None:
  from tinyvllm_core import SamplingParams

  try:
    SamplingParams(max_tokens=max_tokens, **overrides)
    check_dtype(dtype)
  except ValueError as e:
    fail(e)


def _chat_at_prompt(startup: Startup) -> None:
  """The prompt shows at once; the first message waits for the load, then the chat goes on until the user leaves."""
  out.print(Text.assemble(("tinyvllm chat", "bold"), f" · {startup.label}"), soft_wrap=True)
  out.print(Text(HINTS, style="dim"), soft_wrap=True)
  session = prompt_session(status=startup.status)
  if (text := read_message(session)) is None:
    return
  try:
    app = startup.app()
  except KeyboardInterrupt:
    raise typer.Exit(130) from None
  if app.verbose:
    app.note(app.loaded_line())
  for note in app.engine.files.notes:  # what was dequantized at load, a context the KV budget capped
    app.note(note)
  if app.handle_input(text):
    app.run(session)
