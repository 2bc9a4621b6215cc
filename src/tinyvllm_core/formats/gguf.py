"""GGUF files, one reader for all of them: metadata and tensor table, quantized blocks memory-mapped as stored
(gguf_blocks.py), float tensors memory-mapped, every other type dequantized by the gguf package that llama.cpp
maintains; a file split in parts (NAME-00001-of-00003.gguf) is read whole."""

import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import ConfigError, ModelConfig
from .gguf_blocks import GGUF_BLOCK_ELEMENTS, GGUF_BLOCKS
from .rope import RopeScaling

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_NAMES = {
  "embed": "token_embd.weight",
  "norm": "output_norm.weight",
  "lm_head": "output.weight",
  "o": "blk.{i}.attn_output.weight",
  **{k: f"blk.{{i}}.attn_{k}.weight" for k in ("q", "k", "v", "q_norm", "k_norm")},
  **{f"{k}_bias": f"blk.{{i}}.attn_{k}.bias" for k in "qkv"},
  **{k: f"blk.{{i}}.ffn_{k}.weight" for k in ("gate", "up", "down")},
  "attn_norm": "blk.{i}.attn_norm.weight",
  "mlp_norm": "blk.{i}.ffn_norm.weight",
}
FLOAT_TYPES = {0: np.float32, 1: np.float16}
_SPLIT = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")


@dataclass
class GGUFTensorInfo:
  name: str
  shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
  ggml_type: int
  offset: int  # bytes from the start of the file


