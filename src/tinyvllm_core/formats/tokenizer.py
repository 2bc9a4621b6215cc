"""Tokenizers built from GGUF metadata, and chat templates rendered with jinja2."""

import json
from pathlib import Path

from ..config import ConfigError

# GGUF tokenizer.ggml.pre -> regex split before byte-level BPE; the two differ only in how digits group
_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|DIGITS| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLIT = {"llama-bpe": _SPLIT.replace("DIGITS", r"\p{N}{1,3}"), "qwen2": _SPLIT.replace("DIGITS", r"\p{N}")}


def gguf_tokenizer(kv: dict, path: Path):
  """A byte-level BPE tokenizers.Tokenizer from the GGUF metadata (vocab, merges, pre-tokenizer, special tokens)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models

  if kv.get("tokenizer.ggml.model") != "gpt2":
    found = kv.get("tokenizer.ggml.model")
    raise ConfigError(
      f"{path}: GGUF tokenizer model {found!r} is not supported (byte-level BPE 'gpt2' only); use the HF checkpoint"
    )
  tokens = kv["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in kv.get("tokenizer.ggml.merges", [])]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = _pre_tokenizer(kv.get("tokenizer.ggml.pre", "gpt2"))
  tok.decoder = decoders.ByteLevel()
  types = kv.get("tokenizer.ggml.token_type", [])
  special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (3, 4)]
  tok.add_special_tokens(special)
  if kv.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in kv:
    tok.post_processor = _bos_processor(tokens, kv["tokenizer.ggml.bos_token_id"])
  return tok


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
