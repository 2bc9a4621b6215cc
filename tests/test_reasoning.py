"""The <think> splitter shared by `tinyvllm chat` and serve-lite: whole replies, streamed ones in any chunking."""

import io
import random

import pytest
from rich.console import Console

from tinyvllm_cli.chat import ReplyView
from tinyvllm_cli.reasoning import ReasoningSplitter, has_reasoning, prompt_opens_reasoning, split_reasoning

QWEN3_GENERATION = "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is defined and "
QWEN3_GENERATION += "enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"


def test_a_whole_reply_is_split():
  assert split_reasoning("<think>\nhmm, 2+2\n</think>\n\n4") == ("hmm, 2+2", "4")
  assert split_reasoning("\n<think>still thinking") == ("still thinking", "")
  assert split_reasoning("plain answer ") == (None, "plain answer ")
  assert split_reasoning("<think></think>answer") == ("", "answer")
  assert split_reasoning("use <think> tags") == (None, "use <think> tags")
  assert split_reasoning("a</think>b", started=False) == ("a", "b")  # the prompt opened the block
  assert split_reasoning("I said <think>x</think> y") == (None, "I said <think>x</think> y")


def test_a_reply_that_starts_inside_the_think_block():
  assert split_reasoning("\nweighing it\n</think>\n\nyes", started=True) == ("weighing it", "yes")
  assert split_reasoning("cut off mid-thought", started=True) == ("cut off mid-thought", "")
  assert split_reasoning("</think>\n\nyes", started=True) == ("", "yes")
  assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
  assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_templates_that_know_think_blocks():
  assert has_reasoning("{{ '<think>\\n' + reasoning_content }}" + QWEN3_GENERATION)
  assert not has_reasoning("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}")
  assert not has_reasoning(None)


def stream(text: str, started: bool, rng: random.Random) -> tuple[str, str]:
  splitter, reasoning, content, i = ReasoningSplitter(started), "", "", 0
  while i < len(text):
    n = rng.randint(1, 9)
    r, c = splitter.feed(text[i : i + n])
    reasoning, content, i = reasoning + r, content + c, i + n
  r, c = splitter.flush()
  return reasoning + r, content + c


REPLIES = [
  ("<think>\nThe user greets me. <b> is fine </th\n</think>\n\nHello <think> there!", False),
  ("  \n<think>\n\n  cut off  \n", False),
  ("<think>x</think>", False),
  ("<thin", False),
  ("<thinking>is not a tag</thinking>", False),
  ("\n\n", False),
  ("", False),
  ("plain answer with </think> inside", False),
  ("\nweighing it </thin \n</think>\n\n  yes\n", True),
  ("cut off mid-thought </thi", True),
  ("</think>", True),
]


@pytest.mark.parametrize("text,started", REPLIES)
def test_streamed_in_any_chunking_equals_the_whole(text, started):
  reasoning, content = split_reasoning(text, started)
  if "</think>" in text and not started and not text.lstrip().startswith("<think>"):
    reasoning, content = None, text  # a stream cannot take back what it sent as content
  rng = random.Random(text)
  for _ in range(30):
    assert stream(text, started, rng) == (reasoning or "", content)


def test_a_partial_tag_is_held_back_until_it_is_whole():
  splitter = ReasoningSplitter()
  assert splitter.feed("\n<thi") == ("", "")
  assert splitter.feed("nk>\nab") == ("ab", "")
  assert splitter.feed(" </") == ("", "")
  assert splitter.feed("think>\n\nan") == ("", "an")
  assert splitter.feed("swer <") == ("", "swer <")
  assert splitter.flush() == ("", "")


def test_chat_prints_an_untagged_reply_after_the_prompt_opened_thinking():
  for terminal, expected in ((False, "Hello!\n"), (True, "\x1b[2Kweighing it\n\nHello!\n")):
    screen = io.StringIO()
    view = ReplyView(Console(file=screen, width=80, force_terminal=terminal, color_system=None), started=True)
    for delta in ["\nweigh", "ing it\n</th", "ink>\n\nHel", "lo!"]:
      view.add(delta)
    view.close()
    assert screen.getvalue().endswith(expected)
