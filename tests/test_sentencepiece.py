"""GGUF SentencePiece tokenizers ('llama': Llama 2, Mistral, TinyLlama) built with the tokenizers library, against
the sentencepiece library itself on a model it trains (the GGUF metadata written as llama.cpp's converter writes it
from tokenizer.model)."""

import io
from pathlib import Path

import pytest
from tinyvllm_core.formats.tokenizer import gguf_tokenizer

spm = pytest.importorskip("sentencepiece", reason="the SentencePiece oracle needs `pip install sentencepiece`")

CORPUS = [
  "The quick brown fox jumps over the lazy dog.",
  "Paris is the capital of France; Berlin is the capital of Germany.",
  "In 2024, 37 of 1,024 tests failed (3.6%).",
  "Tokenizers split text into pieces: words, sub-words and bytes.",
  "Mixed   spaces,\ttabs and\nnew lines.",
  "Unicode: café, naïve, Straße, Ελληνικά, 日本語, emoji 🙂.",
] * 20
AWKWARD = [
  "Hello world",
  " leading space",
  "trailing space ",
  "two  spaces and   three",
  "digits 1234567890 and 3.14159",
  "tabs\tand\nnewlines\n\n",
  "unseen bytes: ☃ ✓ 🚀 ∑ 中文",
  "café naïve Straße",
  "",
]
# sentencepiece's piece kinds -> GGUF token types (llama.cpp: normal 1, unknown 2, control 3, byte 6)
UNKNOWN, CONTROL, BYTE, NORMAL = 2, 3, 6, 1


@pytest.fixture(scope="module")
def trained():
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_writer=model,
    vocab_size=600,
    model_type="bpe",
    byte_fallback=True,
    character_coverage=1.0,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    minloglevel=2,
  )
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def gguf_metadata(sp) -> dict:
  """What llama.cpp's convert_hf_to_gguf.py writes for a tokenizer.model."""
  ids = range(sp.get_piece_size())

  def kind(i):
    if sp.is_unknown(i):
      return UNKNOWN
    if sp.is_control(i):
      return CONTROL
    return BYTE if sp.is_byte(i) else NORMAL

  return {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids],
    "tokenizer.ggml.scores": [sp.get_score(i) for i in ids],
    "tokenizer.ggml.token_type": [kind(i) for i in ids],
    "tokenizer.ggml.bos_token_id": sp.bos_id(),
    "tokenizer.ggml.eos_token_id": sp.eos_id(),
    "tokenizer.ggml.unknown_token_id": sp.unk_id(),
  }


def test_sentencepiece_gguf_tokenizer_agrees_with_sentencepiece(trained):
  tok = gguf_tokenizer(gguf_metadata(trained), Path("m.gguf"))
  for text in AWKWARD + CORPUS[:6]:
    want = trained.encode(text)
    got = tok.encode(text, add_special_tokens=False).ids
    assert got == want, (text, [trained.id_to_piece(i) for i in got], [trained.id_to_piece(i) for i in want])
    assert tok.decode(got) == trained.decode(want) == text  # round trip, byte fallback included


def test_sentencepiece_gguf_tokenizer_adds_bos_by_default(trained):
  tok = gguf_tokenizer(gguf_metadata(trained), Path("m.gguf"))
  assert tok.encode("Hello").ids == [trained.bos_id(), *trained.encode("Hello")]
  no_bos = gguf_tokenizer(gguf_metadata(trained) | {"tokenizer.ggml.add_bos_token": False}, Path("m.gguf"))
  assert no_bos.encode("Hello").ids == trained.encode("Hello")
