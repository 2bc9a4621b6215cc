"""GGUF files: metadata and tensor table, Q8_0/Q4_0/Q4_1 blocks memory-mapped as stored, everything else through
tinygrad's gguf_load."""

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tinygrad import Tensor

from dataclasses import replace

from ..config import ConfigError, ModelConfig
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
# GGUF blocks of 32 weights along K kept as stored: Q4_0 (2), Q4_1 (3), Q8_0 (8); weight = code * d (+ m, or - 8 * d
# for Q4_0)
GGUF_BLOCKS = {
  2: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
  3: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
  8: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
}


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
      raise ConfigError(f"{path}: not a GGUF file (no GGUF magic)")
    r.read(4)  # version
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


def is_blocks(w) -> bool:
  return isinstance(w, np.ndarray) and w.dtype.names is not None


def unpack_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """[N, K/32] blocks -> codes [N, K/32, 32] (int8, or uint8 0..15), scales and offsets [N, K/32] (None for Q8_0)."""
  d, qs = np.array(blocks["d"], np.float32), np.array(blocks["qs"])  # plain arrays, not memmaps
  if qs.dtype == np.int8:
    return qs, d, None
  codes = np.concatenate([qs & 15, qs >> 4], -1)  # low nibbles hold weights 0-15
  offset = np.array(blocks["m"], np.float32) if "m" in blocks.dtype.names else -8 * d
  return codes, d, offset


def dequantize(w: np.ndarray) -> np.ndarray:
  if not is_blocks(w):
    return w
  q, d, m = unpack_blocks(w)
  values = q * d[..., None] + (0 if m is None else m[..., None])
  return values.reshape(len(w), -1).astype(np.float32)


def _blocks(path: Path, infos: list[GGUFTensorInfo]) -> dict[str, np.ndarray]:
  """The Q4_0 / Q4_1 / Q8_0 matrices as memory-mapped [rows, K/32] blocks (rows a multiple of 8: CPU panels)."""
  out = {}
  for t in infos:
    if t.ggml_type in GGUF_BLOCKS and len(t.shape) == 2 and t.shape[1] % 8 == 0:
      out[t.name] = np.memmap(path, GGUF_BLOCKS[t.ggml_type], "r", t.offset, (t.shape[1], t.shape[0] // 32))
  return out


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


def read_gguf(path: Path, device: str) -> tuple[dict, ModelConfig, dict[str, np.ndarray]]:
  """(metadata, config, tensors by GGUF name): kept blocks memory-mapped, other tensors as float32 arrays, llama's q/k
  rows back in the HF layout."""
  from tinygrad.llm.gguf import gguf_load

  errors = (ValueError, KeyError, IndexError, UnicodeDecodeError, RuntimeError, struct.error)
  try:
    kv, sd = gguf_load(Tensor(path).to(device))
  except errors as e:
    raise ConfigError(f"{path}: not a valid GGUF file ({e})") from None
  config = model_config(kv, path, "output.weight" in sd)
  if "rope_freqs.weight" in sd:  # llama3's scaled frequencies, as divisors
    config = replace(config, rope_freq_factors=tuple(sd.pop("rope_freqs.weight").float().tolist()))
  try:
    blocks = _blocks(path, read_gguf_header(path)[1])
    weights = {k: blocks[k] if k in blocks else v.float().numpy() for k, v in sd.items()}
  except Exception as e:
    raise ConfigError(f"{path}: tensor data cannot be decoded ({e}); the file may be truncated") from None
  if config.family == "llama":
    for i in range(config.num_layers):
      for name, n in ((f"blk.{i}.attn_q.weight", config.num_heads), (f"blk.{i}.attn_k.weight", config.num_kv_heads)):
        if name in weights:
          weights[name] = unpermute_rope(weights[name], n)
  return kv, config, weights


def special_tokens(kv: dict) -> dict[str, str]:
  tokens = kv["tokenizer.ggml.tokens"]
  return {k: tokens[kv[f"tokenizer.ggml.{k}_id"]] for k in ("bos_token", "eos_token") if f"tokenizer.ggml.{k}_id" in kv}
