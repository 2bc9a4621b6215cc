"""A chat history whose next prompt starts with the exact tokens the model already saw and generated,
so every turn is served from the prefix cache (re-tokenizing a reply can give other ids than were sampled)."""

from __future__ import annotations
from dataclasses import dataclass, field


@dataclass
class Conversation:
  engine: object  # LLMEngine: apply_chat_template, encode, decode, eos_token_ids
  system: str | None = None
  messages: list[dict] = field(default_factory=list)
  template_kwargs: dict = field(default_factory=dict)
  _prefix_text: str = ""  # rendered conversation text that _prefix_ids stand for
  _prefix_ids: list[int] = field(default_factory=list)
  _prompt: tuple[str, list[int]] = ("", [])

  def all_messages(self, extra: list[dict] = ()) -> list[dict]:
    return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages + list(extra)

  def prompt_ids(self, user_text: str) -> list[int]:
    """Token ids for the next turn; call add_reply (or discard) afterwards."""
    text = self._render(self.all_messages([{"role": "user", "content": user_text}]), generation_prompt=True)
    if self._prefix_ids and text.startswith(self._prefix_text):
      new_text = text.removeprefix(self._prefix_text)
      ids = self._prefix_ids + self.engine.encode(new_text, add_special_tokens=False)
    else:
      ids = self.engine.encode(text, add_special_tokens=False)
    self.messages.append({"role": "user", "content": user_text})
    self._prompt = (text, ids)
    return ids

  @property
  def prompt_text(self) -> str:
    """The rendered text of the last prompt_ids call."""
    return self._prompt[0]

  def add_reply(self, text: str, generated_ids: list[int]) -> None:
    ids = list(generated_ids)
    while ids and ids[-1] in self.engine.eos_token_ids:
      ids.pop()
    self.messages.append({"role": "assistant", "content": text})
    rendered = self._render(self.all_messages(), generation_prompt=False)
    prompt_text, prompt_ids = self._prompt
    if rendered.startswith(prompt_text + text) and self.engine.decode(ids) == text:
      self._prefix_text, self._prefix_ids = prompt_text + text, prompt_ids + ids
    else:
      self._prefix_text, self._prefix_ids = "", []

  def _render(self, messages: list[dict], generation_prompt: bool) -> str:
    """The chat template's text for `messages` (ending with the assistant's header when `generation_prompt`)."""
    kwargs = self.template_kwargs
    return self.engine.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)

  def discard_last_user(self) -> None:
    """The reply was interrupted or failed: forget the unanswered user turn."""
    if self.messages and self.messages[-1]["role"] == "user":
      self.messages.pop()

  def clear(self) -> None:
    self.messages.clear()
    self._prefix_text, self._prefix_ids = "", []

  def load(self, system: str | None, messages: list[dict]) -> None:
    self.clear()
    self.system, self.messages = system, [dict(m) for m in messages]

  def drop_oldest_turn(self) -> bool:
    """Forget the oldest user message and the replies after it (never the system prompt); False when empty."""
    if not self.messages:
      return False
    end = next((i for i, m in enumerate(self.messages) if i and m["role"] == "user"), len(self.messages))
    del self.messages[:end]
    return True

  def num_prompt_tokens(self) -> int:
    return len(self._prefix_ids)
