"""Model files -> config, weights, tokenizer and chat template (outside the engine's line budget: nano-vllm and vLLM
hand this to libraries). A model is a Hugging Face directory (config.json + *.safetensors + tokenizer.json) or a
.gguf file."""

from dataclasses import dataclass, field
from pathlib import Path


from ..config import ConfigError, ModelConfig
from . import gguf, hf
from .gguf import GGUF_ARCHITECTURES, GGUFTensorInfo, read_gguf_header
from .hf import SUPPORTED_ARCHITECTURES
from .tokenizer import render_chat
from .weights import prepare_weights, resolve_quantize

__all__ = [
  "GGUF_ARCHITECTURES",
  "SUPPORTED_ARCHITECTURES",
  "GGUFTensorInfo",
  "ModelFiles",
  "load_model_files",
  "prepare_weights",
  "read_gguf_header",
  "read_hf_config",
  "render_chat",
  "resolve_quantize",
]

read_hf_config = hf.model_config


@dataclass
class ModelFiles:
  config: ModelConfig
  weights: dict  # our names (formats/weights.py): lazy device tensors, or numpy arrays (GGUF blocks memory-mapped)
  tokenizer: object  # tokenizers.Tokenizer
  chat_template: str | None = None
  special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token / eos_token strings for templates
  eos_token_ids: list[int] = field(default_factory=list)
  generation_config: dict = field(default_factory=dict)
  notes: list[str] = field(default_factory=list)  # one line each, for the user: e.g. what was dequantized at load


def load_model_files(path: str | Path, device: str) -> ModelFiles:
  path = Path(path).expanduser()
  if not path.exists():
    raise ConfigError(f"{path}: no such file or directory")
  if path.is_file() and path.suffix != ".gguf":
    raise ConfigError(f"{path}: expected a model directory or a .gguf file")
  return load_gguf(path, device) if path.is_file() else load_hf(path, device)


def load_hf(model_dir: Path, device: str) -> ModelFiles:
  from .weights import canonical_weights

  config = hf.model_config(model_dir / "config.json")
  tokenizer = hf.read_tokenizer(model_dir)
  tokenizer_config, generation_config, raw_config = (
    hf.read_json(model_dir / f"{name}.json") for name in ("tokenizer_config", "generation_config", "config")
  )
  return ModelFiles(
    config,
    canonical_weights(config, hf.read_weights(model_dir, device), hf.HF_NAMES, model_dir),
    tokenizer,
    hf.chat_template(model_dir, tokenizer_config),
    hf.special_tokens(tokenizer_config),
    hf.eos_token_ids(generation_config, raw_config),
    generation_config,
  )


def load_gguf(path: Path, device: str) -> ModelFiles:
  from .tokenizer import gguf_tokenizer
  from .weights import canonical_weights

  kv, config, tensors, note = gguf.read_gguf(path)
  eos_ids = [kv["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in kv else []
  return ModelFiles(
    config,
    canonical_weights(config, tensors, gguf.GGUF_NAMES, path),
    gguf_tokenizer(kv, path),
    kv.get("tokenizer.chat_template"),
    gguf.special_tokens(kv),
    eos_ids,
    notes=[note] if note else [],
  )
