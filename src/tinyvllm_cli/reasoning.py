"""A thinking model's reasoning (`<think>...</think>`, as Qwen3 writes it) apart from its answer, whole or streamed.

One think block, at the start of the reply: a `<think>` later in the answer is answer text. Some templates
(Qwen3-2507 thinking, DeepSeek-R1) open the block in the generation prompt itself, so the reply starts inside it
with no opening tag: pass `started=prompt_opens_reasoning(prompt)` to know that while streaming. Reasoning is
stripped of the whitespace around it, and the answer of the whitespace that follows `</think>`."""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_START, _REASONING, _CONTENT = "start", "reasoning", "content"


def has_reasoning(chat_template: str | None) -> bool:
  """Whether the chat template knows think blocks (Qwen3, DeepSeek-R1): only then is a reply split."""
  return bool(chat_template) and THINK_OPEN in chat_template


def prompt_opens_reasoning(prompt: str) -> bool:
  """Whether the rendered prompt ends inside an open think block (the reply starts with reasoning, untagged)."""
  head, opened, tail = prompt.rpartition(THINK_OPEN)
  return bool(opened) and THINK_CLOSE not in tail


def split_reasoning(text: str, started: bool = False) -> tuple[str | None, str]:
  """(reasoning, content) of a whole reply; reasoning is None when the reply has none. Text before a `</think>`
  with no `<think>` before it is reasoning too (the prompt opened the block); a reply cut off while thinking has
  no content yet."""
  if not started and text.lstrip().startswith(THINK_OPEN):
    started, text = True, text.lstrip().removeprefix(THINK_OPEN)
  head, closed, tail = text.partition(THINK_CLOSE)
  if closed and (started or THINK_OPEN not in head):
    return head.strip(), tail.lstrip()
  return (text.strip(), "") if started else (None, text)


def _partial_tag(text: str, tag: str) -> int:
  """How many trailing characters of text are the start of tag (held back until the next delta says)."""
  return next((n for n in range(len(tag) - 1, 0, -1) if text.endswith(tag[:n])), 0)


class ReasoningSplitter:
  """Streamed reply text -> (reasoning delta, content delta). Whatever could still become a tag, and reasoning's
  trailing whitespace, is held back; the deltas joined equal split_reasoning of the whole text, except for a
  `</think>` with no opening tag when not `started` (streamed as content: it cannot be taken back)."""

  def __init__(self, started: bool = False) -> None:
    self._state = _REASONING if started else _START
    self._strip = started  # drop the whitespace that opens the reasoning, or the content after </think>
    self._held = ""

  def feed(self, delta: str) -> tuple[str, str]:
    text, self._held = self._held + delta, ""
    if self._state == _START and not (text := self._open(text)):
      return "", ""
    reasoning = ""
    if self._state == _REASONING:
      reasoning, text = self._reason(text)
    return reasoning, self._lead(text) if self._state == _CONTENT else ""

  def flush(self) -> tuple[str, str]:
    held, self._held = self._held, ""
    if self._state == _START:
      self._state = _CONTENT
      return "", held
    if self._state == _REASONING:
      return self._lead(held).rstrip(), ""
    return "", ""

  def _open(self, text: str) -> str:
    """Decide from the reply's start whether it opens a think block; the text left to handle ("" while undecided)."""
    body = text.lstrip()
    if body.startswith(THINK_OPEN):
      self._state, self._strip = _REASONING, True
      return body.removeprefix(THINK_OPEN)
    if THINK_OPEN.startswith(body):
      self._held = text
      return ""
    self._state = _CONTENT
    return text

  def _reason(self, text: str) -> tuple[str, str]:
    """(reasoning to emit, content text after a `</think>`)."""
    head, closed, tail = text.partition(THINK_CLOSE)
    if closed:
      reasoning = self._lead(head).rstrip()
      self._state, self._strip = _CONTENT, True
      return reasoning, tail
    cut = len(text) - _partial_tag(text, THINK_CLOSE)
    body = text[:cut].rstrip()
    self._held = text[len(body) :]
    return self._lead(body), ""

  def _lead(self, text: str) -> str:
    if self._strip:
      text = text.lstrip()
      self._strip = not text
    return text