def read_gguf_header(path: Path) -> tuple[dict, list[GGUFTensorInfo]]:
  """A GGUF file's metadata and tensor table, without reading the tensors."""
  from tinygrad.llm.gguf import read_int32, read_str, read_uint32, read_uint64, readers

  with open(path, "rb") as r:
    if r.read(4) != b"GGUF":
      raise ConfigError(f"{path}: not a valid GGUF file (no GGUF magic)")
    if (version := int.from_bytes(r.read(4), "little")) not in (2, 3):
      raise ConfigError(f"{path}: not a valid GGUF file (version {version}; 2 and 3 are read)")
    n_tensors, n_kv = read_uint64(r), read_uint64(r)
    kv = {read_str(r): readers[read_int32(r)](r) for _ in range(n_kv)}
    infos = []
    for _ in range(n_tensors):
      name = read_str(r)
      shape = tuple(read_uint64(r) for _ in range(read_uint32(r)))
      infos.append((name, shape, read_int32(r), read_uint64(r)))
    align = kv.get("general.alignment", 32)
    start = -(-r.tell() // align) * align
  return kv, [GGUFTensorInfo(name, shape, kind, start + offset) for name, shape, kind, offset in infos]


def _parts(path: Path) -> list[Path]:
  """The files of a split GGUF (from any of its parts), or just path."""
  if not (split := _SPLIT.fullmatch(path.name)):
    return [path]
  stem, count = split.group(1), int(split.group(3))
  parts = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
  if missing := [p.name for p in parts if not p.exists()]:
    raise ConfigError(f"{path}: part {missing[0]} of this split GGUF file is missing; download every part")
  return parts


def _tensor(path: Path, t: GGUFTensorInfo, size: int, dequantized: dict[str, int]) -> np.ndarray:
  """One tensor in numpy order: blocks and floats memory-mapped, other types dequantized to float32."""
  import gguf

  shape = tuple(reversed(t.shape))
  qtype = None
  if t.ggml_type in FLOAT_TYPES:
    dtype = np.dtype(FLOAT_TYPES[t.ggml_type])
  elif t.ggml_type in GGUF_BLOCKS:
    dtype = GGUF_BLOCKS[t.ggml_type]
    shape = (*shape[:-1], shape[-1] // GGUF_BLOCK_ELEMENTS[t.ggml_type])
  else:
    try:
      qtype = gguf.GGMLQuantizationType(t.ggml_type)
    except ValueError:
      raise ConfigError(f"{path}: tensor {t.name!r} has unknown ggml type {t.ggml_type}") from None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    dtype, shape = np.dtype(np.uint8), (math.prod(shape) // block * type_size,)
  if t.offset + math.prod(shape) * dtype.itemsize > size:
    raise ConfigError(f"{path}: truncated (tensor {t.name!r} ends past the end of the file); download it again")
  data = np.memmap(path, dtype, "r", t.offset, shape)
  if qtype is None:
    return data
  dequantized[qtype.name] = dequantized.get(qtype.name, 0) + 1
  return gguf.quants.dequantize(data, qtype).reshape(tuple(reversed(t.shape)))


def read_tensors(path: Path) -> tuple[dict, dict[str, np.ndarray], str | None]:
  """(metadata of the first part, tensors by GGUF name, a note of what was dequantized at load or None)."""
  kv, tensors, dequantized = {}, {}, {}
  for part in _parts(path):
    part_kv, infos = read_gguf_header(part)
    kv = kv or part_kv
    size = part.stat().st_size
    tensors |= {t.name: _tensor(part, t, size, dequantized) for t in infos}
  counts = ", ".join(f"{n} {kind}" for kind, n in dequantized.items())
  return kv, tensors, f"{path.name}: dequantized to float32 at load: {counts} tensors" if dequantized else None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """GGUF llama q/k rows are interleaved for llama.cpp's RoPE; back to the HF rotate-half layout."""
  return w.reshape(n_heads, -1, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)


def _rope_scaling(kv: dict, arch: str, path: Path) -> RopeScaling | None:
  """{arch}.rope.scaling.*: linear or yarn (llama3's frequencies come as the rope_freqs.weight tensor instead)."""
  kind = kv.get(f"{arch}.rope.scaling.type", "none")
  if kind == "none":
    return None
  if kind not in ("linear", "yarn"):
    raise ConfigError(f"{path}: metadata '{arch}.rope.scaling.type' {kind!r} is not supported (none, linear, yarn)")
  factor = kv.get(f"{arch}.rope.scaling.factor", 1.0)
  original = kv.get(f"{arch}.rope.scaling.original_context_length")
  attention_factor = kv.get(f"{arch}.rope.scaling.attn_factor")
  if kind == "yarn" and attention_factor is not None:  # llama.cpp multiplies it into yarn's own 0.1 ln(factor) + 1
    attention_factor *= 0.1 * math.log(factor) + 1.0
  return RopeScaling(kind, factor, original, attention_factor=attention_factor)


def model_config(kv: dict, path: Path, has_output: bool) -> ModelConfig:
  arch = kv.get("general.architecture", "?")
  if arch not in GGUF_ARCHITECTURES:
    supported = ", ".join(GGUF_ARCHITECTURES)
    raise ConfigError(f"{path}: architecture {arch!r} is not supported (supported: {supported})")

  def need(key: str):
    if f"{arch}.{key}" not in kv:
      raise ConfigError(f"{path}: metadata field '{arch}.{key}' is missing")
    return kv[f"{arch}.{key}"]

  if "tokenizer.ggml.tokens" not in kv:
    raise ConfigError(f"{path}: metadata field 'tokenizer.ggml.tokens' is missing (no embedded tokenizer)")
  heads, hidden = need("attention.head_count"), need("embedding_length")
  return ModelConfig(
    family=GGUF_ARCHITECTURES[arch],
    vocab_size=len(kv["tokenizer.ggml.tokens"]),
    hidden_size=hidden,
    intermediate_size=need("feed_forward_length"),
    num_layers=need("block_count"),
    num_heads=heads,
    num_kv_heads=kv.get(f"{arch}.attention.head_count_kv", heads),
    head_dim=kv.get(f"{arch}.attention.key_length", hidden // heads),
    rms_norm_eps=need("attention.layer_norm_rms_epsilon"),
    rope_theta=kv.get(f"{arch}.rope.freq_base", 10000.0),
    max_position_embeddings=need("context_length"),
    tie_word_embeddings=not has_output,
    rope_scaling=_rope_scaling(kv, arch, path),
    sliding_window=kv.get(f"{arch}.attention.sliding_window"),
  )


def read_gguf(path: Path) -> tuple[dict, ModelConfig, dict[str, np.ndarray], str | None]:
  """(metadata, config, tensors by GGUF name, a note of what was dequantized): llama's q/k rows back in the HF
  layout."""
  try:
    kv, weights, note = read_tensors(path)
  except (ValueError, KeyError, IndexError, UnicodeDecodeError, OSError, struct.error) as e:
    raise ConfigError(f"{path}: not a valid GGUF file ({e})") from None
  config = model_config(kv, path, "output.weight" in weights)
  if "rope_freqs.weight" in weights:  # llama3's scaled frequencies, as divisors
    config = replace(config, rope_freq_factors=tuple(float(f) for f in weights.pop("rope_freqs.weight")))
  if config.family == "llama":
    for i in range(config.num_layers):
      for name, n in ((f"blk.{i}.attn_q.weight", config.num_heads), (f"blk.{i}.attn_k.weight", config.num_kv_heads)):
        if name in weights:
          weights[name] = unpermute_rope(weights[name], n)
  return kv, config, weights, note


def special_tokens(kv: dict) -> dict[str, str]:
  tokens = kv["tokenizer.ggml.tokens"]
  return {k: tokens[kv[f"tokenizer.ggml.{k}_id"]] for k in ("bos_token", "eos_token") if f"tokenizer.ggml.{k}_id" in kv}
