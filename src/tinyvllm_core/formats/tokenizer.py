"""Tokenizers built from GGUF metadata, and chat templates rendered with jinja2."""

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

# GGUF tokenizer.ggml.pre -> regex split before byte-level BPE; the two differ only in how digits group
_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|DIGITS| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLIT = {"llama-bpe": _SPLIT.replace("DIGITS", r"\p{N}{1,3}"), "qwen2": _SPLIT.replace("DIGITS", r"\p{N}")}


NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # GGUF token types


def gguf_tokenizer(kv: dict, path: Path):
  """A tokenizers.Tokenizer from the GGUF metadata: byte-level BPE ('gpt2': vocab, merges, pre-tokenizer) or
  SentencePiece ('llama': ▁ for spaces, byte fallback, merges ranked by the merged piece's score), special tokens."""
  from tokenizers import AddedToken

  kind = kv.get("tokenizer.ggml.model")
  if kind not in ("gpt2", "llama"):
    raise ConfigError(
      f"{path}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' or SentencePiece 'llama')"
    )
  tokens = kv["tokenizer.ggml.tokens"]
  tok = _byte_level_bpe(kv) if kind == "gpt2" else _sentencepiece(kv)
  types = kv.get("tokenizer.ggml.token_type", [])
  special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (3, 4)]
  tok.add_special_tokens(special)
  add_bos = kv.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for SentencePiece: add it
  if add_bos and "tokenizer.ggml.bos_token_id" in kv:
    tok.post_processor = _bos_processor(tokens, kv["tokenizer.ggml.bos_token_id"])
  return tok


def _byte_level_bpe(kv: dict):
  from tokenizers import Tokenizer, decoders, models

  tokens = kv["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in kv.get("tokenizer.ggml.merges", [])]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = _pre_tokenizer(kv.get("tokenizer.ggml.pre", "gpt2"))
  tok.decoder = decoders.ByteLevel()
  return tok


def _sentencepiece(kv: dict):
  """As transformers' LlamaConverter builds it: BPE with byte fallback over the whole text, spaces as ▁ (and one
  before the text when add_space_prefix), decoded back with the prefix space stripped."""
  from tokenizers import Tokenizer, decoders, models, normalizers

  tokens = kv["tokenizer.ggml.tokens"]
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = tokens[kv.get("tokenizer.ggml.unknown_token_id", 0)]
  merges = _sentencepiece_merges(tokens, kv.get("tokenizer.ggml.scores"), kv.get("tokenizer.ggml.token_type"), vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  prefix = kv.get("tokenizer.ggml.add_space_prefix", True)
  tok.normalizer = normalizers.Sequence(
    [*([normalizers.Prepend("▁")] if prefix else []), normalizers.Replace(" ", "▁")]
  )
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  return tok


def _sentencepiece_merges(tokens: list[str], scores, types, vocab: dict[str, int]) -> list[tuple[str, str]]:
  """Every split of a normal piece into two pieces of the vocab is a merge, ranked by the merged piece's score
  (SentencePiece BPE merges the pair whose result scores highest), ties by id."""
  scores = scores or [0.0] * len(tokens)
  types = types or [NORMAL] * len(tokens)
  ranked = []
  for piece_id, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
    if kind != NORMAL:
      continue
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        ranked.append((-score, piece_id, vocab[left], vocab[right], left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def _pre_tokenizer(pre: str):
  from tokenizers import Regex, pre_tokenizers

  splits = [pre_tokenizers.Split(Regex(_PRE_SPLIT[pre]), "isolated")] if pre in _PRE_SPLIT else []
  if pre == "smollm":
    splits = [pre_tokenizers.Digits(individual_digits=True)]
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _PRE_SPLIT)
  return pre_tokenizers.Sequence([*splits, byte_level])


def _bos_processor(tokens: list[str], bos_id: int):
  from tokenizers import processors

  bos = tokens[bos_id]
  return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])


def render_chat(
  template: str | None,
  messages: list[dict],
  special_tokens: dict[str, str],
  add_generation_prompt: bool = True,
  **kwargs,
) -> str:
  """The model's own chat template (jinja2, sandboxed, as transformers renders it)."""
  import jinja2.sandbox

  if not template:
    raise ConfigError("this model has no chat template; send a plain prompt instead")

  def raise_exception(msg: str):
    raise ValueError(f"chat template: {msg}")

  def tojson(x, indent=None, ensure_ascii=False):
    return json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
  )
  env.globals["raise_exception"] = raise_exception
  env.filters["tojson"] = tojson
  variables = {"bos_token": "", "eos_token": "", **special_tokens, **kwargs}
  try:
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.TemplateError as e:
    raise ConfigError(f"chat template failed to render ({e})") from None


def stop_holdback(text: str, stops: list[str] | tuple[str, ...]) -> int:
  """How many trailing characters of text could still grow into one of the stop strings (held back from a stream)."""
  tails = (k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:]))
  return max(tails, default=0)


@dataclass
class Detokenizer:
  """Incremental decoding that never emits half of a multi-byte character, nor the start of a stop string."""

  text: str = ""
  emitted: int = 0  # characters of text already streamed
  prefix_offset: int = 0
  read_offset: int = 0

  def update(self, tokenizer, ids: list[int]) -> None:
    prefix = tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[self.prefix_offset :], skip_special_tokens=True)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
      return
    self.prefix_offset, self.read_offset = self.read_offset, len(ids)
    self.text += full[len(prefix) :]

  def take(self, stops: list[str] | tuple[str, ...] = ()) -> str:
    """The text not streamed yet, less its longest tail that could still grow into one of the stop strings."""
    delta = self.text[self.emitted : len(self.text) - stop_holdback(self.text, stops)]
    self.emitted += len(delta)
    return delta

  def find_stop(self, stops: list[str]) -> int | None:
    """Where the first stop string starts in the text not streamed yet."""
    hits = (i for s in stops if (i := self.text.find(s, self.emitted)) >= 0)
    return min(hits, default=None)
