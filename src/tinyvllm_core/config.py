from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from .formats.rope import RopeScaling

DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZE = ("auto", None, "int8", "gguf")


class ConfigError(ValueError):
  """Bad model files or settings; the message names the file/field and what to do."""


@dataclass
class ModelConfig:
  family: str  # llama | qwen2 | qwen3
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  rope_scaling: RopeScaling | None = None
  rope_freq_factors: tuple[float, ...] | None = None  # GGUF rope_freqs.weight: each frequency divided by its factor
  sliding_window: int | None = None  # a token attends to at most this many positions (itself included)
  max_window_layers: int = 0  # layers from this index on use the sliding window (Qwen2); Mistral: all

  @property
  def qk_norm(self) -> bool:
    return self.family == "qwen3"

  @property
  def qkv_bias(self) -> bool:
    return self.family == "qwen2"

  def window(self, layer: int) -> int | None:
    return self.sliding_window if layer >= self.max_window_layers else None


@dataclass
class EngineConfig:
  device: str | None = None
  block_size: int = 16
  kv_cache_gb: float = 1.0
  num_blocks: int | None = None  # overrides kv_cache_gb (tests use tiny pools)
  max_num_seqs: int = 32
  max_num_batched_tokens: int = 512
  max_model_len: int | None = None
  enable_prefix_caching: bool = True
  dtype: str = "auto"  # see resolve_dtype
  # auto: a GGUF's own blocks when it has some (as llama.cpp and ollama run it), else the model's values; None: the
  # values (GGUF blocks dequantized); int8: matmul weights as int8 + a scale per 32; gguf: a GGUF's blocks, or an error
  quantize: str | None = "auto"
  beam: int = 0  # > 0: capture each new jit under tinygrad's BEAM search of this width (results are cached on disk)
  num_speculative_tokens: int = 0  # prompt-lookup draft tokens verified per decode step (0: off)

  def __post_init__(self):
    for name, low in (
      ("block_size", 1),
      ("max_num_seqs", 1),
      ("max_num_batched_tokens", 1),
      ("beam", 0),
      ("num_speculative_tokens", 0),
    ):
      if getattr(self, name) < low:
        raise ConfigError(f"engine setting {name} must be >= {low} (got {getattr(self, name)})")
    if self.kv_cache_gb <= 0:
      raise ConfigError(f"engine setting kv_cache_gb must be > 0 (got {self.kv_cache_gb})")
    if self.num_blocks is not None and self.num_blocks < 2:
      raise ConfigError("engine setting num_blocks must be >= 2")
    if self.dtype not in DTYPES:
      raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
    if self.quantize not in QUANTIZE:
      raise ConfigError(f"quantize {self.quantize!r} is not supported (auto, int8, gguf, or none)")


def on_cpu(device: str) -> bool:
  return device.split(":")[0] == "CPU"


def resolve_device(name: str | None) -> str:
  """Make `name` (tinygrad's DEV syntax: CPU, CUDA:1, CPU:LLVM, PYTHON::sm_80; default: kernels/devices.py picks)
  tinygrad's default device and return it as written, or fail with one line listing the devices that work here."""
  from .kernels.devices import use_device

  return use_device(name)


def resolve_dtype(dtype: str, device: str) -> str:
  """auto: float32 on CPU (fastest there: tinygrad's clang backend computes float16 through conversions), float16
  elsewhere."""
  if dtype != "auto":
    return dtype
  return "float32" if on_cpu(device) else "float16"


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: str) -> int:
  """K and V of every layer for block_size tokens."""
  itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
  return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


def num_kv_blocks(config: ModelConfig, block_size: int, dtype: str, kv_cache_gb: float) -> int:
  """KV blocks that fit a budget of kv_cache_gb GiB."""
  return max(2, int(kv_cache_gb * 2**30 // kv_bytes_per_block(config, block_size, dtype)))
