"""Time from starting `tinyvllm chat` on a terminal until its prompt appears, then the first reply's timings.

Runs the real command on a pseudo-terminal (so chat sees a terminal, as a user's would), answers prompt_toolkit's
cursor-position queries, waits for the `>>> ` prompt, sends one message at once (the reply waits for what it needs:
the load, the shapes it uses) and /bye. `tinyvllm chat -v` prints the reply's TTFT, counted from its submit.
A cold start points tinygrad's disk cache (CACHEDB) and pocl's kernel cache (POCL_CACHE_DIR, for tinygrad's CL
device on pocl) at new, empty places, so every kernel is compiled again; a warm start uses the caches as they are.

  python3 scripts/time_to_prompt.py                    # warm: the kernels are in ~/.cache/tinygrad/cache.db
  python3 scripts/time_to_prompt.py --cold             # cold: a fresh CACHEDB in a temporary folder
  python3 scripts/time_to_prompt.py --cold --then-warm  # cold, then warm on the cache the cold run filled
  python3 scripts/time_to_prompt.py -- --no-warmup      # arguments after -- go to tinyvllm chat
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

PROMPT = ">>> "
CURSOR_QUERY = b"\x1b[6n"
CURSOR_ANSWER = b"\x1b[1;1R"
STATS = re.compile(r"prompt \d+ tokens")
TTFT = re.compile(r"TTFT ([0-9.]+ s|-)")
BRAILLE = re.compile("[\u2800-\u28ff]")  # spinner frames
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]|\r")


@dataclass
class Timings:
  prompt_s: float | None = None
  ttft: str = "-"  # chat's own TTFT line: from the reply's submit (after the load) to its first token
  reply_s: float | None = None
  exit_s: float | None = None
  reply: str = ""


class Terminal:
  """A child process on a pseudo-terminal; `wait_for` reads its output until a pattern shows."""

  def __init__(self, argv: list[str], env: dict[str, str]) -> None:
    self.pid, self.fd = pty.fork()
    if self.pid == 0:
      os.execvpe(argv[0], argv, env)
    self.raw = b""

  def text(self) -> str:
    return ANSI.sub("", self.raw.decode("utf-8", "replace"))

  def read(self, timeout: float) -> bool:
    """Read what is there within timeout seconds; False when the child closed its terminal."""
    ready, _, _ = select.select([self.fd], [], [], timeout)
    if not ready:
      return True
    try:
      chunk = os.read(self.fd, 65536)
    except OSError:
      return False
    if not chunk:
      return False
    if CURSOR_QUERY in chunk:
      os.write(self.fd, CURSOR_ANSWER * chunk.count(CURSOR_QUERY))
    self.raw += chunk
    return True

  def wait_for(self, found, timeout: float) -> bool:
    """Read until found(text) is true; False when the child ended or timeout seconds passed first."""
    deadline = time.perf_counter() + timeout
    while not found(self.text()):
      left = deadline - time.perf_counter()
      if left <= 0 or not self.read(min(left, 0.05)):
        return found(self.text())
    return True

  def send(self, line: str) -> None:
    os.write(self.fd, (line + "\r").encode())

  def close(self) -> int:
    try:
      while self.read(0.5):
        pass
    finally:
      _, status = os.waitpid(self.pid, 0)
    return os.waitstatus_to_exitcode(status)


def measure(chat_args: list[str], env: dict[str, str], message: str, timeout: float, delay: float = 0) -> Timings:
  """One start of `tinyvllm chat`: seconds to the prompt, to the reply's first token, to the next prompt, to exit."""
  timings = Timings()
  start = time.perf_counter()
  term = Terminal([sys.executable, "-m", "tinyvllm_cli", "chat", "--verbose", *chat_args], env)
  if not term.wait_for(lambda text: PROMPT in text, timeout):
    term.close()
    raise SystemExit(f"no prompt within {timeout:.0f} s; the output was:\n{term.text()[-2000:]}")
  timings.prompt_s = time.perf_counter() - start
  term.wait_for(lambda text: False, delay)  # a user who reads first: the warm-up goes on meanwhile
  before = term.text().count(PROMPT)
  asked = time.perf_counter()
  term.send(message)
  term.wait_for(lambda text: text.count(PROMPT) > before and TTFT.search(text), timeout)
  timings.reply_s = time.perf_counter() - asked
  text = term.text()
  timings.ttft = TTFT.search(text)[1]
  before_stats = text[: STATS.search(text).start()]
  lines = [line for line in before_stats.splitlines() if line.strip() and not BRAILLE.search(line)]
  lines = [line for line in lines if not line.startswith("(")]  # chat's notes
  timings.reply = lines[-1] if lines else ""
  left = time.perf_counter()
  term.send("/bye")
  term.close()
  timings.exit_s = time.perf_counter() - left
  return timings


def report(label: str, t: Timings, delay: float) -> None:
  print(f"{label}: prompt after {t.prompt_s:.2f} s", flush=True)
  print(
    f"  first message sent {delay:.0f} s after the prompt: reply done after {t.reply_s:.2f} s (chat's TTFT {t.ttft})",
    flush=True,
  )
  print(f"  exit after /bye: {t.exit_s:.2f} s", flush=True)
  print(f"  reply (its last line): {t.reply[:300]!r}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cold", action="store_true", help="start on empty kernel caches (CACHEDB, POCL_CACHE_DIR)")
  parser.add_argument("--then-warm", action="store_true", help="after a cold start, start again on the cache it filled")
  parser.add_argument("--message", default="What is the capital of France?", help="the first message sent")
  parser.add_argument("--delay", type=float, default=0.0, help="seconds at the prompt before the message is sent")
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each step")
  parser.add_argument("chat_args", nargs="*", help="arguments for tinyvllm chat (after --)")
  args = parser.parse_args()
  env = dict(os.environ, TERM=os.environ.get("TERM", "xterm"), COLUMNS="120", LINES="40")
  folder = tempfile.mkdtemp(prefix="tinyvllm-ttp-") if args.cold else None
  try:
    if folder:
      env["CACHEDB"] = os.path.join(folder, "cache.db")
      env["POCL_CACHE_DIR"] = os.path.join(folder, "pocl")
    label = "cold (fresh CACHEDB and POCL_CACHE_DIR)" if folder else f"warm ({env.get('CACHEDB', 'the default cache')})"
    report(label, measure(args.chat_args, env, args.message, args.timeout, args.delay), args.delay)
    if folder and args.then_warm:
      report(
        "warm (the cache the cold start filled)",
        measure(args.chat_args, env, args.message, args.timeout, args.delay),
        args.delay,
      )
  finally:
    if folder:
      shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  main()
