from __future__ import annotations
import json
from dataclasses import dataclass
from pathlib import Path

# HF `architectures` entry -> our model family
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

class ConfigError(ValueError):
  """Bad model files or settings; the message names the file/field and what to do."""

def read_json(path: Path) -> dict:
  if not path.exists(): return {}
  try: return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e: raise ConfigError(f"{path}: not valid JSON ({e})") from None

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

  @property
  def qk_norm(self) -> bool: return self.family == "qwen3"
  @property
  def qkv_bias(self) -> bool: return self.family == "qwen2"

  @staticmethod
  def from_hf(path: Path) -> ModelConfig:
    if not path.exists(): raise ConfigError(f"{path}: not found; a model directory needs config.json")
    cfg = read_json(path)
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None: raise ConfigError(f"{path}: architecture {archs[0]!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    def need(key: str):
      if key not in cfg: raise ConfigError(f"{path}: field {key!r} is missing")
      return cfg[key]
    heads = need("num_attention_heads")
    return ModelConfig(family=family, vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
                       intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"), num_heads=heads,
                       num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or need("hidden_size") // heads,
                       rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0),
                       max_position_embeddings=cfg.get("max_position_embeddings", 2048), tie_word_embeddings=cfg.get("tie_word_embeddings", False))

def resolve_device(name: str | None) -> str:
  """Make `name` tinygrad's default device, or fail with the list of devices that work here."""
  from tinygrad import Device
  from tinygrad.helpers import DEV
  name = (name or Device.DEFAULT).upper()
  try: Device[name]
  except Exception:
    raise ConfigError(f"device {name!r} is not available on this machine (available: {', '.join(Device.get_available_devices()) or 'none'})") from None
  DEV.value = name
  return name

def resolve_dtype(dtype: str, device: str) -> str:
  """auto: float32 on CPU (fastest there: tinygrad's clang backend computes float16 through conversions), float16 elsewhere."""
  if dtype != "auto": return dtype
  return "float32" if device.split(":")[0] == "CPU" else "float16"

def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: str) -> int:
  """K and V of every layer for block_size tokens."""
  itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
  return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize

def num_kv_blocks(config: ModelConfig, block_size: int, dtype: str, kv_cache_gb: float) -> int:
  return max(2, int(kv_cache_gb * 2**30 // kv_bytes_per_block(config, block_size, dtype)))

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
  dtype: str = "auto"  # float32 | float16 | bfloat16; auto = float32 on CPU, float16 elsewhere
  quantize: str | None = None  # int8: matmul weights as int8 + one scale per 32; gguf: a GGUF's Q8_0/Q4_0/Q4_1 blocks as stored (dequantized in the matmul kernel)
  beam: int = 0  # > 0: capture each new jit under tinygrad's BEAM search of this width (results are cached on disk)

  def __post_init__(self):
    for name, low in (("block_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("beam", 0)):
      if getattr(self, name) < low: raise ConfigError(f"engine setting {name} must be >= {low} (got {getattr(self, name)})")
    if self.kv_cache_gb <= 0: raise ConfigError(f"engine setting kv_cache_gb must be > 0 (got {self.kv_cache_gb})")
    if self.num_blocks is not None and self.num_blocks < 2: raise ConfigError("engine setting num_blocks must be >= 2")
    if self.dtype not in ("auto", "float32", "float16", "bfloat16"): raise ConfigError(f"dtype {self.dtype!r} is not one of auto, float32, float16, bfloat16")
    if self.quantize not in (None, "int8", "gguf"): raise ConfigError(f"quantize {self.quantize!r} is not supported (int8, gguf, or none)")
